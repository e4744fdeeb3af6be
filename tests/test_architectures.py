"""Every architecture 05_check calls installable goes check -> install -> start.sh -> an answer, through the engine
the check named: tiny random models of the common causal-LM families (built here with transformers), and the real
SmolLM2 GGUF. Not one verdict may promise what start.sh then refuses."""

import json
import os
import subprocess

import httpx
import pytest
import torch
from conftest import serve_and_chat

from lib.check import check_model, write_report
from lib.install.installer import install_model
from lib.serving.process import MeasuredProcess, free_port, wait_ready

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _configs():
    import transformers as t

    return {
        "llama": (t.LlamaConfig(**SMALL), t.LlamaForCausalLM),
        "qwen2": (t.Qwen2Config(**SMALL), t.Qwen2ForCausalLM),
        "qwen3": (t.Qwen3Config(**SMALL, head_dim=16), t.Qwen3ForCausalLM),
        "mistral": (t.MistralConfig(**SMALL), t.MistralForCausalLM),
        "phi3": (t.Phi3Config(**SMALL, pad_token_id=0), t.Phi3ForCausalLM),
        "gemma2": (t.Gemma2Config(**SMALL, head_dim=16), t.Gemma2ForCausalLM),
        "gemma3_text": (t.Gemma3TextConfig(**SMALL, head_dim=16), t.Gemma3ForCausalLM),
        "olmo2": (t.Olmo2Config(**SMALL), t.Olmo2ForCausalLM),
        "gpt2": (t.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256), t.GPT2LMHeadModel),
    }


ARCHS = list(_configs())


def tiny_model(arch: str, tokenizer_dir, out):
    """A seeded random `arch` model with the tiny tokenizer (ChatML template, 512 tokens), saved as safetensors."""
    from transformers import AutoTokenizer

    config, cls = _configs()[arch]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cls(config)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def shared_models(tmp_path_factory):
    """One models dir for the architectures' installs, as a user's: they share one serving environment (built once,
    then reused: lib/install/runtime_env.py), each under its own name."""
    return tmp_path_factory.mktemp("models")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_installable_architecture_answers_through_start_sh(arch, tiny_chat_model, shared_models, tmp_path):
    model_dir = tiny_model(arch, tiny_chat_model, tmp_path / arch)
    report = check_model(str(model_dir), disk_path=tmp_path)
    v = report["verdict"]
    assert v["servable"] and v["runnable"], v["problems"]
    assert v["engine"] == ("torch" if arch == "llama" else "transformers")
    assert "/v1/chat/completions" in v["endpoints"]

    folder = install_model(str(model_dir), shared_models, name=arch.replace("_", "-"), echo=None)
    post = json.loads((folder / "model_info.json").read_text())["post_test"]
    assert post["ok"] and post["engine"].startswith(f"engine {v['engine']}"), post
    assert post["peak_rss_bytes"] > 0
    if arch not in ("llama", "gpt2"):  # the post-test ran start.sh; once more as the user does, for each engine
        return

    # the installed folder's server, as the user starts it (only a port added), in the install's own environment,
    # asked what apps send beyond a plain chat: a JSON-schema reply (llguidance, which the torch and transformers
    # engines constrain with, comes with a chat install's environment; a forced tool call: test_clients' router)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = MeasuredProcess(["sh", str(folder / "start.sh"), "--port", str(port)],
                             {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}, folder)
    try:
        wait_ready(server, url, 300)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        ask = {"model": name, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 120, "seed": 1}
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={**ask, "response_format": {
            "type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}})
        assert r.status_code == 200 and isinstance(json.loads(r.json()["choices"][0]["message"]["content"])["ok"],
                                                   bool), r.text
    finally:
        res = server.stop()
    assert f"engine {v['engine']}" in res["stderr"]
    # start.sh keeps what the server printed: the post-test's run, then this one
    log = (folder / "logs" / "server.log").read_text()
    assert log.count("--- ") == 2 and log.count(f"engine {v['engine']}") == 2


@pytest.mark.slow
def test_smollm2_gguf_is_installed_as_it_came_and_answers_through_llama_cpp(smollm2_gguf, shared_models, tmp_path):
    """A GGUF is served by llama.cpp: the install keeps the file (no fp32 HF copy) and its post-test answers
    through llama.cpp with the GGUF's own chat template."""
    report = check_model(str(smollm2_gguf), disk_path=tmp_path)
    assert report["verdict"]["engine"] == "llama.cpp" and report["verdict"]["runnable"]
    folder = install_model(str(smollm2_gguf), shared_models, name="smol", echo=None)
    assert not (folder / "model").exists() and (folder / "gguf" / smollm2_gguf.name).is_file()
    post = json.loads((folder / "model_info.json").read_text())["post_test"]
    assert post["engine"].startswith("engine llama.cpp") and "Paris" in post["text"], post
    # and start.sh's server (its header read by lib.check.gguf_meta to pick the engine) answers over HTTP
    reply = serve_and_chat(folder / "start.sh", prompt="What is the capital of France?", max_tokens=12)
    assert reply.strip() and "<|im_" not in reply, reply  # visible text, its own template applied


@pytest.mark.slow
def test_a_gemma3_base_gguf_without_a_chat_template_is_served_as_plain_completion(gemma3_gguf, tmp_path):
    """The Gemma 3 270M GGUF is the base model (no chat template; its vocabulary has Gemma's turn tokens, which it
    was not tuned on): it is served as plain completion with a warning, and answers the question rather than
    printing markup. 05_check sizes its memory at the context the server runs (serve.max_context), not at the
    model's 32,768 tokens."""
    report = check_model(str(gemma3_gguf), disk_path=tmp_path)
    v, inf = report["verdict"], report["estimates"]["inference"]
    assert v["engine"] == "llama.cpp" and v["runnable"] and report["estimates"]["context_length"] == 32768
    assert inf["seq_len"] == 4096
    write_report(report, tmp_path / "check")  # the install reuses it, as 06_install reuses 05_check's
    folder = install_model(str(gemma3_gguf), tmp_path / "models", name="gemma3", echo=None,
                           report_path=tmp_path / "check" / "report.json")
    assert not (folder / "model").exists()  # no fp32 copy of a GGUF that llama.cpp serves
    post = json.loads((folder / "model_info.json").read_text())["post_test"]
    assert post["engine"].startswith("engine llama.cpp") and "plain completion" in post["engine"], post
    res = subprocess.run(["sh", str(folder / "start.sh"), "--prompt", "What is the capital of France?", "--seed", "0",
                          "--device", "cpu", "--set", "serve.temperature=0.0", "--set", "serve.max_new_tokens=24"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Paris" in res.stdout and "<" not in res.stdout, res.stdout
    assert "warning: no chat template" in res.stderr
