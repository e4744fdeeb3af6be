"""Run under torchrun (2 CPU processes, gloo): train a tiny HomeLLM sharded with FSDP2, checkpointing through
lib.train.checkpoint — the functions lib.train.loop.fit calls — and optionally resume from a checkpoint. Writes the whole
final weights (gathered) to OUT/final.safetensors. Used by tests/test_sharded.py.

    PYTHONPATH=. torchrun --nproc_per_node 2 tests/helpers/fsdp_resume.py OUT STEPS [--save-at N] [--resume CKPT] [--dropout P]
    PYTHONPATH=. python tests/helpers/fsdp_resume.py OUT STEPS --single ...     # the same, one process, unsharded
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from lib.config import ModelConfig
from lib.model.homellm import HomeLLM, model_args
from lib.train.checkpoint import load_checkpoint, save_checkpoint, save_weights


def batch(step: int, rank: int, world: int) -> torch.Tensor:
    """The global batch of 4 sequences for `step`, this process's share of it (a pure function, like TokenWindows)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 128, (4, 16), generator=g)
    return x[rank * 4 // world:(rank + 1) * 4 // world]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("steps", type=int)
    p.add_argument("--save-at", type=int, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--single", action="store_true", help="one process, no sharding (the reference)")
    a = p.parse_args()
    torch.set_num_threads(1)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if not a.single:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(0)
    model = HomeLLM(model_args(ModelConfig(preset="tiny", max_seq_len=64, dropout=a.dropout), vocab_size=128))
    if not a.single:
        mesh = init_device_mesh("cpu", (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"  # really sharded
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    torch.manual_seed(100 + rank)  # per-process RNG streams (dropout), restored on resume
    start = 0
    if a.resume:
        start = load_checkpoint(a.resume, model, opt)["step"]
    for step in range(start, a.steps):
        x = batch(step, rank, world)
        _, loss = model(x, targets=x)
        loss.backward()  # FSDP averages the gradients over the processes: the mean over the global batch
        opt.step()
        opt.zero_grad(set_to_none=True)
        if a.save_at is not None and step + 1 == a.save_at:
            save_checkpoint(Path(a.out) / "ckpt", step + 1, model, opt, {"note": "fsdp"}, is_main=rank == 0)
    save_weights(model, Path(a.out) / "final.safetensors", is_main=rank == 0)
    if dist.is_initialized():
        dist.barrier()  # both ranks tear down together: a rank leaving while the other still writes once aborted
        dist.destroy_process_group()  # ("terminate called without an active exception", exit -6, once in a full suite)


if __name__ == "__main__":
    main()
