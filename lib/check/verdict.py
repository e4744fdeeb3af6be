"""What a model needs here and whether it fits: libraries and special packages, the memory verdict per device and
dtype against the probed hardware, and the recommended way to run it."""

from __future__ import annotations

import importlib.metadata
import re

from lib.check.detect import HYBRID_SSM_TYPES, SSM_TYPES, Detection
from lib.check.formulas import FRAMEWORK_BYTES, GPU_CONTEXT_BYTES, TORCH_DTYPE, fmt_bytes
from lib.check.source import Source
from lib.handlers import is_hf_whisper

# "close to limit" above this share of the available memory
CLOSE_TO_LIMIT = 0.85


# ---------------------------------------------------------------------------------------------------------
# Requirements: libraries by type, special packages by architecture, dtype and quantization.

SPECIAL_PACKAGES = {
    "mamba-ssm": ("mamba_ssm", "hard: Linux + NVIDIA GPU + CUDA toolkit; compiles CUDA kernels from source (10-30 "
                  "min) unless a prebuilt wheel matches your torch/CUDA. Optional: transformers falls back to a slow "
                  "pure-PyTorch path (the only one on CPU)"),
    "causal-conv1d": ("causal_conv1d", "hard: NVIDIA GPU + CUDA toolkit, compiles from source; optional like "
                      "mamba-ssm"),
    "flash-attn": ("flash_attn", "hard: NVIDIA Ampere or newer GPU; compiles for a long time unless a prebuilt wheel "
                   "matches torch/CUDA. Optional: transformers uses PyTorch SDPA attention without it"),
    "bitsandbytes": ("bitsandbytes", "easy on Linux + NVIDIA GPU (pip wheel); CPU support is limited"),
    "gptqmodel": ("gptqmodel", "medium: needs a GPU and compiles kernels on install"),
    "optimum": ("optimum", "easy (pip wheel)"),
    "autoawq": ("awq", "medium: NVIDIA GPU only"),
    "compressed-tensors": ("compressed_tensors", "easy (pip wheel)"),
    "hqq": ("hqq", "easy (pip wheel)"),
    "ninja": ("ninja", "easy (pip wheel); with a CUDA toolkit it builds RWKV's fast kernel at first use"),
    "gguf": ("gguf", "easy (pip wheel, pure Python); transformers uses it to dequantize GGUF files"),
}
QUANT_PACKAGES = {"bitsandbytes": ["bitsandbytes"], "gptq": ["optimum", "gptqmodel"], "awq": ["autoawq"],
                  "compressed-tensors": ["compressed-tensors"], "hqq": ["hqq"]}


def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirements(src: Source, det: Detection) -> dict:
    libs = [("torch", "tensors and the forward pass")]
    task_libs = {
        "text-generation": [("transformers", "loads the model and generates"), ("accelerate", "low-memory loading")],
        "embedding": [("transformers", "loads the encoder")],
        "seq2seq": [("transformers", "encoder-decoder model")],
        "multimodal": [("transformers", "vision-language model"), ("pillow", "image input")],
        "text-to-image": [("diffusers", "the pipeline"), ("transformers", "text encoders"),
                          ("accelerate", "low-memory loading")],
        "automatic-speech-recognition": [("transformers", "speech model"), ("soundfile", "audio input"),
                                         ("librosa", "audio resampling")],
        "image-text-embedding": [("transformers", "CLIP-style model"), ("pillow", "image input")],
    }
    if det.loader == "faster-whisper":
        libs.append(("faster-whisper", "runs the CTranslate2 Whisper model (ctranslate2, av)"))
    elif is_hf_whisper(det.full_config, det.loader):
        libs += [("transformers", "reads the model to convert it"),
                 ("faster-whisper", "runs it, converted to CTranslate2 at install (ctranslate2, av)")]
    elif det.loader == "llama.cpp":
        libs.append(("llama-cpp-python", "runs the GGUF model"))
    else:
        libs += task_libs.get(det.task, [("transformers", det.task)] if det.loader == "transformers" else [])
    if det.loader == "sentence-transformers":
        libs.append(("sentence-transformers", "pooling/normalisation modules (modules.json)"))
    files = src.files
    if "tokenizer.model" in files and "tokenizer.json" not in files:
        libs.append(("sentencepiece", "tokenizer.model (SentencePiece) without tokenizer.json"))
    if any(f.endswith(".tiktoken") for f in files):
        libs.append(("tiktoken", "*.tiktoken vocabulary"))
    if any(f.endswith(".safetensors") for f in files):
        libs.append(("safetensors", "weights format"))
    special: list[tuple[str, str, bool]] = []  # (package, why, optional)
    mt = det.full_config.get("model_type") or det.family
    if mt in SSM_TYPES or mt in HYBRID_SSM_TYPES:
        special += [("mamba-ssm", f"{mt}: fast selective-scan kernels", True),
                    ("causal-conv1d", f"{mt}: fast causal convolution", True)]
    if mt == "rwkv":
        special.append(("ninja", "rwkv: optional fast CUDA kernel", True))
    attn_impl = det.full_config.get("_attn_implementation") or det.full_config.get("attn_implementation")
    if attn_impl == "flash_attention_2":
        special.append(("flash-attn", "config asks for flash_attention_2", True))
    quant = det.full_config.get("quantization_config") or (det.config or {}).get("quantization_config")
    qmethod = quant.get("quant_method") if isinstance(quant, dict) else None
    for pkg in QUANT_PACKAGES.get(qmethod or "", []):
        special.append((pkg, f"weights quantized with {qmethod}", False))
    if src.kind == "gguf":
        special.append(("gguf", "reading the GGUF file", False))
    out_libs = [{"name": n, "why": w, "installed": _installed(n)} for n, w in dict(libs).items()]
    out_special = [{"name": n, "why": w, "optional": opt, "installed": _installed(n),
                    "difficulty": SPECIAL_PACKAGES.get(n, (None, "see the package's documentation"))[1]}
                   for n, w, opt in special]
    warnings = []
    saved_with = det.full_config.get("transformers_version")
    have = _installed("transformers")
    if saved_with and have and det.loader == "transformers" and _version_tuple(saved_with) > _version_tuple(have):
        warnings.append(f"saved with transformers {saved_with}, newer than the installed {have}: "
                        "upgrade transformers if loading fails")
    return {"libraries": out_libs, "special": out_special, "quantization": quant if isinstance(quant, dict) else None,
            "remote_code": "auto_map" in det.full_config, "warnings": warnings}


def _version_tuple(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


# ---------------------------------------------------------------------------------------------------------
# Compatibility with this machine.


def _fit_notes(need: int, avail: int | None) -> tuple[bool, list[str]]:
    if avail is None:
        return False, ["free memory unknown"]
    if need > avail:
        return False, [f"does not fit: needs {fmt_bytes(need)}, {fmt_bytes(avail)} available"]
    if need > CLOSE_TO_LIMIT * avail:
        return True, [f"close to limit ({need / avail:.0%} of available memory)"]
    return True, []


def compatibility(det: Detection, est: dict, hw: dict) -> dict:
    devices = [{"device": "cpu", "available": hw["ram"]["available_bytes"], "gpu": None}]
    for g in hw["gpus"]:
        devices.append({"device": f"cuda:{g['index']}", "available": g.get("vram_free_bytes") or g["vram_total_bytes"],
                        "gpu": g})
    rows = []
    if est["inference"] is None:
        return {"inference": [], "training": []}
    inf = est["inference"]["by_dtype"]
    for dev in devices:
        for dt, e in inf.items():
            if dev["gpu"] is None:
                need = e["total"] + FRAMEWORK_BYTES
            else:
                # a GPU holds every weight (copied to the device, never mapped), but none of the host-side extras
                need = (e["total"] + e.get("mapped_not_read", 0) - e["runtime_overhead"] - e["load_transient"]
                        - e.get("tokenizer", 0) + GPU_CONTEXT_BYTES)
            fits, notes = _fit_notes(need, dev["available"])
            if dev["gpu"] is None:
                if dt == "fp16":
                    notes.append("fp16 matmuls are slow on CPU: prefer fp32 or bf16")
                if dt == "bf16" and not hw["cpu"]["bf16"]:
                    notes.append("no native bf16 on this CPU (no AVX512-BF16/AMX): works, but slower than fp32")
                if dt in ("int8", "int4"):
                    notes.append("via GGUF + llama.cpp/Ollama (transformers' int8/int4 needs a GPU)")
            else:
                g = dev["gpu"]
                if dt == "bf16" and g.get("bf16") is False:
                    notes.append("this GPU has no bf16: use fp16")
                if dt in ("int8", "int4"):
                    notes.append("via bitsandbytes (pip install bitsandbytes) or GGUF")
                if hw.get("gpu_usable_by_torch") is False:
                    fits = False
                    notes.append("the installed torch is CPU-only: install a CUDA build of torch to use this GPU")
            rows.append({"device": dev["device"], "dtype": dt, "need_bytes": int(need),
                         "available_bytes": dev["available"], "fits": fits, "notes": notes})
    # "requires quantization": a device where no 16/32-bit dtype fits but int8/int4 does
    for dev in devices:
        drows = [r for r in rows if r["device"] == dev["device"]]
        if not any(r["fits"] for r in drows if r["dtype"] in ("fp32", "fp16", "bf16")):
            for r in drows:
                if r["fits"]:
                    r["notes"].insert(0, "requires quantization")
    training = []
    if "training" in est:
        for dev in devices:
            key = "cpu" if dev["gpu"] is None else "gpu"
            t = est["training"][key]
            for mode in ("lora", "full"):
                base = FRAMEWORK_BYTES if key == "cpu" else GPU_CONTEXT_BYTES
                need = t[mode]["total"] + base
                need_ckpt = t[mode]["total_with_grad_checkpointing"] + base
                fits, notes = _fit_notes(need, dev["available"])
                if not fits and need_ckpt <= (dev["available"] or 0):
                    fits, notes = True, [f"only with gradient checkpointing (needs {fmt_bytes(need_ckpt)})"]
                if key == "gpu" and hw.get("gpu_usable_by_torch") is False:
                    fits = False
                    notes.append("the installed torch is CPU-only")
                if key == "cpu" and fits:
                    notes.append("slow on CPU: fine for small models and short runs")
                training.append({"device": dev["device"], "mode": mode, "batch_size": t["batch_size"],
                                 "seq_len": t["seq_len"], "need_bytes": int(need), "need_bytes_grad_checkpointing":
                                 int(need_ckpt), "available_bytes": dev["available"], "fits": fits, "notes": notes})
    return {"inference": rows, "training": training}


def recommend(rows: list[dict], det: Detection, hw: dict) -> dict | None:
    """The best way to run it here with transformers: a GPU in 16-bit, else CPU fp32 (bf16 if native)."""
    order = []
    for g in hw["gpus"]:
        dev = f"cuda:{g['index']}"
        order += [(dev, "bf16" if g.get("bf16") else "fp16"), (dev, "fp16"), (dev, "int8"), (dev, "int4")]
    order += [("cpu", "bf16")] if hw["cpu"]["bf16"] else []
    order += [("cpu", "fp32"), ("cpu", "bf16"), ("cpu", "fp16")]
    by_key = {(r["device"], r["dtype"]): r for r in rows}
    for key in order:
        r = by_key.get(key)
        if r and r["fits"]:
            return {"device": key[0], "dtype": key[1], "torch_dtype": TORCH_DTYPE.get(key[1], key[1])}
    return None
