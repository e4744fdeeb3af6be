"""Sharded training saves complete state: a HomeLLM sharded with FSDP2 over two CPU processes (torchrun, gloo)
checkpoints through lib.train.checkpoint — gathered whole, written once — and resumes exactly: model, optimizer, each
process's RNG (dropout) and the step. accelerate shards only on GPUs, so here torch's FSDP2 is driven directly;
lib.train.loop.fit calls the same functions under accelerate's FSDP config."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

HELPER = ROOT / "tests" / "helpers" / "fsdp_resume.py"
pytestmark = pytest.mark.slow


def run(out: Path, steps: int, *args, single: bool = False) -> dict:
    if single:
        cmd = [sys.executable, str(HELPER), str(out), str(steps), "--single", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HELPER), str(out), str(steps), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={"PYTHONPATH": str(ROOT),  # the helper imports lib
                                                                                 "OMP_NUM_THREADS": "1",
                                                                                 "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return load_file(str(out / "final.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fsdp_checkpoint_is_whole_and_resume_is_exact(tmp_path):
    # with dropout: each process's RNG stream must come back too
    whole = run(tmp_path / "whole", 6, "--dropout", 0.1)
    saved = run(tmp_path / "saved", 6, "--save-at", 3, "--dropout", 0.1)
    assert max_diff(saved, whole) == 0.0  # saving does not disturb training
    ckpt = tmp_path / "saved" / "ckpt" / "step-00000003"
    tensors = load_file(str(ckpt / "tensors.safetensors"))
    # whole tensors, not shards: the full embedding and each AdamW moment under the parameter's name
    assert tensors["model.model.embed_tokens.weight"].shape == (128, 64)
    assert tensors["optim.model.embed_tokens.weight.exp_avg"].shape == (128, 64)
    assert {"rng.0.torch", "rng.1.torch"} <= set(tensors)
    resumed = run(tmp_path / "resumed", 6, "--resume", ckpt, "--dropout", 0.1)
    assert max_diff(resumed, whole) <= 1e-6


def test_fsdp_matches_one_process_and_its_checkpoint_resumes_unsharded(tmp_path):
    single = run(tmp_path / "single", 6, single=True)
    sharded = run(tmp_path / "sharded", 6, "--save-at", 3)
    assert max_diff(sharded, single) <= 1e-5  # gathered weights are the whole model, not rank 0's shard
    resumed = run(tmp_path / "resumed", 6, "--resume", tmp_path / "sharded" / "ckpt" / "step-00000003", single=True)
    assert max_diff(resumed, single) <= 1e-5
    assert torch.equal(sharded["lm_head.weight"], sharded["model.embed_tokens.weight"])  # still tied
