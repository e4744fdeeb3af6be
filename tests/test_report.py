"""The report card (08_report), the submission bundle and its verification, on one real smoke pipeline run by
Snakemake in a temp dir: the page in a real browser, a bundle re-run stage by stage, and bundles that are damaged,
tampered with or hostile (path traversal, links, a newer format)."""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import CHROMIUM_ARGS, ROOT, pkg_dir

from lib.config import load_config
from lib.errors import UserError
from lib.hardware import HARDWARE_ENV
from lib.report.bundle import QUICK_STEPS, compare_rerun, safe_extract
from lib.stages import stage_dir

pytestmark = pytest.mark.slow


def run(ws, *args, check=True, env=None):
    res = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ws, timeout=900,
                         env=env)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def pipeline(smoke_run):
    """The session's smoke run (conftest.smoke_run: Snakemake to the end, report included) and its bundle — made on a
    CPU without bf16 units (injected), so the precision the run used must be pinned in the bundle for verify (which
    runs with this machine's own policy) to re-run it identically."""
    ws, config, fp32_cpu, _ = smoke_run
    res = run(ws, ROOT / "08_report.py", "bundle", "--config", config, "--quiet-config", env=fp32_cpu)
    bundle = ws / res.stdout.split("submission bundle: ")[1].strip()
    return ws, load_config(config), bundle


def _whole_project(dest: Path, snakefile: str) -> Path:
    """The project as a user has it: its Snakefile (`snakefile`'s text), numbered scripts, lib/, config/ and envs/."""
    dest.mkdir(parents=True)
    for p in ROOT.iterdir():
        if p.name in ("lib", "config", "envs"):
            shutil.copytree(p, dest / p.name, ignore=shutil.ignore_patterns("__pycache__"))
        elif re.match(r"^\d\d_\w+\.py$", p.name):
            shutil.copy2(p, dest / p.name)
    (dest / "Snakefile").write_text(snakefile)
    return dest


def test_a_whole_project_upgraded_copied_and_moved_reruns_nothing_and_verifies_anywhere(pipeline, tmp_path):
    """A coursework-shaped run in a whole project folder (Snakefile, scripts, lib/, config; the corpus a local text
    file and the tokenizer a local pretrained folder, both given relative to the config), finished by the previous
    Snakefile (scripts as absolute rule inputs, Snakemake's default rerun triggers). Upgraded to this Snakefile and
    its workflow profile, copied with `cp -r` (new mtimes), moved with `mv` and run with another interpreter (a venv
    made elsewhere, hard-linked as installs make theirs): nothing is scheduled again; a corpus line edited after the
    move schedules data and everything after it. Its bundle verifies identical inside the project and in another
    directory (the re-run reads the bundle's copies of the corpus and tokenizer, from other paths)."""
    from lib.install.runtime_env import build_environment, distribution_closure

    ws_done, cfg_done, _ = pipeline
    new = (ROOT / "Snakefile").read_text()
    old = new.replace("            upstream=[done(u) for u in st.reads(CFG)],",
                      "            script=str(SRC / st.script),\n            upstream=[done(u) for u in st.reads(CFG)],"
                      ).replace("{{params.script}}", "{{input.script}}")
    assert "input.script" in old
    ws = _whole_project(tmp_path / "project", old)
    (ws / "corpus").mkdir()
    with open(pkg_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        verses = [json.loads(next(f))["text"] for _ in range(2500)]
    (ws / "corpus" / "a.txt").write_text("\n\n".join(verses) + "\n", encoding="utf-8")
    shutil.copytree(ws_done / stage_dir(cfg_done, "02_tokenizer"), ws / "tokenizer")  # any HF tokenizer folder
    text = (ROOT / "config" / "smoke.yaml").read_text()
    (ws / "mine.yaml").write_text(text + "\n".join([
        "", "data:", "  sources:", "    - type: files", "      path: corpus/a.txt",
        "tokenizer:", "  pretrained: tokenizer", f"install:\n  models_dir: {tmp_path / 'models'}",
        "prefs:\n  enabled: false", "report:\n  eval_tasks: []", ""]))  # what is moved matters, not phase 3
    fp32_cpu = {**os.environ, HARDWARE_ENV: "cpu-fp32"}

    def snakemake(project, *args, python=sys.executable):  # as the README runs it: in the project, its Snakefile
        res = subprocess.run([str(python), "-m", "snakemake", *args, "--cores", "2", "--configfile", "mine.yaml"],
                             cwd=project, capture_output=True, text=True, timeout=900, env=fp32_cpu)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout + res.stderr

    snakemake(ws, "report")
    (ws / "Snakefile").write_text(new)  # the upgrade: this Snakefile and its workflow profile
    shutil.copytree(ROOT / "profiles", ws / "profiles")
    assert "Nothing to be done" in snakemake(ws, "report", "-n")
    copied = tmp_path / "copied"
    subprocess.run(["cp", "-r", str(ws), str(copied)], check=True)  # every file gets a new mtime
    assert "Nothing to be done" in snakemake(copied, "report", "-n")
    moved = tmp_path / "elsewhere" / "moved-project"
    moved.parent.mkdir()
    subprocess.run(["mv", str(ws), str(moved)], check=True)
    names = [line.split("==")[0].split()[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith(("#", "-"))]
    python = build_environment(tmp_path / "venv-elsewhere", distribution_closure(names), lambda _: None)
    assert "Nothing to be done" in snakemake(moved, "report", "-n", python=python)

    res = run(moved, ROOT / "08_report.py", "bundle", "--config", moved / "mine.yaml", "--quiet-config", env=fp32_cpu)
    bundle = moved / res.stdout.split("submission bundle: ")[1].strip()
    for where in (moved / "verify-here", tmp_path / "verify-elsewhere"):
        out = run(moved, ROOT / "08_report.py", "verify", bundle, "--quick", "--workdir", where, "--quiet-config").stdout
        for stage in ("01_data", "02_tokenizer", "02_tokens", "03_pretrain"):
            assert re.search(rf"^{stage} +identical ", out, re.M), out
        assert f"the loss curve of the first {QUICK_STEPS} steps: max |Δ loss| 0" in out  # a bare --quick's default
        assert "verify: OK" in out

    corpus = moved / "corpus" / "a.txt"
    corpus.write_text(corpus.read_text(encoding="utf-8").replace("In the beginning", "At the start", 1))
    planned = snakemake(moved, "report", "-n")
    assert "Nothing to be done" not in planned and re.search(r"^prepare_data\s+1$", planned, re.M), planned
    assert re.search(r"^total\s+\d+$", planned, re.M)


def test_report_card_has_every_figure(pipeline):
    ws, cfg, _ = pipeline
    out = ws / stage_dir(cfg, "08_report")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "prefs.png", "pretrain.png", "report.html",
                                                     "report.json", "report.md", "sft.png"]
    r = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in r["stages"]][:4] == ["01_data", "02_tokenizer", "02_tokens", "03_pretrain"]
    assert all(s["done"] and s["wall_s"] is not None for s in r["stages"])
    assert r["data"]["scripts"] == {"LATIN": 1.0} and r["tokenizer"]["vocab_size"] == 512
    assert r["final"]["val_bpb"] > 0 and r["model"]["parameters"] > 0
    assert [p["sentence"] for p in r["perplexity"]] == ["And God said, Let there be light.", "Hello there."]
    assert all(p["phase 1"] > 1 and p["final"] > 1 for p in r["perplexity"])
    assert [(s["prompt"], s["temperature"]) for s in r["samples"]][:3] == [
        ("Hi! How are you?", 0.3), ("Hi! How are you?", 0.8), ("Hi! How are you?", 1.5)]
    assert r["export"]["max_abs_logit_diff"] == 0.0 and all(g["greedy_match"] for g in r["export"]["gguf"])
    assert r["check"]["runnable"] is True and r["coursework"]["phase 1"] == {"enabled": False}
    # phase 3 before and after, and the benchmarks of both models with standard errors and chance
    assert "04_prefs" in [s["stage"] for s in r["stages"]]
    figures = {row[0]: row[2:] for row in r["prefs"]["figures"]}
    assert figures["KL to the phase-2 model"][0] == 0.0 and figures["KL to the phase-2 model"][1] > 0
    assert len(r["prefs"]["replies"]) == 8 and all({"before", "after"} <= set(x) for x in r["prefs"]["replies"])
    assert r["eval"]["models"] == ["phase 1", "final"]
    for task in ("home_kjv_cloze", "home_chitchat_reply"):
        for row in r["eval"]["tasks"][task].values():
            assert row["n"] == 20 and row["chance"] == 0.25 and 0 <= row["acc"] <= 1 and row["acc_stderr"] > 0
    md = (out / "report.md").read_text()
    assert "## Perplexity of your sentences" in md and "![pretrain.png](pretrain.png)" in md
    # it reads like a report: tables with headers, ✓/✗ for checks, numbers with units, no JSON blobs
    assert "| source | read | kept | characters kept |" in md and "| reason | documents |" in md
    assert re.search(r"\| documents \| [\d,]+ train · [\d,]+ val \|", md), md
    assert re.search(r"\| bits per byte \| [\d.]+ bits/byte \|", md) and re.search(r"\| [\d.]+ MB \|", md)
    assert "| runs on this machine (05_check) | ✓ |" in md and "greedy output matches | ✓ |" in md
    assert "| task | metric | items | chance | phase 1 | final |" in md, md
    assert re.search(r"\| home_kjv_cloze \| acc \| 20 \| 0.25 \| [\d.]+ ± [\d.]+ \|", md), md
    assert re.search(r"\| home_chitchat_reply \| acc_norm \| 20 \| 0.25 \| [\d.]+ ± [\d.]+ \|", md), md
    assert "## Phase 3: preference tuning (self_play" in md and "| prompt | before | after |" in md
    assert '{"' not in md.split("## Resolved config")[0] and r["run"]["name"] == "config"
    # the terminal summary is in the stage's log
    log = next((ws / "artifacts" / "logs" / "08_report").glob("*.log")).read_text()
    assert "report card:" in log and "bits/byte" in log


def test_report_reads_well_in_a_browser(pipeline, chromium, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ws, cfg, _ = pipeline
    page_file = ws / stage_dir(cfg, "08_report") / "report.html"
    assert "src='http" not in page_file.read_text() and "data:image/png;base64," in page_file.read_text()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(page_file.as_uri())
            expect(page.locator("h1")).to_have_text("Models at Home — report card")
            for title in ("Summary", "Stages", "Training", "Phase 3: preference tuning", "Benchmarks",
                          "Perplexity of your sentences",
                          "Samples", "Resolved config"):
                expect(page.locator("h2", has_text=title)).to_be_visible()
            images = page.locator("img")
            expect(images).to_have_count(3)
            for i in range(3):  # decoded and laid out, not broken
                assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 500")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "report.png").stat().st_size > 50_000


def test_bundle_is_complete_checksummed_and_deterministic(pipeline, tmp_path):
    ws, cfg, bundle = pipeline
    root = safe_extract(bundle, tmp_path / "x")
    names = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert {"bundle.json", "README.md", "SHA256SUMS", "config/resolved.yaml", "report/report.html",
            "model/hf/model.safetensors", "model/homellm-q8_0.gguf", "tokenizer/tokenizer.json",
            "stages/03_pretrain/model.safetensors", "stages/04_sft/metrics.jsonl", "environment/pip-freeze.txt"} <= names
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=root).returncode == 0
    assert "08_report.py verify" in (root / "README.md").read_text()
    resolved = yaml.safe_load((root / "config" / "resolved.yaml").read_text())
    assert resolved["pretrain"]["precision"] == resolved["sft"]["train"]["precision"] == "fp32"  # what ran
    assert resolved["prefs"]["train"]["precision"] == "fp32"
    assert resolved["pretrain"]["compile"] is False  # what ran: compile auto, but the smoke run is too short for it
    again = run(ws, ROOT / "08_report.py", "bundle", "--config", ws / "config.yaml", "--quiet-config",
                "--out", tmp_path / "again.tar.gz", env={**os.environ, HARDWARE_ENV: "cpu-fp32"})
    assert "again.tar.gz" in again.stdout
    assert (tmp_path / "again.tar.gz").read_bytes() == bundle.read_bytes()


@pytest.fixture(scope="module")
def full_verify(pipeline, tmp_path_factory):
    """`08_report.py verify` of the smoke run's bundle, every stage re-run (through the export): its output and
    workdir (the bundle extracted under submission/, the re-run under rerun/)."""
    _, _, bundle = pipeline
    work = tmp_path_factory.mktemp("verify")
    res = run(work, ROOT / "08_report.py", "verify", bundle, "--workdir", work / "full", "--quiet-config")
    return res.stdout, work / "full"


def test_verify_reruns_every_stage_identically(pipeline, full_verify, tmp_path):
    _, _, bundle = pipeline
    out, _ = full_verify
    lines = out.splitlines()
    for stage in ("01_data", "02_tokenizer", "02_tokens", "03_pretrain", "04_sft", "04_prefs", "04_export"):
        assert any(line.startswith(stage) and " identical " in line for line in lines), out
    assert "max |Δ weight| 0, max |Δ loss| 0" in out and "verify: OK" in out
    assert "the bytes of train-*.jsonl, val-*.jsonl, stats.json: byte-identical" in out  # says how
    quick = run(tmp_path, ROOT / "08_report.py", "verify", bundle, "--quick", "10", "--workdir", tmp_path / "quick",
                "--quiet-config")
    assert "the loss curve of the first 10 steps: max |Δ loss| 0" in quick.stdout
    assert re.search(r"^04_sft +- +not re-run \(--quick 10\)$", quick.stdout, re.M), quick.stdout


def _repack(bundle, out, edit=None, extra=None):
    """A copy of the bundle with edit(name, data) -> data applied to every member and `extra` TarInfos added."""
    with tarfile.open(bundle) as src, tarfile.open(out, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if edit and data is not None:
                data = edit(m.name, data)
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
        for info, data in extra or []:
            dst.addfile(info, io.BytesIO(data) if data is not None else None)
    return out


def test_verify_says_different_when_the_submitted_weights_are_not_what_the_config_gives(pipeline, full_verify,
                                                                                         tmp_path):
    """The forged bundle is compared with the re-run its config gives (the one full_verify made: the same config)."""
    _, _, bundle = pipeline
    from safetensors.torch import load, save

    changed = {}

    def edit(name, data):
        if name.endswith("stages/03_pretrain/model.safetensors"):
            t = load(data)
            t["model.norm.weight"] = t["model.norm.weight"] + 0.5
            data = save(t)
            changed["digest"] = hashlib.sha256(data).hexdigest()
        return data

    fake = _repack(bundle, tmp_path / "fake1.tar.gz", edit)

    def fix_sums(name, data):  # a consistent archive: its own SHA256SUMS updated
        if name.endswith("SHA256SUMS"):
            lines = [f"{changed['digest']}  {n}" if n == "stages/03_pretrain/model.safetensors" else f"{d}  {n}"
                     for d, n in (line.split("  ", 1) for line in data.decode().splitlines())]
            data = ("\n".join(lines) + "\n").encode()
        return data

    fake = _repack(fake, tmp_path / "fake2.tar.gz", fix_sums)
    lines = []
    assert compare_rerun(safe_extract(fake, tmp_path / "work"), full_verify[1] / "rerun", echo=lines.append) is False
    row = next(line for line in lines if line.startswith("03_pretrain"))
    assert "different" in row and "max |Δ weight| 0.5" in row
    assert lines[-1] == "verify: DIFFERENT (see above)"


def test_damaged_or_hostile_bundles_are_refused_and_nothing_escapes(pipeline, tmp_path):
    _, _, bundle = pipeline
    # truncated
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    with pytest.raises(UserError, match="not a readable bundle"):
        safe_extract(cut, tmp_path / "a")
    # tampered: one file changed, SHA256SUMS not
    tampered = _repack(bundle, tmp_path / "t.tar.gz", lambda n, d: d + b"\n" if n.endswith("report.md") else d)
    with pytest.raises(UserError, match="do not match SHA256SUMS: changed: report/report.md"):
        safe_extract(tampered, tmp_path / "b")
    # a missing file
    gone = tmp_path / "gone.tar.gz"
    with tarfile.open(bundle) as src, tarfile.open(gone, "w:gz") as dst:
        for m in src.getmembers():
            if not m.name.endswith("tokenizer/tokenizer.json"):
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    with pytest.raises(UserError, match="missing: tokenizer/tokenizer.json"):
        safe_extract(gone, tmp_path / "c")
    # path traversal and links
    evil = tarfile.TarInfo("submission/../../evil.txt")
    evil.size = 4
    with pytest.raises(UserError, match="refusing 'submission/../../evil.txt'"):
        safe_extract(_repack(bundle, tmp_path / "e.tar.gz", extra=[(evil, b"evil")]), tmp_path / "d")
    link = tarfile.TarInfo("submission/inputs/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(UserError, match="links and special files are not allowed"):
        safe_extract(_repack(bundle, tmp_path / "l.tar.gz", extra=[(link, None)]), tmp_path / "f")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()
    # from a newer format
    newer = _repack(bundle, tmp_path / "n.tar.gz", lambda n, d: d.replace(b'"format": 1', b'"format": 99')
                    if n.endswith("bundle.json") else d)
    with pytest.raises(UserError, match="bundle format 99 is newer than this checkout reads"):
        safe_extract(newer, tmp_path / "g")
    # and on the command line: one paragraph, no traceback
    res = run(tmp_path, ROOT / "08_report.py", "verify", cut, "--workdir", tmp_path / "h", "--quiet-config",
              check=False)
    assert res.returncode == 2 and "not a readable bundle" in res.stderr and "Traceback" not in res.stderr
