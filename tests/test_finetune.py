"""Fine-tuning an installed model from its own folder: train.sh DATA --name NAME (LoRA SFT with settings chosen from
the model, the data and the machine), adapters/NAME/ with its report, start.sh --adapter NAME serving it."""

import json
import os
import subprocess

import pytest

from lib.config import InstallConfig
from lib.install.finetune import choose_params
from lib.install.installer import install_model
from lib.model.dims import Dims


def chats(path, n: int):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say the number {i}."},
                                             {"role": "assistant", "content": f"Ahoy, number {i}, matey!"}]}) + "\n")
    return path


def test_settings_follow_the_model_the_data_and_the_memory():
    d = Dims(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, ffn=1536, vocab=49152)
    small = {k: v for k, v, _ in choose_params(135_000_000, d, [40] * 100, 100, 16 * 2**30, 8192)}
    assert small["sft.lora.rank"] == 8 and small["sft.lora.alpha"] == 16.0 and small["sft.train.seq_len"] == 64
    assert small["sft.train.max_epochs"] == 5.0
    assert small["sft.train.batch_size"] * small["sft.train.grad_accum"] == 16
    big = {k: v for k, v, _ in choose_params(7_000_000_000, d, [900] * 20000, 20000, 4 * 2**30, 4096)}
    assert big["sft.lora.rank"] == 32 and big["sft.train.seq_len"] == 960 and big["sft.train.batch_size"] == 1
    assert big["sft.train.max_epochs"] == 1.0
    for _, _, why in choose_params(135_000_000, d, [40] * 100, 100, 16 * 2**30, 8192):
        assert why  # every setting says why


@pytest.mark.slow
def test_train_sh_writes_an_adapter_that_start_sh_serves(tiny_chat_model, tmp_path):
    folder = install_model(str(tiny_chat_model), tmp_path / "models", name="tiny", echo=None,
                           cfg=InstallConfig(post_test=False))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    data = chats(tmp_path / "pirate.jsonl", 60)
    res = subprocess.run(["sh", str(folder / "train.sh"), str(data), "--name", "pirate", "--tensorboard"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "tensorboard: http://127.0.0.1:" in res.stdout
    assert "sft.lora.rank" in res.stdout and "start.sh --adapter pirate" in res.stdout
    adapter = folder / "adapters" / "pirate"
    report = json.loads((adapter / "training_report.json").read_text())
    assert (adapter / "adapter" / "adapter_config.json").is_file() and (adapter / "tensorboard").is_dir()
    assert report["examples"] == 60 and {s["key"] for s in report["settings"]} >= {"sft.lora.rank", "sft.train.lr"}
    assert report["val_loss_after"] < report["val_loss_before"]
    assert not (folder / "adapters" / ".work").exists()

    again = subprocess.run(["sh", str(folder / "train.sh"), str(data), "--name", "pirate"], capture_output=True,
                           text=True, timeout=300, env=env)
    assert again.returncode == 2 and "an adapter named pirate exists" in again.stderr
    missing = subprocess.run(["sh", str(folder / "train.sh"), str(tmp_path / "nope.jsonl")], capture_output=True,
                             text=True, timeout=300, env=env)
    assert missing.returncode == 2 and "nope.jsonl: no such file" in missing.stderr

    served = subprocess.run(["sh", str(folder / "start.sh"), "--adapter", "pirate", "--prompt", "Say the number 3.",
                             "--seed", "0", "--set", "serve.max_new_tokens=8"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert served.returncode == 0 and "loading tiny+pirate" in served.stderr, served.stderr[-2000:]
    assert (adapter / "merged" / "config.json").is_file()
    from lib.serving.loading import load_model
    from lib.serving.resolve import installed_models

    picker = {r.id: r for r in installed_models(tmp_path / "models")}  # the UI's model picker lists the adapter
    assert list(picker) == ["tiny", "tiny+pirate"] and picker["tiny+pirate"].label == "tiny + LoRA pirate (installed)"
    loaded = load_model(picker["tiny+pirate"], device="cpu")
    assert loaded.id == "tiny+pirate" and loaded.ref.path == adapter / "merged"
    wrong = subprocess.run(["sh", str(folder / "start.sh"), "--adapter", "nope", "--prompt", "x"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert wrong.returncode == 2 and "has no such adapter (it has: pirate)" in wrong.stderr
    info = subprocess.run(["sh", str(folder / "train.sh")], capture_output=True, text=True, env=env)
    assert info.returncode == 2 and "expected an installed model and the data" in info.stderr


def test_tensorboard_serves_the_runs_logs_on_localhost(tmp_path):
    import time

    import httpx
    from torch.utils.tensorboard import SummaryWriter

    from lib.install.finetune import start_tensorboard

    with SummaryWriter(str(tmp_path / "logs" / "run1")) as w:
        for step in range(3):
            w.add_scalar("loss/train", 3.0 - step, step)
    said = []
    board = start_tensorboard(tmp_path / "logs", said.append)
    try:
        url = said[0].split()[1]
        assert url.startswith("http://127.0.0.1:")
        for _ in range(120):  # it loads the event files in the background
            try:
                tags = httpx.get(url + "data/plugin/scalars/tags", timeout=5).json()
                if tags.get("run1"):
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert "loss/train" in tags["run1"]
    finally:
        board.terminate()
        board.wait()


@pytest.mark.slow
def test_studio_fine_tunes_an_installed_model_as_its_train_sh_does(tiny_chat_model, tmp_path, monkeypatch):
    import time

    import gradio as gr

    from lib.config import load_config
    from lib.serving.resolve import installed_models
    from lib.studio.ui import Studio

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = tmp_path / "models"
    folder = install_model(str(tiny_chat_model), models, name="tiny", echo=None, cfg=InstallConfig(post_test=False))
    ws = tmp_path / "ws"
    (ws / "config").mkdir(parents=True)
    (ws / "config" / "mine.yaml").write_text(f"install:\n  models_dir: {models}\n")
    (ws / "data").mkdir()
    chats(ws / "data" / "pirate.jsonl", 40)
    studio = Studio(ws, load_config(ws / "config" / "mine.yaml"))
    assert [path for _, path in studio.finetune_choices()] == [str(folder)]
    plan = studio.finetune_plan(str(folder), "data/pirate.jsonl")
    assert "40 examples" in plan and "`sft.lora.rank`" in plan and "`sft.train.seq_len`" in plan
    with pytest.raises(gr.Error, match="Pick an installed chat model"):
        studio.finetune_plan(str(tmp_path), "data/pirate.jsonl")
    with pytest.raises(gr.Error, match="no such file"):
        studio.finetune_plan(str(folder), "data/nope.jsonl")

    line, _ = studio.finetune_start(str(folder), "data/pirate.jsonl", "pirate")
    assert "running" in line and "train.sh" in line
    with pytest.raises(gr.Error, match="already running"):
        studio.finetune_start(str(folder), "data/pirate.jsonl", "other")
    deadline = time.time() + 600
    while studio.launcher.active() and time.time() < deadline:
        time.sleep(1)
    line, log = studio.launch_status()
    assert line.startswith("**finished: adapter pirate"), line + log[-2000:]
    assert "sft.lora.rank" in log and (folder / "adapters" / "pirate" / "adapter" / "adapter_config.json").is_file()
    assert "tiny+pirate" in [r.id for r in installed_models(models)]
    with pytest.raises(gr.Error, match="already has an adapter named pirate"):
        studio.finetune_start(str(folder), "data/pirate.jsonl", "pirate")
    with pytest.raises(gr.Error, match="fine-tune of an installed model"):
        studio.resume()


@pytest.mark.slow
def test_an_adapter_over_a_gguf_install_is_applied_by_llama_cpp_as_merged_torch_computes_it(tiny_chat_model,
                                                                                           tmp_path):
    """A model installed as a quantized GGUF: train.sh trains on its dequantised weights; start.sh --adapter applies
    the adapter with llama.cpp over the same GGUF (converted once by llama.cpp's LoRA converter), and its logits are
    those of the adapter merged into the same weights through torch."""
    import numpy as np
    import torch

    from lib.model.hf_io import load_hf
    from lib.serving.llamacpp import LlamaCppModel
    from lib.serving.loading import adapter_ref, load_model
    from lib.serving.resolve import installed_ref

    folder = install_model(str(tiny_chat_model), tmp_path / "models", name="tinyq", echo=None,
                           cfg=InstallConfig(post_test=False, quantize="q8_0"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    res = subprocess.run(["sh", str(folder / "train.sh"), str(chats(tmp_path / "pirate.jsonl", 60)), "--name",
                          "pirate"], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    served = subprocess.run(["sh", str(folder / "start.sh"), "--adapter", "pirate", "--prompt", "Say the number 3.",
                             "--seed", "0", "--set", "serve.max_new_tokens=8"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert served.returncode == 0, served.stderr[-2000:]
    assert "engine llama.cpp" in served.stderr and "LoRA adapter pirate applied" in served.stderr
    assert (folder / "adapters" / "pirate" / "adapter.gguf").is_file()

    loaded = load_model(adapter_ref(installed_ref(folder), "pirate"), device="cpu")
    ids = loaded.tokenizer("Hello there, how are you?")["input_ids"]
    lora = np.array(loaded.model.logits_of_prompt(ids))
    loaded.model.close()
    gguf = LlamaCppModel(next((folder / "gguf").glob("*.gguf")), n_ctx_seq=256, n_seq=1)
    base_cpp = np.array(gguf.logits_of_prompt(ids))
    gguf.close()
    merged = load_model(adapter_ref(installed_ref(folder), "pirate"), device="cpu", engine="torch")
    assert merged.engine == "torch" and "merged" in merged.engine_note
    plain = load_hf(folder / "adapters" / ".base-hf")
    with torch.no_grad():
        want = merged.model.net(torch.tensor([ids]))[0][0, -1].numpy()
        base = plain(torch.tensor([ids]))[0][0, -1].numpy()
    # what the adapter changes, seen through llama.cpp (Q8_0 matmuls) and through torch (the same weights in fp32)
    d_cpp, d_torch = lora - base_cpp, want - base
    assert np.abs(d_torch).max() > 1e-3
    cos = d_cpp @ d_torch / np.linalg.norm(d_cpp) / np.linalg.norm(d_torch)
    assert cos > 0.8, cos  # measured 0.949 (the Q8_0 activations add noise of the size of the small change)
