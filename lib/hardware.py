"""What this machine has: CPU cores, RAM, GPUs with their memory, free disk, and whether the CPU multiplies bf16
natively. The model check (lib/check/) judges against it, and its precision policy (training_precision, below) is the one
the trainer, 05_check and the studio use.
Probing only reads system counters; it never allocates memory on a device. torch is imported only if it is already
installed (it is optional here).

The environment variable MODELS_AT_HOME_HARDWARE overrides what the probe finds, so that tests judge against the
hardware they name instead of the machine they happen to run on: a JSON object merged into the probe's result
(`{"cpu": {"bf16": false}, "gpus": []}`) or one of the PROFILES by name (`cpu-bf16`, `cpu-fp32`). Child processes
(Snakemake jobs, the install's post-test) inherit it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import psutil

from lib.config import merge
from lib.errors import UserError


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


HARDWARE_ENV = "MODELS_AT_HOME_HARDWARE"

# Named overrides for tests and for trying a policy on purpose: a CPU with and without bf16 matrix units, no GPU.
PROFILES = {
    "cpu-bf16": {"cpu": {"bf16": True}, "gpus": [], "gpu_usable_by_torch": False},
    "cpu-fp32": {"cpu": {"bf16": False}, "gpus": [], "gpu_usable_by_torch": False},
}


def hardware_overrides() -> dict:
    """The override from MODELS_AT_HOME_HARDWARE ({} when unset); a bad value is a clear error, never ignored."""
    raw = os.environ.get(HARDWARE_ENV, "").strip()
    if not raw:
        return {}
    if raw in PROFILES:
        return PROFILES[raw]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UserError(f"{HARDWARE_ENV}={raw[:80]!r}: expected a profile name ({', '.join(PROFILES)}) or a JSON "
                        'object such as {"cpu": {"bf16": false}, "gpus": []}')
    return value


def cpu_bf16_override() -> bool | None:
    """What MODELS_AT_HOME_HARDWARE says of the CPU's bf16 units (None: nothing, probe the CPU)."""
    v = hardware_overrides().get("cpu", {}).get("bf16")
    return None if v is None else bool(v)


def cpu_has_bf16_units() -> bool:
    """AVX-512 BF16 or AMX in the CPU flags, unless MODELS_AT_HOME_HARDWARE says otherwise."""
    forced = cpu_bf16_override()
    return forced if forced is not None else bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_amx() -> bool:
    """AMX tiles in the CPU flags, unless MODELS_AT_HOME_HARDWARE says otherwise ({"cpu": {"amx": false}})."""
    forced = hardware_overrides().get("cpu", {}).get("amx")
    return bool(forced) if forced is not None else "amx_tile" in _cpu_flags()


def llama_cpp_repack() -> bool:
    """Whether llama.cpp may repack quantized weights for the CPU ("extra buffer types": AVX-512/AMX layouts of
    Q4/Q8 tensors, faster matmuls). On a 2-core Xeon with AMX here, every llama_decode of more than one token on
    repacked Q8_0 or Q4_1 weights crashed the process (SIGSEGV; our exports' q8_0 and SmolLM2's Q4_1, llama-cpp-
    python built from source), and worked with repacking off; f16 weights were not affected. Off on AMX CPUs."""
    return not cpu_has_amx()


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
    """CPU, RAM, GPUs and free disk at `disk_path` (its nearest existing parent), with MODELS_AT_HOME_HARDWARE's
    override applied."""
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
    found = {
        "cpu": {
            "name": _cpu_name(),
            "arch": platform.machine(),
            "cores": psutil.cpu_count(logical=False) or psutil.cpu_count(),
            "threads": psutil.cpu_count(logical=True),
            "usable_threads": affinity,
            # native bf16 matmuls on CPU (otherwise bf16 works but is emulated and slow)
            "bf16": cpu_has_bf16_units(),
            "avx2": "avx2" in flags,
            "avx512": "avx512f" in flags,
            "amx": "amx_tile" in flags,
        },
        "ram": {"total_bytes": int(vm.total), "available_bytes": int(vm.available)},
        "gpus": gpus,
        # a GPU listed by nvidia-smi but not usable by the installed torch (CPU-only build)
        "gpu_usable_by_torch": torch_sees_gpu,
        "disk": {"path": str(p), "free_bytes": int(disk.free), "total_bytes": int(disk.total)},
        "os": f"{platform.system()} {platform.release()}",
    }
    overrides = hardware_overrides()
    if overrides:
        found = merge(found, overrides)
        found["overridden"] = f"{HARDWARE_ENV}: {json.dumps(overrides, sort_keys=True)}"
    return found


# -----------------------------------------------------------------------------------------------------------
# The precision policy.


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix units (AVX-512 BF16 or AMX) that torch's oneDNN uses. Without them torch
    emulates bf16 matmuls, ~50x slower than fp32 (measured on an AVX2-only EPYC: 0.9 vs 52 GFLOP/s).
    MODELS_AT_HOME_HARDWARE (lib.hardware) overrides the answer, so tests choose the policy they judge."""
    forced = cpu_bf16_override()
    if forced is not None:
        return forced
    import torch

    return cpu_has_bf16_units() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def training_precision(requested: str, device_type: str, hw: dict | None = None) -> tuple[str, str]:
    """The precision policy, the one place it is decided: the config's precision ("auto", "fp32", "bf16", "fp16") on
    this device as accelerate's mixed_precision ("no", "bf16", "fp16") and a reason to log. Training asks with
    hw=None (the device itself is probed); 05_check's and the studio's estimates pass the hardware they judge."""
    if requested == "fp32":
        return "no", "fp32 (requested)"
    if device_type == "cuda":
        if hw is not None and hw.get("gpus"):
            bf16_ok = bool(hw["gpus"][0].get("bf16"))
        else:
            import torch

            bf16_ok = torch.cuda.is_bf16_supported()
        if requested in ("auto", "bf16") and bf16_ok:
            return "bf16", "bf16 autocast (CUDA supports bf16)"
        if requested == "bf16":
            raise UserError("pretrain.precision: bf16 requested but this GPU does not support bf16; use fp16 or auto")
        return "fp16", "fp16 autocast with loss scaling (CUDA without bf16)"
    if requested == "fp16":
        raise UserError("pretrain.precision: fp16 is for GPUs; on CPU use auto, bf16 or fp32")
    fast = cpu_has_fast_bf16() if hw is None else bool(hw["cpu"]["bf16"])
    if requested == "bf16":
        return "bf16", "bf16 autocast (requested)" + ("" if fast else "; warning: this CPU emulates bf16, fp32 is faster")
    if fast:
        return "bf16", "bf16 autocast (CPU has AVX-512 BF16/AMX)"
    return "no", "fp32 (this CPU has no bf16 matrix units; emulated bf16 would be slower)"


# -----------------------------------------------------------------------------------------------------------
# The C allocator.

# glibc's mallopt parameters (<malloc.h>), and the largest mmap threshold it accepts on 64-bit (HEAP_MAX_SIZE / 2)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20
_USER_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_CONF")


@functools.cache
def keep_freed_memory() -> str:
    """Ask glibc's malloc to keep the memory a training step frees for the next step instead of handing it back to
    the OS; returns what was done, for the log. Called once per process by training on CPU.

    A CPU training step allocates and frees the same activations every step. By default glibc serves blocks over
    its (adaptive) mmap threshold with fresh mappings and trims the heap's free top, so every step touches new
    zeroed pages again: 36,500 page faults per step at the demo shape, the step 0.24 s instead of 0.20 s
    (bench/bench_train_step.py prints both). Raising both thresholds keeps blocks up to 32 MiB in the heap and the
    heap at its high-water mark, which training reaches on its first step anyway. Raising only one of them is
    slower than glibc's defaults (measured): setting the trim threshold switches the adaptive mmap threshold off.
    Left alone where the C library is not glibc, or where the user chose (MALLOC_* variables, an LD_PRELOADed
    allocator such as jemalloc or tcmalloc)."""
    chosen = [k for k in _USER_MALLOC_ENV if os.environ.get(k)]
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc
        chosen.append("LD_PRELOAD")
    if chosen:
        return f"C allocator as configured ({', '.join(chosen)} set)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "C allocator left at its defaults (not glibc)"
    import ctypes

    libc = ctypes.CDLL(None)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not ok:
        return "C allocator left at its defaults (glibc refused mallopt)"
    return "glibc malloc keeps freed memory for reuse (mmap threshold 32 MiB, no trimming)"


# -----------------------------------------------------------------------------------------------------------
# The compile policy. bench/bench_train_step.py measured HomeLLM.compile_for_training against eager on a 2-core AMX
# CPU in bf16: 1.4x faster steps at 512-8-8 (0.736 -> 0.518 s) and 1.5x at the demo shape, for ~9 s of compiling
# (cached by torch on disk: a rerun compiles in ~1 s). Below this many steps the compile does not pay for itself.
AUTO_COMPILE_MIN_STEPS = 200


def torch_compile_works(device_type: str) -> tuple[bool, str]:
    """(whether torch.compile builds and runs a kernel on this device type, why not). It needs a C++ compiler on CPU
    and Triton on GPUs; the answer comes from compiling a one-line function, not from guessing. MODELS_AT_HOME_HARDWARE
    ({"compiler": false}) overrides it, so tests choose the path they judge."""
    forced = hardware_overrides().get("compiler")
    if forced is not None:
        return bool(forced), f"{HARDWARE_ENV} says compiler={str(bool(forced)).lower()}"
    return _compile_trial(device_type)


@functools.cache
def _compile_trial(device_type: str) -> tuple[bool, str]:
    import torch

    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(8, device=device_type))
    except Exception as e:  # noqa: BLE001 - whatever breaks (no compiler, no Triton), training runs eagerly
        return False, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    return True, ""


def training_compile(requested, device_type: str, steps: int | None, processes: int) -> tuple[bool, str]:
    """The compile policy, the one place it is decided: the config's compile ("auto", true, false) for a run of
    `steps` planned steps (None: a time budget only) on `processes` processes, and a reason to log."""
    if requested is False:
        return False, "eager (compile: false)"
    if requested is True:
        works, why = torch_compile_works(device_type)
        if not works:
            raise UserError(f"pretrain.compile: true, but torch.compile does not work on this machine ({why}). "
                            "Set pretrain.compile: auto (compiles where it works) or false.")
        return True, "torch.compile'd blocks and loss (requested)"
    if processes > 1:
        return False, "eager (auto: compiling was measured on one process only; set compile: true to try it)"
    if steps is not None and steps < AUTO_COMPILE_MIN_STEPS:
        return False, f"eager (auto: {steps} steps are too few to pay for the compile)"
    works, why = torch_compile_works(device_type)
    if not works:
        return False, f"eager (auto: torch.compile does not work here: {why})"
    return True, "torch.compile'd blocks and loss (auto: ~1.4x faster steps, bench/bench_train_step.py)"


def activation_dtype(mixed: str) -> str:
    """The dtype activations are computed in under accelerate's mixed_precision value."""
    return {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[mixed]
