"""Quantizing a causal LM at install (`06_install.py install MODEL --quantize q4_k_m|q5_k_m|q8_0|f16`) with llama.cpp's
own tools: its HF -> GGUF converter (convert_hf_to_gguf.py, which install.sh takes from the llama-cpp-python source
release into .venv/share/llama.cpp/) for safetensors models, then its quantizer (llama_model_quantize, through the
llama-cpp-python binding the server already uses). The install then holds the quantized GGUF, served by llama.cpp,
and the perplexity of the quantized model against its source on a short built-in text (PPL_TEXT).

    f16 = hf_to_gguf(hf_dir, tmp / "model-f16.gguf")
    q = quantize(f16, install / "gguf" / "model-Q4_K_M.gguf", "q4_k_m")
    perplexity(q), perplexity(f16)

Not here: the install itself (lib.install.installer), llama.cpp's converters (lib.export.llama_tools), what each
quantization weighs (lib.check.formulas).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from lib.errors import UserError
from lib.serving.llamacpp import LlamaCppModel, quiet_logs

# llama.cpp's file types (LLAMA_FTYPE_MOSTLY_*) by the names its quantize tool takes
# f16: no quantization, for an architecture transformers would serve slowly on a CPU: llama.cpp serves it whole
QUANT_TYPES = {"q4_k_m": 15, "q5_k_m": 17, "q8_0": 7, "f16": 1}
# A short English text to compare perplexities on (written for this project; no model was trained on it).
PPL_TEXT = (
    "The village stood at the edge of a wide valley, where the river slowed and spread into shallow pools. Every "
    "morning the baker opened his shop before the sun rose, and the smell of warm bread drifted down the narrow "
    "street. Children walked to school past the old stone bridge, stopping to throw pebbles into the water and count "
    "the rings. In the afternoon the market filled with farmers selling apples, cheese and honey, and the square grew "
    "loud with voices. When the evening came, families sat outside their houses, talking about the weather, the "
    "harvest and the news from the city. The teacher, who had lived there for forty years, said that nothing much "
    "ever changed in the valley, and that this was exactly why people loved it. Yet each spring a few young people "
    "packed their bags and took the early train, promising to write letters and to come back for the summer "
    "festival. Most of them kept their promise, at least for the first few years."
)


def quantize(src: Path, out: Path, qtype: str, threads: int | None = None) -> Path:
    """llama.cpp's quantizer: `src` (a GGUF, f16 or already quantized) as `qtype` at `out`."""
    if qtype not in QUANT_TYPES:
        raise UserError(f"--quantize {qtype}: expected one of {', '.join(QUANT_TYPES)}")
    import llama_cpp as L

    quiet_logs(L)  # the quantizer prints a line per tensor
    params = L.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = threads or len(os.sched_getaffinity(0))
    params.allow_requantize = True  # a GGUF that came quantized (its f16 source is not there to start from)
    rc = L.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0 or not out.is_file():
        raise UserError(f"{src}: llama.cpp's quantizer failed to make {qtype} (code {rc})")
    return out


def perplexity(gguf: Path, text: str = PPL_TEXT) -> float:
    """exp(mean negative log-likelihood) of `text`'s tokens under the GGUF model, through llama.cpp."""
    model = LlamaCppModel(gguf, n_ctx_seq=512, n_seq=1)
    try:
        ids = model.tokenize(text, bos=True)
        logps, _ = model.token_logprobs(ids, 1)
    finally:
        model.close()
    return math.exp(-sum(logps) / len(logps))
