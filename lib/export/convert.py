"""Import a GGUF model (llama.cpp / Ollama format) as a plain Hugging Face folder.

transformers can read GGUF files: it dequantizes every tensor and rebuilds config + tokenizer from the GGUF
metadata. We save that result as an ordinary HF directory (config.json, model.safetensors, tokenizer files,
chat template), so the rest of the pipeline (check, install, serve, LoRA) sees a normal model. Not for export
in the other direction (HF -> GGUF): that is lib/export's job.
"""

from __future__ import annotations

import os
from pathlib import Path

from lib.atomic import atomic_dir, current_umask
from lib.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert `gguf_path` into the HF folder `out_dir` (created atomically: temp dir + rename).

    dtype: what the dequantized weights are stored as. float32 (default) keeps the dequantized values exactly;
    bfloat16/float16 halve the size on disk.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser().resolve(), Path(out_dir).expanduser()
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: GGUF file not found")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{gguf_path}: not a GGUF file (it does not start with the 'GGUF' magic bytes)")
    if dtype not in DTYPES:
        raise UserError(f"gguf_to_hf dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: output directory exists and is not empty; choose a new path or remove it")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    except (ValueError, KeyError, RuntimeError) as e:
        # transformers raises ValueError for architectures it cannot dequantize/rebuild from GGUF
        raise UserError(f"{gguf_path}: transformers cannot import this GGUF file ({e}). Supported architectures "
                        "are those listed in transformers.integrations.ggml.GGUF_CONFIG_MAPPING.") from None
    # The loaded model still says "quantized with gguf" although its tensors are plain dequantized ones:
    # save_pretrained refuses a non-serialisable quantizer, and a loader seeing quantization_config in
    # config.json would look for the GGUF file. Both markers go.
    model.hf_quantizer = None
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, key):
            delattr(model.config, key)
    model.config.dtype = dtype

    with atomic_dir(out_dir, mode=0o755) as tmp:  # an existing `out_dir` is empty (checked above)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        umask = current_umask()
        for p in tmp.iterdir():  # safetensors makes private files; these are ordinary ones
            os.chmod(p, (0o755 if p.is_dir() else 0o644) & ~umask)
    return out_dir
