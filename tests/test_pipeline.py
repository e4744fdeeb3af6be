"""Snakemake itself, on the smoke config in a temp dir: job counts for first run, no-op rerun, one-stage edit, revert."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lib import ROOT

TARGET_RULES = {"all", "data", "tokenizer", "tokens", "pretrained", "sft_model", "exported", "checked", "installed",
                "report"}


def snakemake(ws: Path, *args: str, configfiles=("config.yaml",), root: Path = ROOT,
              env=None) -> subprocess.CompletedProcess:
    # targets go before --configfile, which takes several values
    cmd = [sys.executable, "-m", "snakemake", *args, "-s", str(root / "Snakefile"), "--directory", str(ws),
           "--cores", "2", "--configfile", *(str(ws / c) for c in configfiles)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)


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
def test_full_pipeline_then_nothing_to_do(smoke_run):
    ws, _, env, first_run = smoke_run  # the session's `snakemake all` of the smoke config, from an empty directory
    first = jobs_run(first_run)
    assert {"prepare_data", "train_tokenizer", "encode_corpus", "pretrain", "sft", "prefs", "export", "check",
            "install", "report_card"} <= set(first)
    assert all(n == 1 for n in first.values())
    assert jobs_run(snakemake(ws, "all", env=env)) == {}


# ---------------------------------------------------------------------------------------------------------
# The cache never lies: file contents, Snakemake's own config options and the code are all in the stage hash.

TOKENS = {"prepare_data": 1, "train_tokenizer": 1, "encode_corpus": 1}


@pytest.fixture
def files_ws(tmp_path):
    """The smoke config reading a local corpus file instead of the embedded Bible."""
    lines = [f"Line {i}: and the word was spoken unto the people of the land number {i}." for i in range(400)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    text = (ROOT / "config" / "smoke.yaml").read_text().replace(
        "    - type: bible\n      max_docs: 3000\n", "    - type: files\n      path: corpus.txt\n      txt_mode: line\n")
    assert "corpus.txt" in text
    (tmp_path / "config.yaml").write_text(text + f"\ninstall:\n  models_dir: {tmp_path / 'models'}\n")
    return tmp_path


@pytest.mark.slow
def test_editing_a_corpus_file_reruns_the_data_stage(files_ws):
    assert jobs_run(snakemake(files_ws, "tokens")) == TOKENS
    corpus = files_ws / "corpus.txt"
    original = corpus.read_text()
    corpus.write_text(original + "A new line appended to the corpus by its owner.\n")
    assert jobs_run(snakemake(files_ws, "tokens")) == TOKENS  # same path, new contents: everything reruns
    corpus.write_text(original)  # back to the old contents (a new mtime): the old artifacts are found again
    assert jobs_run(snakemake(files_ws, "tokens")) == {}


@pytest.mark.slow
def test_snakemake_config_options_are_merged_not_ignored(ws):
    assert jobs_run(snakemake(ws, "tokens")) == TOKENS
    res = snakemake(ws, "tokens", "--config", 'tokenizer={"vocab_size": 600}')
    assert jobs_run(res) == {"train_tokenizer": 1, "encode_corpus": 1}
    metas = [json.loads(p.read_text()) for p in (ws / "artifacts" / "02_tokens").glob("*/meta.json")]
    assert sorted(m["vocab_size"] for m in metas) == [512, 600]
    # a second --configfile is merged over the first (later wins): the same edit, so a cache hit
    (ws / "more.yaml").write_text("tokenizer:\n  vocab_size: 600\n")
    assert jobs_run(snakemake(ws, "tokens", configfiles=("config.yaml", "more.yaml"))) == {}
    assert jobs_run(snakemake(ws, "tokens")) == {}  # and the first config alone is still complete
    # a --config value for another stage does not rerun these
    assert jobs_run(snakemake(ws, "tokens", "--config", 'pretrain={"lr": 0.001}')) == {}


@pytest.mark.slow
def test_editing_the_code_reruns_the_stages_that_run_it_and_nothing_else_does(ws):
    """A copy of the checkout, so its lib/ can be edited. The cache key is honest both ways: an edit to the code a
    stage runs reruns exactly the stages that run it; a comment, a docstring, a `serve:` default in the config schema
    or a new line in the stage map reruns nothing (what the config code gives a stage is values, hashed as values)."""
    code = ws / "code"
    code.mkdir()
    for f in ["Snakefile", *(p.name for p in ROOT.glob("0*.py"))]:
        shutil.copy2(ROOT / f, code / f)
    shutil.copytree(ROOT / "lib", code / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "config", code / "config")
    shutil.copytree(ROOT / "envs", code / "envs")
    assert jobs_run(snakemake(ws, "tokens", root=code)) == TOKENS

    def edit(rel: str, old: str, new: str) -> str:
        path = code / rel
        original = path.read_text()
        assert old in original, (rel, old)
        path.write_text(original.replace(old, new, 1))
        return original

    def dry_run() -> dict[str, int]:
        return jobs_run(snakemake(ws, "tokens", "-n", root=code))

    # code: a statement added to the tokenizer's module reruns the tokenizer stages, not the data stage
    original = edit("lib/data/tokenizer.py", "\ndef ", "\nEDITED = True\n\n\ndef ")
    assert jobs_run(snakemake(ws, "tokens", root=code)) == {"train_tokenizer": 1, "encode_corpus": 1}
    (code / "lib/data/tokenizer.py").write_text(original)
    assert jobs_run(snakemake(ws, "tokens", root=code)) == {}  # reverted: a cache hit
    # not code: comments, docstrings, layout
    edit("lib/data/tokenizer.py", "\ndef ", "\n# a comment\n\n\ndef ")
    edit("lib/data/prepare.py", '"""', '"""A longer docstring. ')
    edit("lib/data/sources.py", "\ndef ", "\n\n\n\ndef ")
    assert dry_run() == {}
    # config code: a serve default and a comment in the schema, a new field no stage hashes, the stage map's comments
    edit("lib/config/schema.py", "port: int = field(default=7860", "port: int = field(default=7861")
    edit("lib/config/schema.py", "class TokenizerConfig:", "class TokenizerConfig:  # an edit")
    edit("lib/config/load.py", "\ndef ", "\n# an edit\n\n\ndef ")
    edit("lib/stages.py", "\ndef ", "\n# an edit\n\n\ndef ")
    assert dry_run() == {}
    # a default that a stage does hash reruns that stage and what follows, through its value
    edit("lib/config/schema.py", "min_frequency: int = field(default=2,", "min_frequency: int = field(default=3,")
    assert dry_run() == {"train_tokenizer": 1, "encode_corpus": 1}
    # a lib module the data stage imports indirectly reruns everything downstream
    edit("lib/data/sources.py", "\ndef ", "\nEDITED = True\n\n\ndef ")
    assert dry_run() == TOKENS


# ---------------------------------------------------------------------------------------------------------
# A project moved with its venv (the whole-project move itself: test_report.py, on a finished run).


def test_a_moved_venv_is_pointed_at_its_new_place(tmp_path):
    """What install.sh does first (lib/relocate.py): a venv that moved with the project has scripts whose first line
    names the old place (pip's #! line, or its sh wrapper for long paths) and an activate file that does; after
    the repair they run the venv where it is now."""
    from lib.relocate import repair_venv

    there = tmp_path / "old-place" / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(there)], check=True)
    (there / "bin" / "hello").write_text(f"#!{there}/bin/python\nimport sys\nprint(sys.prefix)\n")
    (there / "bin" / "long").write_text(f"#!/bin/sh\n'''exec' '{there}/bin/python' \"$0\" \"$@\"\n' '''\n"
                                        "import sys\nprint(sys.prefix)\n")
    for name in ("hello", "long"):
        (there / "bin" / name).chmod(0o755)
    assert repair_venv(there) is None  # where it was made: nothing to do
    shutil.move(str(there.parent), str(tmp_path / "moved"))  # the project folder renamed
    here = tmp_path / "moved" / ".venv"
    assert repair_venv(here) == str(there)
    for name in ("hello", "long"):
        out = subprocess.run([str(here / "bin" / name)], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == str(here), (name, out.stderr)
    assert str(here) in (here / "bin" / "activate").read_text() and str(there) not in (here / "bin" / "activate").read_text()
    assert repair_venv(here) is None
