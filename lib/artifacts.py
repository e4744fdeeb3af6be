"""Artifact directories: the manifest, and staging a stage's output so it appears complete or not at all.

Contract: an artifact directory is complete iff its `manifest.json` exists. A stage writes into a hidden
temporary directory beside the final one and renames it into place at the end, manifest included, so a
crash, Ctrl+C or `kill -9` never leaves a directory that looks finished.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import platform
import resource
import shutil
import subprocess
import time
from pathlib import Path

from lib.atomic import atomic_dir, atomic_write_json
from lib.config import Config
from lib.errors import UserError
from lib.stages import stage_config, stage_dir, stage_hash, upstream_hashes

MANIFEST = "manifest.json"
PACKAGES = ("torch", "numpy", "tokenizers", "transformers", "datasets", "accelerate", "peft", "safetensors",
            "snakemake", "gguf", "huggingface-hub")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far. VmHWM is this process's own peak; ru_maxrss (the fallback,
    KiB on Linux) can carry over a parent's peak into a forked child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@contextlib.contextmanager
def stage_output(cfg: Config, stage: str):
    """Yield (tmp_dir, manifest_extra). On success the manifest is written and tmp_dir renamed to the stage dir.

    Put counts and figures into `manifest_extra` (a dict); they land in manifest.json.
    """
    final = stage_dir(cfg, stage)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed run (kill -9 skips cleanup)
        shutil.rmtree(stale, ignore_errors=True)
    extra: dict = {}
    start = time.time()
    # an existing `final` is an incomplete leftover, or an empty dir Snakemake created for the output
    with atomic_dir(final) as tmp:
        yield tmp, extra
        manifest = {
            "stage": stage,
            "config_name": cfg.name,  # what a user calls the run this stage belongs to (not hashed)
            "hash": stage_hash(cfg, stage),
            "upstream": upstream_hashes(cfg, stage),
            "config": stage_config(cfg, stage),
            "versions": package_versions(),
            "git_commit": git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_time_s": round(time.time() - start, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            **extra,
        }
        atomic_write_json(tmp / MANIFEST, manifest)


def require_stage(cfg: Config, stage: str, hint: str) -> Path:
    """The directory of a finished upstream stage, or a UserError saying how to produce it."""
    path = stage_dir(cfg, stage)
    if not is_complete(path):
        raise UserError(f"{path}: the {stage} stage has not been run for this config (no {MANIFEST}). {hint}")
    return path
