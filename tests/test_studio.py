"""The training studio: run discovery and status, the config form (overrides, validation, saving, estimates), the
launcher (one pipeline at a time, stop = checkpoint, resume), the data explorer, and the whole thing in a real
browser: a fresh user starts 07_serve.py with no model, launches the smoke config from the form, watches the loss
chart grow, stops, resumes, sees the run complete and explores its data."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import CHROMIUM_ARGS, CPU_PROFILES, hardware_profile, pkg_dir

from lib import ROOT
from lib.atomic import atomic_write_json
from lib.config import load_config
from lib.errors import UserError
from lib.hardware import probe_hardware
from lib.model.homellm import HomeLLM, model_args
from lib.stages import stage_dir
from lib.studio.configs import (
    FIELDS,
    config_name,
    estimate,
    form_overrides,
    form_values,
    list_configs,
    save_config,
    validated,
)
from lib.studio.explore import corpus_overview, random_documents, sft_preview
from lib.studio.launch import Launcher
from lib.studio.runs import MetricsFile, find_runs, log_error

SCREENSHOTS_ENV = "MODELS_AT_HOME_SCREENSHOTS"  # where the browser test also copies its screenshots


def workspace(tmp_path: Path, max_steps: int = 30) -> Path:
    """A project dir as a user has it: config/smoke.yaml (models dir in the temp dir), nothing run yet."""
    ws = tmp_path / "ws"
    (ws / "config").mkdir(parents=True)
    text = (ROOT / "config" / "smoke.yaml").read_text().replace("max_steps: 30", f"max_steps: {max_steps}")
    (ws / "config" / "smoke.yaml").write_text(text + f"\ninstall:\n  models_dir: {tmp_path / 'models'}\n")
    return ws


# -- runs ---------------------------------------------------------------------------------------------------


def _fake_stage(artifacts: Path, stage: str, h: str, manifest: dict | None = None, log: str | None = None,
                run_json: dict | None = None, metrics: list[dict] | None = None) -> None:
    if manifest is not None:
        atomic_write_json(artifacts / stage / h / "manifest.json", {"stage": stage, "hash": h, "config": {}, **manifest})
    if log is not None:
        (artifacts / "logs" / stage).mkdir(parents=True, exist_ok=True)
        (artifacts / "logs" / stage / f"{h}.log").write_text(log)
    work = artifacts / "checkpoints" / stage / h
    if run_json is not None:
        atomic_write_json(work / "run.json", run_json)
    if metrics is not None:
        work.mkdir(parents=True, exist_ok=True)
        (work / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_stage_folders_group_into_runs_named_like_runs(tmp_path):
    """The Runs tab's rows are pipeline runs: the config's name, when it started, how far it got, its figures; a
    stage folder belongs to the run whose folders it read (its manifest's upstream), an unfinished one to the newest
    run of its config."""
    from lib.studio.runs import pipeline_runs

    a = tmp_path / "artifacts"
    for name, h, day in (("smoke", "1", "01"), ("default", "2", "02")):
        up = {}
        for stage in ("01_data", "02_tokenizer", "02_tokens", "03_pretrain"):
            _fake_stage(a, stage, h * 12, manifest={"config_name": name, "created": f"2026-12-{day}T14:0{len(up)}:00",
                                                     "upstream": dict(up), "final_eval": {"val_bpb": 1.44}})
            up = {stage: h * 12}
    _fake_stage(a, "04_sft", "3" * 12, run_json={"pid": 999_999_999, "host": socket.gethostname(), "ended": "stopped",
                                                 "run_name": "default"})
    runs = pipeline_runs(find_runs(a))
    assert [(p.name, p.started, len(p.stages), p.status) for p in runs] == [
        ("default", "2026-12-02 14:00", 5, "interrupted"), ("smoke", "2026-12-01 14:00", 4, "complete")]
    assert runs[0].label.startswith("default, started 2026-12-02 14:00") and "1.44 bits/byte" in runs[0].label
    assert [r.stage for r in runs[0].stages] == ["01_data", "02_tokenizer", "02_tokens", "03_pretrain", "04_sft"]
    assert runs[1].stages[-1].label == "smoke · phase 1 (pretrain) (03_pretrain/111111)"


def test_run_status_comes_from_manifests_trainer_and_logs(tmp_path):
    a = tmp_path / "artifacts"
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rows = [{"step": 5, "loss": 4.0, "lr": 1e-3, "tok_s": 900.0, "elapsed_s": 1.0}]
        _fake_stage(a, "03_pretrain", "aaaaaaaaaaaa", manifest={"final_eval": {"val_loss": 3.5, "val_bpb": 2.0},
                                                               "tokens": 1000, "train_seconds": 2.0, "steps": 5})
        _fake_stage(a, "03_pretrain", "bbbbbbbbbbbb", run_json={"pid": sleeper.pid, "host": host, "ended": None},
                    metrics=rows)
        _fake_stage(a, "03_pretrain", "cccccccccccc", run_json={"pid": sleeper.pid, "host": host, "ended": "stopped"},
                    metrics=rows, log="step 5\nreceived signal 15: checkpoint saved at step 5; rerun to resume\n")
        _fake_stage(a, "04_sft", "dddddddddddd", run_json={"pid": 999_999_999, "host": host, "ended": None},
                    metrics=rows, log="loading\nerror: sft.data[0]: data/chat.jsonl:3: not JSON\n")
        _fake_stage(a, "04_sft", "eeeeeeeeeeee", run_json={"pid": 999_999_999, "host": host, "ended": None},
                    metrics=rows, log="step 5\n")  # killed (-9): no error, no signal message
        _fake_stage(a, "01_data", "ffffffffffff", log="Traceback (most recent call last):\n  File x\nValueError: boom\n")
        (a / "02_tokens" / ".999999999999.tmp-x").mkdir(parents=True)  # a short stage being written
        by_id = {r.id: r for r in find_runs(a, launching=True)}
    finally:
        sleeper.kill()
        sleeper.wait()
    assert by_id["03_pretrain/aaaaaaaaaaaa"].status == "complete"
    assert by_id["03_pretrain/aaaaaaaaaaaa"].figures["val_loss"] == 3.5
    assert by_id["03_pretrain/aaaaaaaaaaaa"].figures["tok_s"] == 500.0
    assert by_id["03_pretrain/bbbbbbbbbbbb"].status == "running"
    assert by_id["03_pretrain/bbbbbbbbbbbb"].figures["steps"] == 5
    assert by_id["03_pretrain/cccccccccccc"].status == "interrupted"
    assert by_id["03_pretrain/cccccccccccc"].message == "stopped; a rerun starts it again"  # no checkpoint yet
    assert by_id["04_sft/dddddddddddd"].status == "failed"
    assert "not JSON" in by_id["04_sft/dddddddddddd"].message
    assert by_id["04_sft/eeeeeeeeeeee"].status == "interrupted"
    assert by_id["01_data/ffffffffffff"].status == "failed" and "ValueError: boom" in by_id["01_data/ffffffffffff"].message
    assert by_id["02_tokens/999999999999"].status == "running"
    # the trainer's process is gone now: the same directory reads as interrupted
    assert {r.id: r.status for r in find_runs(a)}["03_pretrain/bbbbbbbbbbbb"] == "interrupted"


def test_log_error_finds_the_last_error():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.log"
        p.write_text("ok\n")
        assert log_error(p) is None
        p.write_text("error: model.dim: expected an integer >= 8, got 4\n")
        assert log_error(p) == "model.dim: expected an integer >= 8, got 4"


def test_metrics_reader_reads_only_what_was_appended(tmp_path):
    path = tmp_path / "metrics.jsonl"
    reader = MetricsFile(path)
    assert reader.read() == {"train": [], "eval": []}
    path.write_text('{"step": 1, "loss": 5.0, "lr": 0.1}\n{"step": 2, "lo')  # a half-written line waits
    assert [r["step"] for r in reader.read()["train"]] == [1]
    with open(path, "a") as f:
        f.write('ss": 4.0, "lr": 0.1}\n{"step": 2, "val_loss": 4.5, "kind": "eval"}\n')
    rows = reader.read()
    assert [r["step"] for r in rows["train"]] == [1, 2] and rows["eval"][0]["val_loss"] == 4.5
    path.write_text('{"step": 1, "loss": 6.0, "lr": 0.1}\n')  # shorter: rewritten on resume
    assert [r["loss"] for r in reader.read()["train"]] == [6.0]


# -- the form -----------------------------------------------------------------------------------------------


def test_form_round_trip_gives_no_overrides_and_edits_become_set_strings(tmp_path):
    ws = workspace(tmp_path)
    base = load_config(ws / "config" / "smoke.yaml")
    values = form_values(base)
    assert form_overrides(base, values) == []
    edited = {**values, "pretrain.lr": 5e-4, "pretrain.max_steps": 99, "model.preset": "demo",
              "model.dim": 256, "model.n_layers": 4, "model.n_heads": 4, "data.sources": "- type: fortunes\n"}
    overrides = form_overrides(base, edited)
    assert overrides == ['model.preset="demo"', "pretrain.lr=0.0005", "pretrain.max_steps=99",
                         'data.sources=[{"type": "fortunes"}]']
    cfg = validated(ws / "config" / "smoke.yaml", overrides)
    assert (cfg.model.preset, cfg.model.dim, cfg.pretrain.max_steps) == ("demo", None, 99)
    assert cfg.data.sources[0].type == "fortunes"
    # custom dims: the preset is dropped and every dim is given, max_seq_len included
    custom = form_overrides(base, {**values, "model.preset": "custom", "model.dim": 96, "model.n_heads": 6})
    cfg = validated(ws / "config" / "smoke.yaml", custom)
    assert (cfg.model.preset, cfg.model.dim, cfg.model.n_heads, cfg.model.n_layers) == (None, 96, 6, 2)


def test_phase_2_and_data_sources_through_the_form(tmp_path):
    """The Train tab covers phase 2 (base, epochs, lr, LoRA on/off and rank, SFT data) with its own memory estimate,
    and data sources come from a form: an upload lands in data/, the preview shows the first records and the format
    the SFT reader detects, Add appends to the YAML, and a saved config keeps the path relative to itself."""
    import gradio as gr

    from lib.studio.explore import data_files, source_preview, store_upload
    from lib.studio.ui import Studio

    ws = workspace(tmp_path)
    with hardware_profile("cpu-fp32"):
        hw = probe_hardware()
    studio = Studio(ws, load_config(ws / "config" / "smoke.yaml"), can_launch=False, hardware=hw)
    base = load_config(ws / "config" / "smoke.yaml")
    values = form_values(base)
    assert values["sft.base_model"] == "phase 1 of this run" and values["sft.lora.enabled"] is False
    assert form_overrides(base, values) == []
    edited = {**values, "sft.train.max_epochs": 2, "sft.lora.enabled": True, "sft.lora.rank": 4, "sft.train.lr": 1e-4}
    assert form_overrides(base, edited) == ["sft.train.lr=0.0001", "sft.train.max_epochs=2.0", "sft.lora.rank=4",
                                            "sft.lora.enabled=true"]
    text, _ = studio.describe("config/smoke.yaml", *[edited[k] for k, _ in FIELDS])
    assert "**Phase 2** (LoRA rank 4 of 0.13M parameters) needs about" in text

    upload = tmp_path / "My Corpus (v2).txt"
    upload.write_text("\n\n".join(f"Verse {i}: and it was so." for i in range(50)) + "\n")
    rel = store_upload(ws, upload)
    assert rel == "data/My-Corpus-v2.txt" and data_files(ws) == [rel]
    assert store_upload(ws, upload) == rel  # the same file again: no copy
    alpaca = tmp_path / "tasks.jsonl"
    alpaca.write_text('{"instruction": "Say hi", "output": "Hi!"}\n')
    assert source_preview(ws, "files", store_upload(ws, alpaca))["format"] == "alpaca"
    shown = source_preview(ws, "files", rel)
    assert shown["format"] == "text" and shown["records"][0]["text"] == "Verse 0: and it was so."
    with pytest.raises(UserError, match="inside the project"):
        source_preview(ws, "files", "../../etc")
    sources = studio.add_source("data.sources", values["data.sources"], "files", rel, "text", 20)
    assert yaml.safe_load(sources) == [{"type": "bible", "max_docs": 3000}, {"type": "files", "path": rel, "max_docs": 20}]
    with pytest.raises(gr.Error, match="Pick a file"):
        studio.add_source("data.sources", sources, "files", None, "text", 0)
    saved = save_config(ws, "mine", ws / "config" / "smoke.yaml", form_overrides(base, {**values, "data.sources": sources}))
    written = yaml.safe_load((ws / saved).read_text())
    assert written["data"]["sources"][1]["path"] == "../../data/My-Corpus-v2.txt"  # relative to the saved file
    again = load_config(ws / saved)
    assert (Path(again.base_dir) / again.data.sources[1].path).resolve() == (ws / rel).resolve()

    with gr.Blocks() as demo:  # the tabs build with every field wired
        studio.build(demo)


def test_form_errors_name_the_key(tmp_path):
    ws = workspace(tmp_path)
    base = load_config(ws / "config" / "smoke.yaml")
    values = form_values(base)
    with pytest.raises(UserError, match=r"pretrain\.batch_size: expected a whole number"):
        form_overrides(base, {**values, "pretrain.batch_size": 2.5})
    with pytest.raises(UserError, match=r"data\.sources: expected a YAML list"):
        form_overrides(base, {**values, "data.sources": "type: bible"})
    bad = form_overrides(base, {**values, "pretrain.lr": 7.0})
    with pytest.raises(UserError, match=r"pretrain\.lr"):  # the same validation as --set
        validated(ws / "config" / "smoke.yaml", bad)
    with pytest.raises(UserError, match="n_heads"):
        validated(ws / "config" / "smoke.yaml", form_overrides(base, {**values, "model.preset": "custom",
                                                                     "model.dim": 64, "model.n_heads": 5}))


def test_saved_config_is_sanitised_validated_and_runs_the_same(tmp_path):
    ws = workspace(tmp_path)
    assert config_name("my-run_2.yaml") == "my-run_2"
    for bad in ("../../etc/passwd", ".hidden run!.yaml", "../..", ""):  # refused with the rule, never changed
        with pytest.raises(UserError, match="config name .*expected 1-64 letters"):
            config_name(bad)
    overrides = ["pretrain.max_steps=12"]
    with pytest.raises(UserError, match="config name"):
        save_config(ws, "../../escape", ws / "config" / "smoke.yaml", overrides)
    assert not (tmp_path / "escape.yaml").exists() and not (ws / "config" / "studio").exists()
    rel = save_config(ws, "escape", ws / "config" / "smoke.yaml", overrides)
    assert rel == Path("config/studio/escape.yaml") and (ws / rel).is_file()
    assert not (tmp_path / "escape.yaml").exists()
    saved = load_config(ws / rel)
    direct = load_config(ws / "config" / "smoke.yaml", overrides)
    for stage in ("01_data", "03_pretrain", "04_sft"):  # the saved file means what --set meant
        assert stage_dir(saved, stage) == stage_dir(direct, stage)
    assert "config/studio/escape.yaml" in list_configs(ws)
    with pytest.raises(UserError, match=r"model\.n_layers"):
        save_config(ws, "bad", ws / "config" / "smoke.yaml", ["model.n_layers=0"])
    assert not (ws / "config" / "studio" / "bad.yaml").exists()


@pytest.fixture(params=CPU_PROFILES)
def hardware(request):
    """The machine the estimate is judged for: a CPU with and one without bf16 units (never this machine's)."""
    with hardware_profile(request.param):
        return probe_hardware("/tmp")


def test_estimate_counts_the_model_it_would_build(tmp_path, hardware):
    ws = workspace(tmp_path)
    cfg = validated(ws / "config" / "smoke.yaml", ["model.preset=demo", "tokenizer.vocab_size=4096"])
    e = estimate(cfg, hardware)
    assert e["parameters"] == HomeLLM(model_args(cfg.model, 4096)).num_params()
    bigger = estimate(validated(ws / "config" / "smoke.yaml", ["model.preset=demo", "tokenizer.vocab_size=4096",
                                                               "pretrain.batch_size=64"]), hardware)
    assert bigger["train_bytes"] > e["train_bytes"] and bigger["parameters"] == e["parameters"]
    assert e["activation_dtype"] == ("bf16" if hardware["cpu"]["bf16"] else "fp32")
    fp32 = estimate(validated(ws / "config" / "smoke.yaml", ["model.preset=demo", "tokenizer.vocab_size=4096",
                                                             "pretrain.precision=fp32"]), hardware)
    assert fp32["activation_dtype"] == "fp32" and fp32["train_bytes"] >= e["train_bytes"]


# -- the pipeline: launcher and explorer ----------------------------------------------------------------------


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_launcher_runs_one_pipeline_stops_with_a_checkpoint_and_resumes(tmp_path):
    ws = workspace(tmp_path, max_steps=600)
    launcher = Launcher(ws, "artifacts")
    state = launcher.start("config/smoke.yaml", "pretrained")
    assert state["command"] == ("snakemake --cores all -s " + str(ROOT / "Snakefile")
                                + " --rerun-incomplete pretrained --configfile config/smoke.yaml")
    with pytest.raises(UserError, match="already running"):
        launcher.start("config/smoke.yaml", "pretrained")
    with pytest.raises(UserError, match="already running"):  # another studio on the same artifacts dir
        Launcher(ws, "artifacts").start("config/smoke.yaml", "pretrained")
    run = _wait(lambda: next((r for r in find_runs(ws / "artifacts", launching=True)
                              if r.stage == "03_pretrain" and r.figures.get("steps", 0) >= 40), None), 120,
                "pretraining to log 40 steps")
    assert run.status == "running"
    ended = launcher.stop()
    assert ended["returncode"] != 0 and launcher.active() is None
    run = next(r for r in find_runs(ws / "artifacts") if r.id == run.id)
    assert run.status == "interrupted" and "stopped; a rerun resumes from step" in run.message
    stopped_at = int(re.search(r"step (\d+)", run.message).group(1))
    assert stopped_at >= 40

    launcher.start("config/smoke.yaml", "pretrained")
    _wait(lambda: launcher.active() is None, 300, "the resumed pipeline to finish")
    assert launcher.last()["returncode"] == 0, launcher.log_tail()
    run = next(r for r in find_runs(ws / "artifacts") if r.id == run.id)
    assert run.status == "complete" and run.figures["steps"] == 600
    log = (ws / "artifacts" / "logs" / "03_pretrain" / f"{run.hash}.log").read_text()
    assert f"(step {stopped_at}," in log  # "resuming from ... (step N, ...": it continued, not restarted


@pytest.mark.slow
def test_data_explorer_and_sft_preview_on_a_real_corpus(tmp_path):
    ws = workspace(tmp_path)
    res = subprocess.run([sys.executable, "-m", "snakemake", "tokens", "-s", str(ROOT / "Snakefile"), "--cores", "2",
                          "--configfile", "config/smoke.yaml"], cwd=ws, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = load_config(ws / "config" / "smoke.yaml")
    data = ws / stage_dir(cfg, "01_data")
    o = corpus_overview(data)
    src = o["sources"][0]
    assert src["source"] == "bible" and src["kept"] == o["documents"] and src["chars"] == o["chars"]
    assert sum(o["removed"].values()) == src["read"] - src["kept"]
    assert sum(o["histogram"].values()) == o["documents"]
    assert o["tokenizers"] and 1.5 < o["tokenizers"][0]["val_bytes_per_token"] < 6
    val_texts = {json.loads(line)["text"] for line in (data / "val-00000.jsonl").read_text().splitlines()}
    docs = random_documents(data, "val", k=3, seed=1)
    assert len(docs) == 3 and all(d in val_texts for d in docs)
    assert random_documents(data, "val", k=3, seed=1) == docs  # the same seed, the same documents

    preview = sft_preview(cfg, k=3, seed=0, project_dir=ws)
    assert preview["sources"][0]["format"] == "chitchat" and preview["count"] == 200
    shown = [e for e in preview["examples"] if e["trained"]]
    assert shown
    for e in shown:
        marked = re.findall(r'<mark class="trained">(.*?)</mark>', e["html"], flags=re.S)
        assert marked and all(m.endswith("&lt;|im_end|&gt;") for m in marked)  # each assistant turn and its end
        assert "&lt;|im_start|&gt;user" not in "".join(marked)  # user turns are never trained
    # what training drops is shown unmarked: the highlight is the loss mask, not the assistant turns
    short = load_config(ws / "config" / "smoke.yaml", ["sft.train.seq_len=8"])
    dropped = sft_preview(short, k=3, seed=0, project_dir=ws)["examples"]
    assert dropped and all(e["trained"] == 0 and e["note"].startswith("dropped") and "<mark" not in e["html"]
                           for e in dropped)


# -- in the browser -------------------------------------------------------------------------------------------


def _serve(ws: Path, port_file: Path):
    """07_serve.py in the workspace, as a fresh user starts it: no model anywhere."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = open(port_file, "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "07_serve.py"), "--config", "config/smoke.yaml", "--port", "0"],
                            cwd=ws, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = _wait(lambda: (re.search(r"Running on (http://\S+/)", port_file.read_text()) or [None, None])[1], 120,
                "07_serve.py to print its URL")
    # its banner names the port it serves on (port 0 asked for any free one), not the config's default
    banner = re.search(r"# serve config: .*\bport=(\d+)", port_file.read_text())
    assert banner and url.endswith(f":{banner.group(1)}/"), port_file.read_text()
    return proc, url


@pytest.mark.slow
def test_browser_fresh_user_trains_from_the_studio(tmp_path, chromium):
    import httpx
    from playwright.sync_api import expect, sync_playwright

    ws = workspace(tmp_path)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    proc, url = _serve(ws, tmp_path / "serve.log")
    try:
        assert httpx.get(url + "health").json() == {"status": "no model", "model": None}
        r = httpx.post(url + "v1/chat/completions", json={"model": "x", "messages": []})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                # no model: the page opens on the studio's Train tab; the estimate follows the form
                expect(page.locator("#estimate")).to_contain_text("parameters", timeout=60_000)
                expect(page.locator("#command")).to_contain_text("--configfile config/smoke.yaml")
                page.locator("button[role=tab]:has-text('Chat')").first.click()
                expect(page.locator("#no-model")).to_contain_text("No model yet")
                expect(page.locator("#chatbot")).to_be_hidden()
                page.screenshot(path=str(shots / "studio-chat-no-model.png"), full_page=True)
                page.locator("button[role=tab]:has-text('Train')").first.click()
                steps = page.locator("#field-pretrain-max_steps input")
                steps.fill("1000")
                steps.press("Enter")
                layers = page.locator("#field-model-n_layers input")
                before = page.locator("#estimate").inner_text()
                layers.fill("3")
                layers.press("Enter")
                expect(page.locator("#estimate")).not_to_have_text(before, timeout=20_000)
                expect(page.locator("#command")).to_contain_text("config/studio/smoke-studio.yaml")
                expect(page.locator("#command")).to_contain_text("pretrain.max_steps=1000")
                page.locator("#target-picker input").click()
                page.get_by_role("option", name="report", exact=True).click()
                expect(page.locator("#command")).to_contain_text(" report --configfile")
                # a files source through the form: upload, preview, add to phase 1
                corpus = tmp_path / "verses.txt"
                with open(pkg_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as f:
                    corpus.write_text("\n\n".join(json.loads(next(f))["text"] for _ in range(400)) + "\n")
                with page.expect_file_chooser() as chooser:
                    page.locator("#src-upload").click()
                chooser.value.set_files(str(corpus))
                expect(page.locator("#src-path input")).to_have_value("data/verses.txt", timeout=30_000)
                page.locator("#src-preview-btn").click()
                expect(page.locator("#src-preview")).to_contain_text("plain text", timeout=20_000)
                expect(page.locator("#src-preview")).to_contain_text("In the beginning God created")
                page.locator("#src-add-pretrain").click()
                expect(page.locator("#field-data-sources")).to_contain_text("data/verses.txt", timeout=20_000)
                expect(page.locator("#command")).to_contain_text("data.sources=", timeout=20_000)
                page.screenshot(path=str(shots / "studio-train-form.png"), full_page=True)

                page.locator("#start-btn").click()
                expect(page.locator("#launch-status")).to_contain_text("running", timeout=30_000)
                saved = yaml.safe_load((ws / "config" / "studio" / "smoke-studio.yaml").read_text())
                assert saved["pretrain"]["max_steps"] == 1000 and saved["model"]["n_layers"] == 3

                # the live view gains points while it trains
                live = page.locator("#live-status")
                expect(live).to_contain_text("03_pretrain", timeout=120_000)
                expect(live).to_contain_text("running", timeout=60_000)
                first = _points(page)
                _wait(lambda: _points(page) >= first + 3 and _points(page) >= 5, 60, "the loss chart to gain points")
                expect(page.locator("#live-loss canvas, #live-loss svg").first).to_be_visible()
                page.screenshot(path=str(shots / "studio-live.png"), full_page=True)

                page.locator("#stop-run-btn").click()
                # a clean stop says where it stopped and where Resume goes on (not "stopped or failed")
                expect(page.locator("#launch-status")).to_contain_text("Resume continues from checkpoint step",
                                                                       timeout=90_000)
                said = re.search(r"stopped at step (\d+) of phase 1 \(pretrain\) — Resume continues from checkpoint "
                                 r"step (\d+)", page.locator("#launch-status").inner_text())
                assert said and said.group(1) == said.group(2), page.locator("#launch-status").inner_text()
                expect(live).to_contain_text("interrupted", timeout=10_000)
                # this page was opened before any run existed: its loss chart still draws the val curve next to
                # the train curve (two lines, both in the legend)
                expect(page.locator("#live-loss svg g.mark-line path")).to_have_count(2, timeout=30_000)
                expect(page.locator("#live-loss svg")).to_contain_text("val")
                stopped = _points(page)

                page.locator("#resume-btn").click()
                expect(page.locator("#launch-status")).to_contain_text("running", timeout=30_000)
                expect(page.locator("#launch-status")).to_contain_text("finished", timeout=300_000)
                published = next((ws / "artifacts" / "03_pretrain").glob("*/metrics.jsonl")).read_text().splitlines()
                assert len([r for r in published if '"loss"' in r]) > stopped  # the resumed run went on

                # the page opened before the run chats with the run's chat model (SFT or later, not phase 1)
                # without a restart, and the API serves it
                first = page
                first.locator("button[role=tab]:has-text('Chat')").first.click()
                expect(first.locator("#no-model")).to_be_hidden(timeout=30_000)
                # named as 06_install names it, the stage after its run's ("homellm-<config>-sft"), never phase 1's
                expect(first.locator("#model-status")).to_contain_text("(pipeline)", timeout=10_000)
                expect(first.locator("#model-status")).not_to_contain_text("-pretrain")
                box = first.locator("#chat-input textarea")
                expect(box).to_be_editable()
                box.fill("Hello")
                box.press("Enter")
                expect(first.locator("#chatbot .bot.message").last).to_contain_text(re.compile(r"\S"),
                                                                                    timeout=60_000)
                health = httpx.get(url + "health").json()
                assert health["status"] == "ok" and health["model"].startswith("homellm-smoke-studio"), health
                assert not health["model"].endswith("-pretrain"), health  # the run's chat model, not phase 1's
                first.screenshot(path=str(shots / "studio-chat-after-run.png"), full_page=True)

                # a page opened now shows the finished run without a Refresh: the lists are read at page load
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                page.locator("#tab-runs-button, button[role=tab]:has-text('Runs')").first.click()
                runs = page.locator("#pipeline-runs")  # one row per pipeline run, named by its config
                expect(runs).to_contain_text("smoke-studio", timeout=30_000)
                expect(runs).to_contain_text("9/9")  # the "report" target: every stage but the install
                expect(runs).to_contain_text("complete")
                expect(runs).to_contain_text("home_kjv_cloze")  # the report card's benchmark scores, compared
                table = page.locator("#runs-table")
                for stage in ("01_data", "03_pretrain", "04_sft", "08_report"):
                    expect(table).to_contain_text(stage, timeout=20_000)
                expect(table).not_to_contain_text("interrupted")
                expect(table).not_to_contain_text("running")
                # the overlay of two training runs (phase 1 and phase 2) draws all four curves
                for stage in ("03_pretrain", "04_sft"):
                    page.locator("#run-compare input").click()
                    page.get_by_role("option").filter(has_text=stage).first.click()
                expect(page.locator("#overlay-plot svg g.mark-line path")).to_have_count(4, timeout=30_000)
                page.screenshot(path=str(shots / "studio-runs.png"), full_page=True)

                page.locator("button[role=tab]:has-text('Data')").first.click()
                page.locator("#data-picker input").click()
                page.get_by_role("option").filter(has_text="01_data/").first.click()
                page.locator("#explore-btn").click()
                expect(page.locator("#data-summary")).to_contain_text("documents", timeout=30_000)
                expect(page.locator("#data-summary")).to_contain_text("bytes/token")
                expect(page.locator("#data-sources")).to_contain_text("bible")
                # the SFT preview of the run's own config (its tokenizer is the one this run trained)
                page.locator("#sft-config input").click()
                page.get_by_role("option", name="config/studio/smoke-studio.yaml", exact=True).click()
                page.locator("#sft-btn").click()
                expect(page.locator("#sft-summary")).to_contain_text("chitchat", timeout=60_000)
                expect(page.locator("#sft-examples mark.trained").first).to_be_visible()
                page.screenshot(path=str(shots / "studio-data.png"), full_page=True)

                page.locator("button[role=tab]:has-text('Chat')").first.click()
                expect(page.locator("#chatbot")).to_be_visible()
            finally:
                browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    for png in shots.glob("*.png"):
        assert png.stat().st_size > 10_000
    if os.environ.get(SCREENSHOTS_ENV):
        shutil.copytree(shots, os.environ[SCREENSHOTS_ENV], dirs_exist_ok=True)


def _points(page) -> int:
    m = re.search(r"(\d+) points", page.locator("#live-status").inner_text())
    return int(m.group(1)) if m else 0


def test_studio_handlers_overlay_details_and_the_launch_guard(tmp_path):
    import gradio as gr

    from lib.studio.ui import Studio

    ws = workspace(tmp_path)
    a = ws / "artifacts"
    curve = [{"step": s, "loss": 6.0 - s / 10, "lr": 1e-3, "tok_s": 100.0, "elapsed_s": s} for s in (1, 5, 10)]
    for h, shift in (("aaaaaaaaaaaa", 0.0), ("bbbbbbbbbbbb", 0.5)):
        _fake_stage(a, "03_pretrain", h, manifest={"config": {"pretrain": {"lr": 0.001 + shift}},
                                                   "final_eval": {"val_loss": 5.0 + shift}},
                    metrics=curve + [{"step": 10, "val_loss": 5.0 + shift, "kind": "eval", "samples": ["x"]}])
    studio = Studio(ws, load_config(ws / "config" / "smoke.yaml"), can_launch=False)
    table = studio.runs_table()
    assert set(table["folder"]) == {"03_pretrain/aaaaaaaaaaaa", "03_pretrain/bbbbbbbbbbbb"}
    assert set(table["stage"]) == {"phase 1 (pretrain)"}
    assert set(table["status"]) == {"complete"}
    both = studio.overlay(["03_pretrain/aaaaaaaaaaaa", "03_pretrain/bbbbbbbbbbbb"])
    assert set(both["series"]) == {f"03_pretrain/{h} {k}" for h in ("aaaaaaaaaaaa", "bbbbbbbbbbbb")
                                   for k in ("train", "val")}
    assert str(both["value"].dtype) == "float64" and len(both) == 8
    summary, config, _ = studio.run_details("03_pretrain/bbbbbbbbbbbb")
    assert "complete" in summary and "lr: 0.501" in config
    status, loss, *_ = studio.live("tab-1")
    assert "10 points" not in status and "3 points" in status and len(loss) == 4
    # after the data, the legend: colors for every series, once per change of the series (the chart redraws then)
    assert studio.live_legend("tab-1")["colors_in_legend"] == ["train", "val"]
    assert "colors_in_legend" not in studio.live_legend("tab-1")  # unchanged: nothing to redraw
    assert studio.live("tab-1")[1] is not loss  # unchanged: skipped for this tab ...
    assert len(studio.live("tab-2")[1]) == 4  # ... while another tab gets the curves
    # a server exposed without an API key never launches anything
    with pytest.raises(gr.Error, match="Launching is off"):
        studio.start("config/smoke.yaml", *studio.load_form("config/smoke.yaml"), "all")
    with pytest.raises(gr.Error, match="Launching is off"):
        studio.resume()
    assert not (a / ".studio").exists()
    with pytest.raises(gr.Error, match="not one of the config files"):  # only configs from the list
        studio.load_form("../../etc/passwd")


def test_an_installed_copy_of_the_code_shows_runs_but_launches_nothing(tmp_path, monkeypatch):
    """An install's runtime/ holds lib/ without the Snakefile: the studio reads runs but cannot start the pipeline."""
    import gradio as gr

    import lib.studio.launch
    from lib.studio.ui import Studio

    ws = workspace(tmp_path)
    assert Studio(ws, load_config(ws / "config" / "smoke.yaml")).can_launch
    monkeypatch.setattr(lib.studio.launch, "SNAKEFILE", tmp_path / "runtime" / "Snakefile")
    studio = Studio(ws, load_config(ws / "config" / "smoke.yaml"))
    assert not studio.can_launch and "no Snakefile" in studio.why_not
    with pytest.raises(gr.Error, match="installed model's copy"):
        studio.start("config/smoke.yaml", *studio.load_form("config/smoke.yaml"), "all")
    assert studio.runs_table().empty


@pytest.mark.slow
def test_browser_fine_tunes_an_installed_model_and_chats_with_its_adapter(tmp_path, tiny_chat_model, chromium):
    """The studio's fine-tune section in a real browser: an installed model, its settings with their reasons, the
    install's train.sh run from the page, then the Chat tab's picker offering the model with its new adapter."""
    from playwright.sync_api import expect, sync_playwright
    from test_finetune import chats

    from lib.config import InstallConfig
    from lib.install.installer import install_model

    ws = workspace(tmp_path)
    folder = install_model(str(tiny_chat_model), tmp_path / "models", name="tiny", echo=None,
                           cfg=InstallConfig(post_test=False))
    (ws / "data").mkdir()
    chats(ws / "data" / "pirate.jsonl", 40)
    proc, url = _serve(ws, tmp_path / "serve.log")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                page.locator("button[role=tab]:has-text('Train')").first.click()
                page.get_by_text("Fine-tune an installed model").click()
                page.locator("#ft-model input").click()
                page.get_by_role("option", name="tiny (torch)").click()
                page.locator("#ft-data input").click()
                page.get_by_role("option", name="data/pirate.jsonl").click()
                page.locator("#ft-name").get_by_role("textbox").fill("pirate")
                page.locator("#ft-plan-btn").click()
                expect(page.locator("#ft-plan")).to_contain_text("40 examples", timeout=60_000)
                expect(page.locator("#ft-plan")).to_contain_text("sft.lora.rank")
                page.locator("#ft-start-btn").click()
                expect(page.locator("#launch-status")).to_contain_text("train.sh", timeout=30_000)
                expect(page.locator("#launch-status")).to_contain_text("finished: adapter pirate", timeout=600_000)
                assert (folder / "adapters" / "pirate" / "adapter" / "adapter_config.json").is_file()
                page.reload()
                page.locator("button[role=tab]:has-text('Chat')").first.click()
                page.locator("#first-model-picker input").click()  # no model loaded yet: load one from the list
                page.get_by_role("option", name="tiny + LoRA pirate (installed)").click()
                expect(page.locator("#model-status")).to_contain_text("tiny+pirate", timeout=120_000)
                page.locator("#chat-input textarea").fill("Say the number 3.")
                page.locator("#send-btn").click()
                expect(page.locator("#chatbot .message").last).not_to_be_empty(timeout=60_000)
            finally:
                browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
