"""What the report card and a teacher's check cost, on a pipeline run that already exists.

    snakemake --cores all --config 'install={"models_dir": "/tmp/run/models"}' --directory /tmp/run   # first
    python -m bench.bench_report --workdir /tmp/run                      # config/default.yaml's run
    python -m bench.bench_report --workdir /tmp/run --config config/smoke.yaml --quick 10

Prints, from Snakemake's own benchmark files of that run: every stage's wall time, the pipeline's total and the
report stage's share of it (target < 10%); then the time of `08_report.py bundle` and of `08_report.py verify
--quick N` on that bundle (a fresh process each, wall clock), next to what the stages it re-runs took in the
original run (data, tokenizer, tokens, and N/steps of pretraining).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lib import ROOT
from lib.stages import STAGES, stages_of


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="where the pipeline ran (holds artifacts/)")
    p.add_argument("--config", default=str(ROOT / "config" / "default.yaml"))
    p.add_argument("--quick", type=int, default=20, help="training steps verify --quick re-runs")
    a = p.parse_args(argv)
    work = Path(a.workdir).resolve()
    art = work / "artifacts"
    reports = sorted(art.glob("08_report/*/manifest.json"), key=lambda f: f.stat().st_mtime)
    if not reports:
        print(f"no finished 08_report under {art}: run the pipeline there first")
        return 1
    # the run's stages, found by following the manifests' upstream hashes from its newest report
    hashes, todo = {}, [("08_report", reports[-1].parent.name)]
    while todo:
        stage, h = todo.pop()
        hashes[stage] = h
        todo += json.loads((art / stage / h / "manifest.json").read_text())["upstream"].items()
    walls = {}
    for stage in (s.name for s in STAGES if s.kind != "install"):
        f = art / "logs" / stage / f"{hashes.get(stage)}.benchmark.tsv"
        if f.is_file():
            walls[stage] = float(list(csv.DictReader(f.read_text().splitlines(), delimiter="\t"))[-1]["s"])
    total = sum(walls.values())
    print(f"# report and verify costs for {a.config} in {work}")
    for stage, s in walls.items():
        print(f"  {stage:<13} {s:8.1f} s")
    share = walls["08_report"] / total
    print(f"pipeline total {total:.1f} s; 08_report {walls['08_report']:.1f} s = {share:.1%} of it "
          f"(target < 10%: {'met' if share < 0.10 else 'NOT met'})")

    cmd = [sys.executable, str(ROOT / "08_report.py"), "--config", a.config, "--quiet-config"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = subprocess.run([*cmd, "bundle", "--out", f"{tmp}/submission.tar.gz"], capture_output=True, text=True,
                             cwd=work)
        t_bundle = time.perf_counter() - t0
        if res.returncode != 0:
            print(res.stderr)
            return 1
        size = Path(tmp, "submission.tar.gz").stat().st_size
        print(f"bundle: {t_bundle:.1f} s, {size / 2**20:.1f} MB")
        t0 = time.perf_counter()
        res = subprocess.run([*cmd, "verify", f"{tmp}/submission.tar.gz", "--quick", str(a.quick), "--workdir",
                              f"{tmp}/verify"], capture_output=True, text=True, cwd=work)
        t_verify = time.perf_counter() - t0
        print("\n".join("  " + line for line in res.stdout.strip().splitlines()))
        steps = json.loads((art / "03_pretrain" / hashes["03_pretrain"] / "manifest.json").read_text())["steps"]
        original = sum(walls.get(s, 0) for s in stages_of("data")) + \
            walls.get("03_pretrain", 0) * min(1.0, a.quick / steps)
        print(f"verify --quick {a.quick}: {t_verify:.1f} s (exit {res.returncode}); the same work took ~{original:.1f} s "
              f"in the original run (data + tokenizer + tokens + {a.quick}/{steps} of pretraining)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
