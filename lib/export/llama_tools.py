"""llama.cpp's own converters, run as it ships them: HF -> GGUF (convert_hf_to_gguf.py, any architecture llama.cpp
knows) and a PEFT LoRA adapter -> a llama.cpp LoRA GGUF (convert_lora_to_gguf.py). install.sh takes them from the
llama-cpp-python source release into .venv/share/llama.cpp/ (LLAMA_CPP_TOOLS), and an install's environment takes
them along, so that start.sh --adapter can convert an adapter for llama.cpp.

    hf_to_gguf(hf_dir, out / "model-f16.gguf")            # 06_install.py --quantize's first step
    lora_to_gguf(adapter_dir, base_hf_dir, out / "lora.gguf")  # serving an adapter on the llama.cpp engine

Not here: our own GGUF writer for HomeLLM exports (lib.export.gguf), quantizing (lib.install.quantize).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lib.errors import UserError

LLAMA_CPP_TOOLS = Path(sys.prefix) / "share" / "llama.cpp"
CONVERTER = LLAMA_CPP_TOOLS / "convert_hf_to_gguf.py"
LORA_CONVERTER = LLAMA_CPP_TOOLS / "convert_lora_to_gguf.py"


def hf_to_gguf(hf_dir: Path, out: Path, outtype: str = "f16", label: str | None = None) -> Path:
    """llama.cpp's converter run on `hf_dir` (any architecture it knows): a GGUF at `out`. A UserError, naming the
    model as `label` (default: hf_dir), says why not."""
    return _convert(CONVERTER, [str(hf_dir)], out, outtype, label or str(hf_dir),
                    "Install it without --quantize to serve it through transformers.")


def lora_to_gguf(adapter_dir: Path, base_dir: Path, out: Path, label: str | None = None) -> Path:
    """A PEFT LoRA adapter as a llama.cpp LoRA GGUF (llama.cpp applies it over the GGUF it was trained for);
    `base_dir` is the HF folder (config) of that model."""
    return _convert(LORA_CONVERTER, ["--base", str(base_dir), str(adapter_dir)], out, "f32", label or str(adapter_dir),
                    "Serve it merged instead: start.sh --adapter NAME --engine torch.")


def _convert(script: Path, args: list[str], out: Path, outtype: str, label: str, instead: str) -> Path:
    if not script.is_file():
        raise UserError(f"{script}: llama.cpp's converter is not installed; run ./install.sh (it fetches it from "
                        f"the llama-cpp-python source release). {instead}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, the version it was written with
    res = subprocess.run([sys.executable, str(script), *args, "--outfile", str(out), "--outtype", outtype],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0 or not out.is_file():
        lines = [line for line in res.stderr.strip().splitlines() if line.strip() and not line.startswith("INFO")]
        raise UserError(f"{label}: llama.cpp's converter ({script.name}) cannot convert this model: "
                        f"{lines[-1] if lines else 'exit code ' + str(res.returncode)}. {instead}")
    return out
