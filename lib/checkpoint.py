"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a directory `step-00000123/` holding
  tensors.safetensors   model weights (`model.<name>`), optimizer moments (`optim.<i>.<key>`), torch RNG state
  state.json            step, counters, data position, best val loss, python/numpy RNG states, optimizer hyperparameters
written into a temp dir and renamed into place, then `latest` (a text file naming it) is replaced atomically.
So a `kill -9` at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lib.artifacts import atomic_write_text

LATEST = "latest"


def _rng_state() -> tuple[dict, dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    for name, val in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(ckpt_root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` under ckpt_root atomically; keep the newest `keep` (and `best/`)."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.tmp-"))
    try:
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        rng_tensors, rng_meta = _rng_state()
        # tied weights share storage; safetensors refuses shared tensors, so store clones
        save_file({k: v.clone() for k, v in {**tensors, **opt_tensors, **rng_tensors}.items()},
                  str(tmp / "tensors.safetensors"))
        meta = {"step": step, "state": state, "optimizer": opt_meta, "rng": rng_meta}
        (tmp / "state.json").write_text(json.dumps(meta))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(root / LATEST, name + "\n")
    old = sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return final


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Model weights alone (e.g. the best eval so far), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    root = Path(ckpt_root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore model, optimizer and RNG states in place; return the loop state dict saved with them."""
    path = Path(path)
    tensors = load_file(str(path / "tensors.safetensors"))
    meta = json.loads((path / "state.json").read_text())
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_sd, strict=True)
    if optimizer is not None:
        _load_optimizer(optimizer, tensors, meta["optimizer"])
    _set_rng_state(tensors, meta["rng"])
    return {"step": meta["step"], **meta["state"]}
