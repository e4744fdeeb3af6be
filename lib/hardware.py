"""What this machine has: CPU cores, RAM, GPUs with their memory, free disk. Used by the model check
(lib/check.py) to say whether a model fits. Probing only reads system counters; it never allocates memory
on a device. torch is imported only if it is already installed (it is optional here)."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
from pathlib import Path

import psutil


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _gpus_torch() -> list[dict] | None:
    """GPUs as torch sees them (None when torch is missing or was built without CUDA/ROCm)."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:  # device busy / exclusive mode: report total only
            free, total = None, props.total_memory
        gpus.append({"index": i, "name": props.name, "vram_total_bytes": int(total),
                     "vram_free_bytes": None if free is None else int(free),
                     "compute_capability": f"{props.major}.{props.minor}",
                     "bf16": bool(torch.cuda.is_bf16_supported()) if i == 0 else None, "source": "torch"})
    return gpus


def _gpus_nvidia_smi() -> list[dict]:
    """GPUs from nvidia-smi: catches a GPU that a CPU-only torch cannot see (worth telling the user)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        res = subprocess.run([exe, "--query-gpu=index,name,memory.total,memory.free,compute_cap",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in res.stdout.splitlines() if res.returncode == 0 else []:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        try:
            mib = 1024 ** 2
            cc = parts[4] if len(parts) > 4 else None
            gpus.append({"index": int(parts[0]), "name": parts[1], "vram_total_bytes": int(float(parts[2]) * mib),
                         "vram_free_bytes": int(float(parts[3]) * mib), "compute_capability": cc,
                         "bf16": (float(cc) >= 8.0) if cc and cc.replace(".", "").isdigit() else None,
                         "source": "nvidia-smi"})
        except ValueError:
            continue
    return gpus


def probe_hardware(disk_path: str | Path = ".") -> dict:
    """CPU, RAM, GPUs and free disk at `disk_path` (its nearest existing parent)."""
    vm = psutil.virtual_memory()
    flags = _cpu_flags()
    gpus = _gpus_torch()
    torch_sees_gpu = gpus is not None
    if gpus is None:
        gpus = _gpus_nvidia_smi()
    p = Path(disk_path).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    disk = shutil.disk_usage(p)
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    return {
        "cpu": {
            "name": _cpu_name(),
            "arch": platform.machine(),
            "cores": psutil.cpu_count(logical=False) or psutil.cpu_count(),
            "threads": psutil.cpu_count(logical=True),
            "usable_threads": affinity,
            # native bf16 matmuls on CPU (otherwise bf16 works but is emulated and slow)
            "bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
            "avx2": "avx2" in flags,
            "avx512": "avx512f" in flags,
        },
        "ram": {"total_bytes": int(vm.total), "available_bytes": int(vm.available)},
        "gpus": gpus,
        # a GPU listed by nvidia-smi but not usable by the installed torch (CPU-only build)
        "gpu_usable_by_torch": torch_sees_gpu,
        "disk": {"path": str(p), "free_bytes": int(disk.free), "total_bytes": int(disk.total)},
        "os": f"{platform.system()} {platform.release()}",
    }
