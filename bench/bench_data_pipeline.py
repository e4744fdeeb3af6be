"""Benchmark: data preparation + corpus encoding (stages 01 + 02_tokens) against the raw tokenizer speed.

    .venv/bin/python -m bench.bench_data_pipeline                    # default corpus, generated 10 MB and ~100 MB
    .venv/bin/python -m bench.bench_data_pipeline --size-mb 1000     # the full ~1 GB measurement (long)
    .venv/bin/python -m bench.bench_data_pipeline --skip-default --size-mb 30 --work /tmp/bench_data

For each corpus (the config/default.yaml data section, then generated corpora of 10 MB and --size-mb MB) every
stage runs in its own subprocess through the lib functions, as Snakemake runs them: 01_data, 02_tokenizer,
02_tokens; then, in the same run, the raw `Tokenizer.encode_batch_fast` speed (the library's fastest batch API:
the ids without character offsets) of the same tokenizer over the same documents (only those calls timed). 01 / 02_tokens / raw repeat in interleaved rounds and the best
time of each counts, because the machine may be shared; CPU seconds are reported too, as they are disturbed
less. Each subprocess reports the wall time of its lib call, its CPU time, and its peak RSS: ru_maxrss, and the
sampled sum over the process and the worker processes that stage 01 forks. Throughput is MB of cleaned corpus
text (UTF-8) per second.

Targets: end-to-end (01 + 02_tokens) >= 80% of the raw tokenizer speed; peak RSS of prep and encode flat in the
corpus size and < 1.5 GB. The generated corpus repeats and permutes bible + fortunes lines with random word
substitutions, so exact and near dedup keep (almost) all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lib import ROOT

TARGET_RATIO = 0.80
TARGET_RSS_MB = 1536


# ---------------------------------------------------------------------------------------------------------
# Worker: one stage in this process, result as one JSON line on stdout.


def _worker(stage: str, config: str, overrides: list[str]) -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # what the numbered scripts set
    from lib.config import load_config

    cfg = load_config(config, overrides)
    res: dict = {"stage": stage}
    tree = _TreeRss()
    t0, c0 = time.perf_counter(), _cpu()
    if stage == "data":
        from lib.data.prepare import read_stats, run_data

        out = run_data(cfg, force=True)
        stats = read_stats(out)
        res.update(bytes=stats["bytes"], docs=stats["documents"], removed=stats["removed"])
    elif stage == "tokenizer":
        from lib.data.tokenizer import run_tokenizer

        run_tokenizer(cfg, force=True)
    elif stage == "encode":
        from lib.data.tokenizer import read_token_meta, run_tokens

        meta = read_token_meta(run_tokens(cfg, force=True))
        res.update(tokens=sum(s["n_tokens"] for s in meta["splits"].values()),
                   bytes=sum(s["n_bytes"] for s in meta["splits"].values()),
                   val_bytes_per_token=meta["val_bytes_per_token"])
    elif stage == "raw":
        res.update(_raw_encode(cfg))
    else:
        raise SystemExit(f"unknown stage {stage}")
    res["seconds"] = res.pop("encode_seconds", None) or time.perf_counter() - t0
    res["cpu_seconds"] = res.pop("encode_cpu_seconds", None) or _cpu() - c0
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process
    res["child_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest worker process
    res["tree_rss_mb"] = max(tree.stop(), res["peak_rss_mb"])
    return res


class _TreeRss:
    """Peak of the summed RSS of this process and its children (stage 01's worker processes), sampled at 20 Hz.

    ru_maxrss sees one process at a time; the sum over forked workers counts their shared pages once per process,
    so this is an upper bound of the memory the stage needs."""

    def __init__(self):
        import threading

        import psutil

        self.proc, self.peak = psutil.Process(), 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        import psutil

        while not self.done.wait(0.05):
            total = self.proc.memory_info().rss
            for child in self.proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:  # a worker that just exited
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak / 2**20


def _cpu() -> float:
    """CPU seconds of this process (all threads, the Rust encoder's included) and of its finished children (stage
    01's workers): a figure a busy shared machine disturbs much less than wall time."""
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _raw_encode(cfg) -> dict:
    """The tokenizer alone: encode_batch_fast over the same documents and batch size; only the calls are timed."""
    import itertools

    from tokenizers import Tokenizer

    from lib.artifacts import require_stage
    from lib.data.prepare import iter_documents

    data_dir = require_stage(cfg, "01_data", "")
    tok = Tokenizer.from_file(str(require_stage(cfg, "02_tokenizer", "") / "tokenizer.json"))
    tok.encode_special_tokens = True  # as run_tokens does
    n_bytes = n_tokens = 0
    spent = cpu = 0.0
    for split in ("train", "val"):
        docs = iter_documents(data_dir, split)
        while batch := list(itertools.islice(docs, cfg.tokenizer.encode_batch_docs)):
            t, c = time.perf_counter(), _cpu()
            encs = tok.encode_batch_fast(batch, add_special_tokens=False)
            spent += time.perf_counter() - t
            cpu += _cpu() - c
            n_tokens += sum(len(e) for e in encs)
            n_bytes += sum(len(d.encode("utf-8")) for d in batch)
    return {"bytes": n_bytes, "tokens": n_tokens, "encode_seconds": spent, "encode_cpu_seconds": cpu}


def run_worker(stage: str, config: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_data_pipeline", "--worker", stage, "--config", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"worker {stage} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# The generated corpus.


def _pool() -> list[str]:
    """Bible verses and fortunes: the lines the generated corpus is built from."""
    from lib.data.loaders import pkg_dir

    lines = []
    with open(pkg_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        lines += [json.loads(line)["text"] for line in f]
    fortunes = Path(sys.prefix) / "share" / "games" / "fortune"
    for path in sorted(fortunes.glob("*")):
        if path.suffix == ".dat" or path.name.endswith("-o") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        lines += [e.strip() for e in text.split("\n%\n") if len(e.strip()) > 20]
    return lines


def generate_corpus(path: Path, size_mb: float, seed: int = 1234) -> Path:
    """JSONL documents of 3-8 random pool lines, ~10% of their words replaced by random pool words."""
    if path.is_file():
        return path
    rng = random.Random(seed)
    pool = _pool()
    words = sorted({w for line in pool[::7] for w in line.split()})
    target = int(size_mb * 1e6)
    written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            doc = " ".join(rng.choice(pool) for _ in range(rng.randint(3, 8))).split(" ")
            for j in rng.sample(range(len(doc)), max(1, len(doc) // 10)):
                doc[j] = rng.choice(words)
            line = json.dumps({"text": " ".join(doc)}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# The benchmark.


def bench_corpus(label: str, config: Path, overrides: list[str], repeats: int) -> dict:
    """Stage 01, 02_tokenizer once, then `repeats` interleaved rounds of 01 / 02_tokens / raw; best time of each."""
    runs: dict[str, list[dict]] = {"data": [], "encode": [], "raw": []}
    for r in range(repeats):
        for stage in ("data", "tokenizer", "encode", "raw") if r == 0 else ("data", "encode", "raw"):
            print(f"[{label}] round {r + 1}/{repeats}: {stage} ...", file=sys.stderr, flush=True)
            res = run_worker(stage, config, overrides)
            if stage == "tokenizer":
                tok = res
            else:
                runs[stage].append(res)
    data, enc, raw = (min(runs[k], key=lambda x: x["seconds"]) for k in ("data", "encode", "raw"))
    assert raw["bytes"] == enc["bytes"] == data["bytes"], (raw["bytes"], enc["bytes"], data["bytes"])
    mb = data["bytes"] / 1e6
    return {"label": label, "mb": mb, "docs": data["docs"], "tokens": enc["tokens"],
            "s01": data["seconds"], "s_tok": tok["seconds"], "s02": enc["seconds"], "s_raw": raw["seconds"],
            "e2e": mb / (data["seconds"] + enc["seconds"]), "enc": mb / enc["seconds"], "raw": mb / raw["seconds"],
            "cpu01": min(x["cpu_seconds"] for x in runs["data"]), "cpu02": min(x["cpu_seconds"] for x in runs["encode"]),
            "cpu_raw": min(x["cpu_seconds"] for x in runs["raw"]),
            "rss01": max(x["tree_rss_mb"] for x in runs["data"]), "rss_tok": tok["tree_rss_mb"],
            "rss02": max(x["tree_rss_mb"] for x in runs["encode"]),
            "rss01_self": max(x["peak_rss_mb"] for x in runs["data"]),
            "rss01_child": max(x["child_rss_mb"] for x in runs["data"]),
            "bpt": enc["val_bytes_per_token"], "removed": sum(data["removed"].values())}


def print_table(rows: list[dict]) -> None:
    head = (f"{'corpus':<14}{'MB':>8}{'docs':>10}{'removed':>9}{'01 MB/s':>9}{'02 MB/s':>9}{'e2e MB/s':>9}"
            f"{'raw MB/s':>9}{'e2e/raw':>8}{'02/raw':>8}{'RSS01':>8}{'RSS02':>8}{'RSStok':>8}{'B/tok':>7}{'tok s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['label']:<14}{r['mb']:>8.1f}{r['docs']:>10,}{r['removed']:>9,}{r['mb'] / r['s01']:>9.2f}"
              f"{r['enc']:>9.2f}{r['e2e']:>9.2f}{r['raw']:>9.2f}{r['e2e'] / r['raw']:>8.0%}{r['enc'] / r['raw']:>8.0%}"
              f"{r['rss01']:>8.0f}{r['rss02']:>8.0f}{r['rss_tok']:>8.0f}{r['bpt'] or 0:>7.2f}{r['s_tok']:>7.1f}")
    print("MB = cleaned corpus text (UTF-8); 01 = stage 01 (read, clean, dedup, split, shards); 02 = stage 02_tokens "
          "(read shards, encode_batch_fast, write .bin); e2e = MB / (01 s + 02 s); raw = encode_batch_fast calls alone, same "
          "tokenizer and documents; best of --repeats interleaved runs; RSS in MB: peak of the summed RSS of the stage's "
          "process and its workers (max over runs); tok s = BPE training (not in e2e)")


def check_targets(rows: list[dict]) -> bool:
    ok = True
    print("\ntargets:")
    for r in rows:
        ratio = r["e2e"] / r["raw"]
        good = ratio >= TARGET_RATIO
        ok &= good
        print(f"  [{'ok' if good else 'MISS'}] {r['label']}: end-to-end {r['e2e']:.2f} MB/s = {ratio:.0%} of raw "
              f"encode_batch_fast {r['raw']:.2f} MB/s (target >= {TARGET_RATIO:.0%}); stage 02_tokens alone "
              f"{r['enc'] / r['raw']:.0%} of raw")
        # CPU seconds (all threads) are what a busy shared machine disturbs least: the same ratios in CPU time.
        print(f"       in CPU seconds: raw {r['cpu_raw']:.1f} s vs 01 {r['cpu01']:.1f} s + 02_tokens {r['cpu02']:.1f} s:"
              f" end-to-end {r['cpu_raw'] / (r['cpu01'] + r['cpu02']):.0%}, 02_tokens alone {r['cpu_raw'] / r['cpu02']:.0%}")
    gen = [r for r in rows if r["label"].startswith("generated")]
    for r in gen:
        peak = max(r["rss01"], r["rss02"])
        good = peak < TARGET_RSS_MB
        ok &= good
        print(f"  [{'ok' if good else 'MISS'}] {r['label']}: peak RSS of prep/encode {peak:.0f} MB "
              f"(target < {TARGET_RSS_MB} MB); ru_maxrss: 01 main process {r['rss01_self']:.0f} MB, largest 01 worker "
              f"{r['rss01_child']:.0f} MB, 02_tokens {r['rss02']:.0f} MB")
    if len(gen) >= 2:
        small, large = gen[0], gen[-1]
        grow = max(large["rss01"], large["rss02"]) / max(small["rss01"], small["rss02"])
        good = grow < 1.5
        ok &= good
        print(f"  [{'ok' if good else 'MISS'}] RSS flat: {small['label']} -> {large['label']} "
              f"({large['mb'] / small['mb']:.0f}x the data) peak RSS x{grow:.2f} (target < x1.5); "
              f"01 {small['rss01']:.0f} -> {large['rss01']:.0f} MB, 02_tokens {small['rss02']:.0f} -> {large['rss02']:.0f} MB")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=100, help="size of the large generated corpus (default 100)")
    p.add_argument("--small-mb", type=float, default=10, help="size of the small generated corpus (default 10)")
    p.add_argument("--skip-default", action="store_true", help="do not run the config/default.yaml corpus")
    p.add_argument("--repeats", type=int, default=2,
                   help="interleaved rounds of 01 / 02_tokens / raw per corpus; the best time counts (default 2)")
    p.add_argument("--max-train-chars", type=int, default=20_000_000,
                   help="tokenizer.max_train_chars for the generated corpora (BPE training is not what is measured)")
    p.add_argument("--work", help="working directory (default: a temporary one, removed at the end)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--set", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.config, args.overrides)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmpdir:
        work = Path(args.work or tmpdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        if not args.skip_default:
            rows.append(bench_corpus("default", ROOT / "config" / "default.yaml",
                                     [f"artifacts_dir={work / 'artifacts'}"], args.repeats))
        for size in (args.small_mb, args.size_mb):
            label = f"generated {size:g}MB"
            print(f"[{label}] generating ...", file=sys.stderr, flush=True)
            corpus = generate_corpus(work / f"generated_{size:g}mb.jsonl", size)
            cfg_file = work / f"generated_{size:g}mb.yaml"
            # The default pipeline settings, on the generated file (its path relative to this config file).
            cfg_file.write_text(f"data:\n  sources:\n    - type: files\n      path: {corpus.name}\n"
                                f"tokenizer:\n  max_train_chars: {args.max_train_chars}\n")
            rows.append(bench_corpus(label, cfg_file, [f"artifacts_dir={work / 'artifacts'}"], args.repeats))
        print()
        print_table(rows)
        ok = check_targets(rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
