"""06_install: installs of our exported model, SmolLM2 (HF folder and GGUF), an export dir with GGUF + Modelfile and a
hub id (local fake hub); layout, manifest, list/info/remove, refusals, interrupted installs, names, verification."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CPU_PROFILES, ROOT, hardware_profile, serve_and_chat

from lib.check import default_report_dir, run_check
from lib.config import InstallConfig, load_config
from lib.errors import UserError
from lib.install.installer import install_model, name_from
from lib.models_dir import (
    MARKER,
    list_installed,
    models_dir_for,
    remove_installed,
    resolve_installed,
    set_models_dir,
    verify_install,
)
from lib.names import check_name

NO_TEST = InstallConfig(post_test=False)


def run_install_cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "06_install.py"), *map(str, args), "--quiet-config"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)


def visible(models_dir: Path) -> list[str]:
    """What a user sees in the models dir: installs, without hidden folders and the check-report logs."""
    return sorted(p.name for p in models_dir.iterdir() if not p.name.startswith(".") and p.name != "logs") \
        if models_dir.exists() else []


@pytest.fixture(scope="module", params=CPU_PROFILES)
def installed_tiny(request, tiny_chat_model, tmp_path_factory):
    """Our exported model, installed with the post-install test (CPU load + generate) on a CPU with and one
    without bf16 units (injected)."""
    models = tmp_path_factory.mktemp("models")
    with hardware_profile(request.param):
        return install_model(str(tiny_chat_model), models, name="tiny", echo=None)


@pytest.mark.slow
def test_install_layout_manifest_and_info(installed_tiny, tiny_chat_model):
    folder = installed_tiny
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "SHA256SUMS", "config.yaml", "install.log", "logs",
                                                         "model", "model_info.json", "runtime", "start.sh", "train.sh"]
    assert sorted(p.name for p in (folder / "model").iterdir()) == sorted(p.name for p in tiny_chat_model.iterdir())
    for f in tiny_chat_model.iterdir():
        assert (folder / "model" / f.name).read_bytes() == f.read_bytes()
    # SHA256SUMS is in sha256sum's format and covers every model file
    sums = (folder / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == len(list(tiny_chat_model.iterdir()))
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=folder).returncode == 0
    assert verify_install(folder) == {"path": str(folder), "files": len(sums), "hashed": True}

    info = json.loads((folder / "model_info.json").read_text())
    assert info["name"] == "tiny" and info["task"] == "text-generation" and info["installer_version"]
    kept = json.loads((folder.parent / "logs" / "checks" / "tiny" / "report.json").read_text())
    assert kept["source"]["fingerprint"] == info["check"]["source"]["fingerprint"]  # the report the install acted on
    assert info["capabilities"] == {"chat_template": True, "streaming": True, "context_length": 256}
    assert info["source"]["kind"] == "local" and info["source"]["ref"] == str(tiny_chat_model)
    assert info["check"]["estimates"]["params"]["total"] == info["params"] > 0
    # the post-test is the user's first ./start.sh --prompt, through the engine 05_check named
    post = info["post_test"]
    assert post["ok"] and post["args"] and post["engine"].startswith(f"engine {info['check']['verdict']['engine']}")
    assert 0 < post["peak_rss_bytes"] < 4 << 30 and post["seconds"] > 0
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", info["installed_at"])
    assert info["size_bytes"] >= sum(f.stat().st_size for f in tiny_chat_model.iterdir())

    log = (folder / "install.log").read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* ", line) for line in log)
    assert any("post-install test: ok" in line for line in log) and "install: complete" in log[-1]

    cfg = load_config(folder / "config.yaml")  # an ordinary pipeline config with serving defaults
    assert cfg.serve.max_new_tokens == 128  # at most half the 256-token context
    assert (folder / "start.sh").stat().st_mode & 0o111
    assert (folder / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.slow
def test_start_sh_runs_07_serve_with_this_folder(installed_tiny, tmp_path):
    """start.sh runs the install's own copy of the serving code with the install's environment, by relative paths."""
    text = (installed_tiny / "start.sh").read_text()
    assert str(ROOT) not in text and sys.prefix not in text  # nothing of the checkout or its venv
    assert (installed_tiny / "runtime" / "07_serve.py").read_bytes() == (ROOT / "07_serve.py").read_bytes()
    assert (installed_tiny / "runtime" / "lib" / "serving" / "api.py").is_file()
    fake = tmp_path / "python"  # PYTHON=... overrides the interpreter: here one that prints its arguments
    fake.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    fake.chmod(0o755)
    res = subprocess.run([str(installed_tiny / "start.sh"), "--port", "8123"], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": str(fake)}, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:-1] == [str(installed_tiny / "runtime" / "07_serve.py"), "--model",
                                            str(installed_tiny), "--config", str(installed_tiny / "config.yaml"),
                                            "--log-file", str(installed_tiny / "logs" / "server.log"),
                                            "--port", "8123"]


@pytest.mark.slow
def test_install_still_starts_after_the_checkout_is_deleted_and_the_models_dir_moved(tiny_chat_model, tmp_path):
    """Install from a throwaway copy of the checkout, delete that copy, move the whole models dir: start.sh still
    serves, with code and packages that live in the models dir."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("06_install.py", "07_serve.py"):
        shutil.copy2(ROOT / name, checkout / name)
    shutil.copytree(ROOT / "lib", checkout / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "config", checkout / "config")
    models = tmp_path / "models"
    res = subprocess.run([sys.executable, str(checkout / "06_install.py"), "install", str(tiny_chat_model),
                          "--models-dir", str(models), "--name", "tiny", "--no-test", "--quiet-config"],
                         capture_output=True, text=True, cwd=checkout, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    shutil.rmtree(checkout)
    moved = tmp_path / "elsewhere" / "models"
    moved.parent.mkdir()
    os.replace(models, moved)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = "/usr/bin:/bin"  # not the checkout's venv
    runtime_py = next((moved / ".runtime").glob("*/bin/python"))
    where = subprocess.run([str(runtime_py), "-c", "import sys, torch, gradio; print(sys.prefix); "
                            "print(torch.__file__); print(gradio.__file__)"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(moved)) for line in where.stdout.split()), where.stdout  # nothing from the venv
    assert isinstance(serve_and_chat(moved / "tiny" / "start.sh", env), str)


@pytest.mark.slow
def test_verify_detects_tampering(installed_tiny, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(installed_tiny, folder)
    weights = folder / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert verify_install(folder, quick=True)["hashed"] is False  # sizes/presence only: not caught
    with pytest.raises(UserError, match=r"changed \(sha256 differs\): model/model.safetensors"):
        verify_install(folder)
    shutil.copy2(installed_tiny / "model" / "model.safetensors", weights)
    (folder / "model" / "pytorch_model.bin").write_bytes(b"pickle")
    (folder / "model" / "tokenizer.json").unlink()
    with pytest.raises(UserError) as e:
        verify_install(folder)
    assert "missing: model/tokenizer.json" in str(e.value)
    assert "not in SHA256SUMS: model/pytorch_model.bin" in str(e.value)
    (folder / MARKER).unlink()
    with pytest.raises(UserError, match="not a complete install"):
        verify_install(folder)


@pytest.mark.slow
def test_smollm2_install_generates_paris(smollm2_hf, tmp_path):
    folder = install_model(str(smollm2_hf), tmp_path, cfg=InstallConfig(post_test_tokens=12), echo=None)
    assert folder.name == "SmolLM2-135M-Instruct"
    info = json.loads((folder / "model_info.json").read_text())
    assert info["params"] == 134_515_008 and info["capabilities"]["context_length"] == 8192
    assert "Paris" in info["post_test"]["text"], info["post_test"]
    assert f"{info['post_test']['text']!r}" in (folder / "install.log").read_text()


@pytest.mark.slow
def test_gguf_source_and_export_dir_with_gguf_and_modelfile(tiny_chat_model, tmp_path):
    from lib.export.gguf import write_gguf

    export = tmp_path / "export"
    shutil.copytree(tiny_chat_model, export / "hf")
    write_gguf(tiny_chat_model, export / "tiny-f16.gguf", "f16", name="tiny")
    (export / "Modelfile").write_text(f"FROM {export / 'tiny-f16.gguf'}\nPARAMETER temperature 0.7\n")
    models = tmp_path / "models"

    folder = install_model(str(export), models, cfg=NO_TEST, echo=None)
    assert folder.name == "export" and (folder / "model" / "config.json").is_file()
    assert sorted(p.name for p in (folder / "gguf").iterdir()) == ["Modelfile", "tiny-f16.gguf"]
    assert (folder / "gguf" / "Modelfile").read_text().splitlines()[0] == "FROM ./tiny-f16.gguf"
    assert "gguf/tiny-f16.gguf" in (folder / "SHA256SUMS").read_text()
    info = json.loads((folder / "model_info.json").read_text())
    assert info["gguf_files"] == ["tiny-f16.gguf"] and info["modelfile"] is True

    # a bare GGUF file is installed as it came (llama.cpp serves it), under the checksums; no fp32 HF copy ...
    folder = install_model(str(export / "tiny-f16.gguf"), models, cfg=NO_TEST, echo=None)
    assert folder.name == "tiny-f16" and not (folder / "model").exists()
    assert (folder / "gguf" / "tiny-f16.gguf").read_bytes() == (export / "tiny-f16.gguf").read_bytes()
    assert "gguf/tiny-f16.gguf" in (folder / "SHA256SUMS").read_text()
    # ... unless asked for (install.gguf_hf_copy): then converted to safetensors beside it
    folder = install_model(str(export / "tiny-f16.gguf"), models, name="with-hf", echo=None,
                           cfg=InstallConfig(post_test=False, gguf_hf_copy=True))
    files = sorted(p.name for p in (folder / "model").iterdir())
    assert "model.safetensors" in files and not any(f.endswith(".gguf") for f in files)
    config = json.loads((folder / "model" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert [e["name"] for e in list_installed(models)] == ["export", "tiny-f16", "with-hf"]


@pytest.mark.slow
def test_hub_install(fake_hub, tiny_chat_model, tmp_path):
    sha = fake_hub.add("acme/tiny-chat", tiny_chat_model)
    folder = install_model("acme/tiny-chat", tmp_path, cfg=NO_TEST, echo=None)
    assert folder.name == "acme_tiny-chat"
    assert sorted(p.name for p in (folder / "model").iterdir()) == sorted(p.name for p in tiny_chat_model.iterdir())
    info = json.loads((folder / "model_info.json").read_text())
    assert info["source"]["kind"] == "hub" and info["source"]["revision"] == sha
    verify_install(folder)


@pytest.mark.slow
def test_list_info_remove_and_config_cli(tiny_chat_model, tmp_path):
    models = tmp_path / "models"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    res = run_install_cli("install", tiny_chat_model, "--models-dir", models, "--name", "t1", "--no-test", env=env)
    assert res.returncode == 0, res.stderr
    assert f"installed: {models / 't1'}" in res.stdout
    res = run_install_cli("list", "--models-dir", models, env=env)
    assert res.returncode == 0 and re.search(r"^t1\s+\d+ [KM]B\s+chat\s+torch\s+float32\s+\d{4}-",
                                             res.stdout, flags=re.M), res.stdout
    res = run_install_cli("info", "t1", "--models-dir", models, env=env)
    assert res.returncode == 0 and "verify        ok" in res.stdout and "context       256" in res.stdout
    res = run_install_cli("remove", "t1", "--models-dir", models, env=env)  # no terminal to ask on, no --yes
    assert res.returncode == 2 and "confirm with --yes" in res.stderr and visible(models) == ["t1"]
    # two installs share one environment: removing the first keeps it, removing the last removes it too
    assert run_install_cli("install", tiny_chat_model, "--models-dir", models, "--name", "t2", "--no-test",
                           env=env).returncode == 0
    envs = list((models / ".runtime").iterdir())
    assert len(envs) == 1
    res = run_install_cli("remove", "t1", "--models-dir", models, "--yes", env=env)
    assert res.returncode == 0 and visible(models) == ["t2"] and envs[0].is_dir()
    assert re.search(r"removed .*t1 \(freed \d+ [KM]B\)", res.stdout) and "shared environment" not in res.stdout
    res = run_install_cli("remove", "t2", "--models-dir", models, "--yes", env=env)
    assert res.returncode == 0 and visible(models) == [] and not envs[0].exists(), res.stdout
    assert f"removed the shared environment {envs[0]}: no install uses it any more" in res.stdout
    res = run_install_cli("info", "t1", "--models-dir", models, env=env)
    assert res.returncode == 2 and "no installed model of that name" in res.stderr

    # config: show and set the models dir; `list` then looks there without --models-dir
    res = run_install_cli("config", env=env)
    assert "~/LLM/models" in res.stdout or str(Path("~/LLM/models").expanduser()) in res.stdout
    assert run_install_cli("config", models, env=env).returncode == 0
    settings = tmp_path / "xdg" / "models-at-home" / "settings.json"
    assert json.loads(settings.read_text()) == {"models_dir": str(models)}
    res = run_install_cli("config", env=env)
    assert f"models dir: {models} (set with" in res.stdout
    assert run_install_cli("remove", "t1", "--yes", env=env).returncode == 2  # now looked up in the saved dir


def test_models_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert models_dir_for(InstallConfig()) == Path("~/LLM/models").expanduser()
    set_models_dir(tmp_path / "saved")
    assert models_dir_for(InstallConfig()) == tmp_path / "saved"
    assert models_dir_for(InstallConfig(models_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    assert models_dir_for(InstallConfig(models_dir=str(tmp_path / "cfg")), tmp_path / "flag") == tmp_path / "flag"


@pytest.mark.slow
def test_refuses_incompatible_models_and_leaves_nothing(tmp_path):
    models = tmp_path / "models"
    ct2 = tmp_path / "ct2"  # a CTranslate2 model that is not Whisper: no handler knows it
    ct2.mkdir()
    (ct2 / "model.bin").write_bytes(b"\0" * 1024)
    (ct2 / "vocabulary.txt").write_text("a\nb\n")
    (ct2 / "config.json").write_text('{"bos_token": "<s>"}')
    with pytest.raises(UserError, match="Unsupported model architecture"):
        install_model(str(ct2), models, cfg=NO_TEST, echo=None)
    t5 = tmp_path / "t5"  # an encoder-decoder: detected, but no handler serves it
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"],
                                                "is_encoder_decoder": True, "d_model": 64, "num_layers": 2,
                                                "num_heads": 2, "d_ff": 128, "vocab_size": 512}))
    printed = []
    with pytest.raises(UserError, match="cannot install this model here: its type is seq2seq .* no handler serves"
                                         ".* and in .*logs/checks/t5/report.txt"):
        install_model(str(t5), models, cfg=NO_TEST, echo=printed.append)
    assert any(p.startswith("Model check:") for p in printed)  # the report is shown before the refusal
    assert [p.name for p in models.iterdir()] == ["logs"]  # no install; the check report is kept in the logs
    assert json.loads((models / "logs" / "checks" / "t5" / "report.json").read_text())["model"]["task"] == "seq2seq"
    with pytest.raises(UserError, match="the models dir's log folder"):
        install_model(str(t5), models, name="logs", cfg=NO_TEST, echo=None)
    res = run_install_cli("install", ct2, "--models-dir", models)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "CTranslate2" in res.stderr


@pytest.mark.slow
def test_existing_install_needs_force_or_a_yes(tiny_chat_model, tmp_path):
    first = install_model(str(tiny_chat_model), tmp_path, name="m", cfg=NO_TEST, echo=None)
    stamp = json.loads((first / "model_info.json").read_text())["installed_at"]
    with pytest.raises(UserError, match=r"already installed \(from local .*\); use --force"):
        install_model(str(tiny_chat_model), tmp_path, name="m", cfg=NO_TEST, echo=None)
    with pytest.raises(UserError, match="already installed"):
        install_model(str(tiny_chat_model), tmp_path, name="m", cfg=NO_TEST, echo=None, ask=lambda q: False)
    questions = []
    install_model(str(tiny_chat_model), tmp_path, name="m", cfg=NO_TEST, echo=None,
                  ask=lambda q: questions.append(q) or True)
    assert questions == [f"{tmp_path / 'm'} is already installed (from local {tiny_chat_model}). Replace it?"]
    time.sleep(1.1)
    install_model(str(tiny_chat_model), tmp_path, name="m", force=True, cfg=NO_TEST, echo=None)
    assert json.loads((first / "model_info.json").read_text())["installed_at"] != stamp
    # no leftovers of the replaced installs; .runtime holds the environment the installs share, logs the check reports
    assert sorted(p.name for p in tmp_path.iterdir()) == [".runtime", "logs", "m"]


@pytest.mark.slow
def test_names_are_sanitised(tiny_chat_model, tmp_path):
    assert name_from("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB_SmolLM2-135M-Instruct"
    assert name_from("../../etc/passwd") == "etc_passwd"
    assert name_from("my model (v2)!") == "my-model-v2"
    assert name_from("...") == "model"
    assert check_name(name_from("x" * 200), "install name") == "x" * 64
    for bad in ("../evil", "/abs/path", "a b", "", ".hidden", "x/y", "a..b", "ü", "x" * 65):
        with pytest.raises(UserError, match="install name"):
            check_name(bad, "install name")
    models = tmp_path / "models"
    with pytest.raises(UserError, match="install name"):
        install_model(str(tiny_chat_model), models, name="../escape", cfg=NO_TEST, echo=None)
    assert not (tmp_path / "escape").exists() and visible(models) == []
    with pytest.raises(UserError, match="install name"):
        resolve_installed("../models", models)
    with pytest.raises(UserError, match="install name"):
        remove_installed("../../etc", models)
    odd = tmp_path / "My Model (v2)!"
    shutil.copytree(tiny_chat_model, odd)
    assert install_model(str(odd), models, cfg=NO_TEST, echo=None).name == "My-Model-v2"


@pytest.mark.slow
def test_interrupted_install_leaves_nothing(tiny_chat_model, tmp_path, monkeypatch):
    import lib.install.installer

    models = tmp_path / "models"

    def ctrl_c(folder):  # Ctrl+C while the manifest is being written
        raise KeyboardInterrupt

    monkeypatch.setattr(lib.install.installer, "write_sums", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        install_model(str(tiny_chat_model), models, name="m", cfg=NO_TEST, echo=None)
    assert [p.name for p in models.iterdir()] == ["logs"]  # the check report; nothing of the install
    monkeypatch.undo()

    # kill -9 during the post-install test: only a hidden temp folder remains, which `list` never shows
    proc = subprocess.Popen([sys.executable, str(ROOT / "06_install.py"), "install", str(tiny_chat_model),
                             "--name", "k", "--models-dir", str(models), "--quiet-config"], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        logs = list(models.glob(".k.installing-*/install.log")) if models.exists() else []
        if logs and "post-install test: ./start.sh" in logs[0].read_text():
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the install never reached its post-install test")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert visible(models) == [] and list_installed(models) == []
    assert len(list(models.glob(".k.installing-*"))) == 1
    with pytest.raises(UserError, match="no installed model"):
        resolve_installed("k", models)
    # the next install cleans the dead one's temp folder
    install_model(str(tiny_chat_model), models, name="k", cfg=NO_TEST, echo=None)
    assert sorted(p.name for p in models.iterdir()) == [".runtime", "k", "logs"]
    assert all((env / ".complete").is_file() for env in (models / ".runtime").iterdir())  # no half-built one


@pytest.mark.slow
def test_check_report_is_reused_until_the_model_changes(tiny_chat_model, tmp_path):
    from lib.config import from_dict

    model = tmp_path / "src"
    shutil.copytree(tiny_chat_model, model)
    cfg = from_dict({"artifacts_dir": str(tmp_path / "artifacts")})
    out = run_check(cfg, str(model), echo=None)
    assert out == default_report_dir(cfg.artifacts_dir, str(model))
    logged = []
    install_model(str(model), tmp_path / "models", name="a", cfg=NO_TEST, echo=logged.append,
                  report_path=out / "report.json")
    assert logged[0].startswith(f"check: using {out / 'report.json'}")
    (model / "README.md").write_text("changed\n")
    logged.clear()
    install_model(str(model), tmp_path / "models", name="b", cfg=NO_TEST, echo=logged.append,
                  report_path=out / "report.json")
    assert "is stale" in logged[0] and logged[1] == f"check: analysing {model}"


@pytest.mark.slow
def test_venv_install_has_an_environment_of_its_own(tiny_chat_model, tmp_path):
    folder = install_model(str(tiny_chat_model), tmp_path, name="v", venv=True, cfg=InstallConfig(post_test_tokens=2),
                           echo=None)
    py = folder / "venv" / "bin" / "python"
    info = json.loads((folder / "model_info.json").read_text())
    assert info["venv"] is True and info["python"] == str(py)
    assert info["post_test"]["ok"]  # ran with the venv's own python
    assert "include-system-site-packages = false" in (folder / "venv" / "pyvenv.cfg").read_text()
    res = subprocess.run([str(py), "-c", "import torch, transformers; print(torch.__file__)"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith(str(folder / "venv")), res.stderr
    assert "venv/bin/python" in (folder / "start.sh").read_text()
    assert not (tmp_path / ".runtime").exists()  # no shared environment was needed
    verify_install(folder)  # the venv is not part of the manifest


@pytest.mark.slow
def test_pipeline_mode_export_then_check_then_install(tiny_chat_model, tmp_path):
    """05_check and 06_install without a model argument work on this config's export (04_export, made by lib.export.exporter
    from an 04_sft stage dir that holds our tiny model); install reuses the 05_check report."""
    from lib.artifacts import stage_output
    from lib.export.exporter import run_export
    from lib.stages import stage_dir

    sets = [f"artifacts_dir={tmp_path / 'artifacts'}", "export.gguf=[f16]", "prefs.enabled=false"]
    cfg = load_config(ROOT / "config/smoke.yaml", sets)
    with stage_output(cfg, "04_sft") as (out, _extra):
        for f in tiny_chat_model.iterdir():
            shutil.copy2(f, out / f.name)
    export = run_export(cfg)
    args = ["--config", ROOT / "config/smoke.yaml", *[x for s in sets for x in ("--set", s)]]

    res = subprocess.run([sys.executable, str(ROOT / "05_check.py"), *map(str, args), "--quiet-config"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr
    check_dir = stage_dir(cfg, "05_check")
    report = json.loads((check_dir / "report.json").read_text())
    assert (check_dir / "manifest.json").is_file() and report["source"]["path"] == str(export / "hf")
    assert sorted(Path(e).name for e in report["source"]["extras"]) == ["Modelfile", "homellm-f16.gguf"]

    models = tmp_path / "models"
    res = run_install_cli("install", *args, "--models-dir", models, "--no-test")
    assert res.returncode == 0, res.stderr
    assert f"check: using {check_dir / 'report.json'}" in res.stdout
    folder = models / "homellm-smoke"  # export.name + the config's name: configs never share an install by accident
    assert sorted(p.name for p in (folder / "gguf").iterdir()) == ["Modelfile", "homellm-f16.gguf"]
    assert "FROM ./homellm-f16.gguf" in (folder / "gguf" / "Modelfile").read_text()
    verify_install(folder)
    receipt = json.loads((stage_dir(cfg, "06_install") / "manifest.json").read_text())  # Snakemake's output
    assert receipt["installed"] == str(folder) and receipt["origin"] == f"pipeline config {ROOT / 'config/smoke.yaml'}"

    # the same config again: an update of its own install, replaced without a question
    first = json.loads((folder / "model_info.json").read_text())["installed_at"]
    time.sleep(1.1)
    assert run_install_cli("install", *args, "--models-dir", models, "--no-test").returncode == 0
    assert json.loads((folder / "model_info.json").read_text())["installed_at"] != first

    # another config aiming at the same name: refused, the install untouched
    other = tmp_path / "other.yaml"
    shutil.copy2(ROOT / "config/smoke.yaml", other)
    other_args = ["--config", other, *[x for s in sets for x in ("--set", s)], "--set", "install.name=homellm-smoke"]
    before = (folder / "model_info.json").read_bytes()
    res = run_install_cli("install", *other_args, "--models-dir", models, "--no-test")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"came from pipeline config {ROOT / 'config/smoke.yaml'}, not from pipeline config {other}" in res.stderr
    assert "nothing was replaced" in res.stderr and "--force" in res.stderr
    assert (folder / "model_info.json").read_bytes() == before
    verify_install(folder)
    # ... unless asked for on purpose
    res = run_install_cli("install", *other_args, "--models-dir", models, "--no-test", "--force")
    assert res.returncode == 0, res.stderr
    assert json.loads((folder / "model_info.json").read_text())["origin"] == f"pipeline config {other}"
    assert visible(models) == ["homellm-smoke"]
