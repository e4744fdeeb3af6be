"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory `step-00000123/` holding
  tensors.safetensors   model weights (`model.<name>`), optimizer moments (`optim.<param name>.<key>`), RNG states
  state.json            step, counters, data position, best val loss, python/numpy RNG states, optimizer hyperparameters
written into a temp dir and renamed into place, then `latest` (a text file naming it) is replaced atomically.
So a `kill -9` at any moment leaves either the previous checkpoint or the new one, never half of one.

Sharded training (FSDP, and DDP alike) is handled by torch's distributed state-dict API: every process takes part
in gathering the full model and optimizer state (`full_state_dict`, offloaded to CPU), the main process writes it,
and on resume every process reads the same files and keeps its own shard. The files are the same whatever the
number of processes or the sharding, so a run may resume with another layout. Optimizer state is keyed by
parameter name, not position. Functions marked "collective" must be called by every process.

DeepSpeed keeps its ZeRO partitions to itself: there the weights are gathered with accelerate's get_state_dict, and
the optimizer partitions go into `step-*/deepspeed/` through accelerate's save_state / load_state (DeepSpeed's own
format; it needs the same number of processes to resume).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lib.atomic import atomic_dir, atomic_file, atomic_write_text

LATEST = "latest"
FORMAT = 2  # 1: optimizer state keyed by position (before sharded training was supported)
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
SCATTER = StateDictOptions(full_state_dict=True)


def _rng_state() -> tuple[dict, dict]:
    """This process's RNG states: torch (+ CUDA) as tensors, python and numpy as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _all_rng_states() -> tuple[dict, list]:
    """Every process's RNG states (collective): tensors `rng.<rank>.<name>`, and a JSON list indexed by rank."""
    mine = _rng_state()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    tensors = {f"rng.{r}.{k}": v for r, (t, _) in enumerate(everyone) for k, v in t.items()}
    return tensors, [m for _, m in everyone]


def _set_rng_state(tensors: dict, meta, fmt: int) -> None:
    """Restore this process's RNG states (rank 0's when the run had fewer processes before)."""
    if fmt == 1:
        prefix = "rng."
    else:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        rank = rank if rank < len(meta) else 0
        prefix, meta = f"rng.{rank}.", meta[rank]
    torch.set_rng_state(tensors[prefix + "torch"])
    cuda = sorted(k for k in tensors if k.startswith(prefix + "cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _is_deepspeed(accelerator) -> bool:
    return accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED


def full_model_state(model: torch.nn.Module, accelerator=None) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, under the unwrapped module's names (collective; when distributed, only
    rank 0 receives them and the others get {})."""
    if _is_deepspeed(accelerator):
        return {k: v.cpu() for k, v in accelerator.get_state_dict(model).items()}
    return get_model_state_dict(model, options=GATHER)


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The whole optimizer state keyed by parameter name (collective): tensors, and the rest as JSON."""
    sd = get_optimizer_state_dict(model, optimizer, options=GATHER)
    if not sd:  # gathered onto rank 0 only (cpu_offload): the other processes have nothing to write
        return {}, {}
    tensors, scalars = {}, {}
    for fqn, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{fqn}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{fqn}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict,
                    fmt: int) -> None:
    state: dict = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            fqn, key = name[len("optim."):].rsplit(".", 1)  # state keys (exp_avg, step) hold no dots
            state.setdefault(fqn, {})[key] = val
    for name, val in meta["scalars"].items():
        fqn, key = name.rsplit(".", 1)
        state.setdefault(fqn, {})[key] = val
    if fmt == 1:  # positions: only ever written by unsharded runs, which torch's own loader understands
        optimizer.load_state_dict({"state": {int(k): v for k, v in state.items()},
                                   "param_groups": meta["param_groups"]})
        return
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["param_groups"]},
                             options=SCATTER)


def save_checkpoint(ckpt_root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2, is_main: bool = True, accelerator=None) -> Path:
    """Write checkpoint `step` under ckpt_root atomically; keep the newest `keep`. Collective: every process
    gathers, the main one writes."""
    root = Path(ckpt_root)
    name = f"step-{step:08d}"
    tensors = {f"model.{k}": v for k, v in full_model_state(model, accelerator).items()}
    engine_dir = root / f".{name}.deepspeed"
    if _is_deepspeed(accelerator):  # each process writes its own partition
        accelerator.save_state(str(engine_dir))
        opt_tensors, opt_meta = {}, {"deepspeed": "deepspeed/"}
    else:
        opt_tensors, opt_meta = _optimizer_tensors(model, optimizer)
    rng_tensors, rng_meta = _all_rng_states()
    if not is_main:
        return root / name
    final = root / name
    with atomic_dir(final) as tmp:
        # tied weights share storage; safetensors refuses shared tensors, so store clones
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in {**tensors, **opt_tensors, **rng_tensors}.items()},
                  str(tmp / "tensors.safetensors"))
        meta = {"format": FORMAT, "step": step, "state": state, "optimizer": opt_meta, "rng": rng_meta}
        (tmp / "state.json").write_text(json.dumps(meta))
        if engine_dir.exists():
            os.replace(engine_dir, tmp / "deepspeed")
    atomic_write_text(root / LATEST, name + "\n")
    old = sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def save_weights(model: torch.nn.Module, path: str | Path, is_main: bool = True, accelerator=None) -> None:
    """Model weights alone (the best eval so far, the last step), atomically. Collective, like save_checkpoint."""
    weights = full_model_state(model, accelerator)
    if not is_main:
        return
    with atomic_file(path) as tmp:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, str(tmp))


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    root = Path(ckpt_root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    accelerator=None) -> dict:
    """Restore model, optimizer and RNG states in place; return the loop state dict saved with them. Collective:
    every process reads the same files and keeps its own shard."""
    path = Path(path)
    tensors = load_file(str(path / "tensors.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    fmt = meta.get("format", 1)
    if _is_deepspeed(accelerator):  # weights and optimizer partitions from DeepSpeed's own files
        accelerator.load_state(str(path / "deepspeed"))
    else:
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        set_model_state_dict(model, model_sd, options=SCATTER)
        if optimizer is not None:
            _load_optimizer(model, optimizer, tensors, meta["optimizer"], fmt)
    _set_rng_state(tensors, meta["rng"], fmt)
    return {"step": meta["step"], **meta["state"]}
