"""bench/bench_gpu.sh, the GPU checks prepared for a lent GPU machine, runs end to end on this CPU in its dry mode:
the training-step benchmark eager and compiled, FSDP and DeepSpeed ZeRO-2 pretraining interrupted and resumed through
`accelerate launch`, LoRA of the model they trained (on a GPU: QLoRA of SmolLM2)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_bench_gpu_dry_run_passes_on_the_cpu(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "bench" / "bench_gpu.sh"), "--dry"], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "WORK": str(tmp_path), "PYTHON": sys.executable})
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    assert "ours, compiled (blocks + loss)" in out and "matmul peak (" in out
    for launcher in ("fsdp", "deepspeed_zero2"):
        assert f"{launcher}: received signal 15: checkpoint saved at step" in out
        assert f"{launcher}: resuming from" in out and f"{launcher}: done: stopped at step 40" in out
    assert "## 3. LoRA of the tiny model pretrained above" in out and "instruction-tuned model:" in out
    assert not (tmp_path / "xdg").exists() or not any((tmp_path / "xdg").rglob("*.json"))  # nothing written to ~
