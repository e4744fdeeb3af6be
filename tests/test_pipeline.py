"""Snakemake itself, on the smoke config in a temp dir: job counts for first run, no-op rerun, one-stage edit, revert."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGET_RULES = {"all", "data", "tokenizer", "tokens", "pretrained", "sft_model", "exported", "checked", "installed"}


def snakemake(ws: Path, *args: str) -> subprocess.CompletedProcess:
    # targets go before --configfile, which takes several values
    cmd = [sys.executable, "-m", "snakemake", *args, "-s", str(ROOT / "Snakefile"), "--directory", str(ws),
           "--cores", "2", "--configfile", str(ws / "config.yaml")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


def jobs_run(res: subprocess.CompletedProcess) -> dict[str, int]:
    """{rule: count} of the work rules Snakemake ran (target-only rules left out); {} for 'Nothing to be done'."""
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    out = res.stdout + res.stderr
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    counts.pop("total", None)
    return {k: v for k, v in counts.items() if k not in TARGET_RULES}


@pytest.fixture
def ws(tmp_path):
    text = (ROOT / "config" / "smoke.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text + f"\ninstall:\n  models_dir: {tmp_path / 'models'}\n")
    return tmp_path


@pytest.mark.slow
def test_edit_one_stage_reruns_only_it_and_revert_is_a_cache_hit(ws):
    assert jobs_run(snakemake(ws, "tokens")) == {"prepare_data": 1, "train_tokenizer": 1, "encode_corpus": 1}
    assert jobs_run(snakemake(ws, "tokens")) == {}

    original = (ws / "config.yaml").read_text()
    assert "vocab_size: 512" in original
    (ws / "config.yaml").write_text(original.replace("vocab_size: 512", "vocab_size: 600"))
    assert jobs_run(snakemake(ws, "tokens")) == {"train_tokenizer": 1, "encode_corpus": 1}

    (ws / "config.yaml").write_text(original)
    assert jobs_run(snakemake(ws, "tokens")) == {}
    # cosmetic edits (a comment, key order) change nothing either
    (ws / "config.yaml").write_text("# a comment\n" + original)
    assert jobs_run(snakemake(ws, "tokens")) == {}
    assert len(list((ws / "artifacts" / "02_tokenizer").iterdir())) == 2


def test_lint_is_clean(ws):
    res = snakemake(ws, "--lint")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Lints for rule" not in res.stdout + res.stderr


def test_bad_config_stops_before_any_job(ws):
    (ws / "config.yaml").write_text("tokenizer:\n  vocab_sise: 10\n")
    res = snakemake(ws, "tokens")
    assert res.returncode != 0
    assert "did you mean vocab_size?" in res.stdout + res.stderr
    assert not (ws / "artifacts").exists()


@pytest.mark.slow
def test_full_pipeline_then_nothing_to_do(ws):
    first = jobs_run(snakemake(ws, "all"))
    assert {"prepare_data", "train_tokenizer", "encode_corpus", "pretrain"} <= set(first)
    assert all(n == 1 for n in first.values())
    assert jobs_run(snakemake(ws, "all")) == {}
