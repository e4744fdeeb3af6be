"""The hardware probe, its override (MODELS_AT_HOME_HARDWARE) and the precision policy built on it: the same
assertions hold on a CPU with AVX-512 BF16/AMX and on one without, because each test names the CPU it judges."""

import json
import os
import subprocess
import sys

import pytest
from conftest import CPU_PROFILES, ROOT, hardware_profile

from lib.errors import UserError
from lib.hardware import HARDWARE_ENV, PROFILES, cpu_has_fast_bf16, probe_hardware, training_precision


def test_probe_reports_this_machine_without_an_override(monkeypatch):
    monkeypatch.delenv(HARDWARE_ENV, raising=False)
    hw = probe_hardware("/tmp")
    assert hw["cpu"]["threads"] >= 1 and hw["ram"]["total_bytes"] > 0 and hw["disk"]["free_bytes"] >= 0
    assert "overridden" not in hw
    flags = open("/proc/cpuinfo").read().split()
    assert hw["cpu"]["bf16"] == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.parametrize("profile", CPU_PROFILES)
def test_profiles_override_the_cpu_and_hide_gpus(profile):
    with hardware_profile(profile):
        hw = probe_hardware("/tmp")
        assert hw["cpu"]["bf16"] is PROFILES[profile]["cpu"]["bf16"]
        assert hw["gpus"] == [] and hw["gpu_usable_by_torch"] is False
        assert HARDWARE_ENV in hw["overridden"]
        assert cpu_has_fast_bf16() is hw["cpu"]["bf16"]
        # untouched fields are still probed
        assert hw["cpu"]["threads"] >= 1 and hw["ram"]["total_bytes"] > 0


def test_json_override_merges_into_the_probe(monkeypatch):
    monkeypatch.setenv(HARDWARE_ENV, json.dumps({"cpu": {"bf16": False}, "ram": {"available_bytes": 1 << 30}}))
    hw = probe_hardware("/tmp")
    assert hw["cpu"]["bf16"] is False and hw["ram"]["available_bytes"] == 1 << 30
    assert hw["ram"]["total_bytes"] > 0 and hw["cpu"]["threads"] >= 1  # keys not named are still probed
    gpu = {"index": 0, "name": "Test GPU", "vram_total_bytes": 8 << 30, "vram_free_bytes": 8 << 30,
           "compute_capability": "8.0", "bf16": True, "source": "override"}
    monkeypatch.setenv(HARDWARE_ENV, json.dumps({"gpus": [gpu]}))
    assert probe_hardware("/tmp")["gpus"] == [gpu]


@pytest.mark.parametrize("bad", ["cpu-avx9000", "[1, 2]", "{not json"])
def test_a_bad_override_is_a_clear_error(monkeypatch, bad):
    monkeypatch.setenv(HARDWARE_ENV, bad)
    with pytest.raises(UserError, match=f"{HARDWARE_ENV}=.*expected a profile name \\(cpu-bf16, cpu-fp32\\)"):
        probe_hardware("/tmp")


@pytest.mark.slow
def test_a_bad_override_reaches_the_user_as_one_paragraph(tiny_chat_model):
    env = {**os.environ, HARDWARE_ENV: "cpu-avx9000"}
    res = subprocess.run([sys.executable, str(ROOT / "05_check.py"), str(tiny_chat_model), "--quiet-config"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr and HARDWARE_ENV in res.stderr


# ---------------------------------------------------------------------------------------------------------
# The precision policy (lib.hardware.training_precision) on each CPU.


@pytest.mark.parametrize("profile", CPU_PROFILES)
def test_cpu_precision_policy(profile):
    with hardware_profile(profile):
        bf16 = PROFILES[profile]["cpu"]["bf16"]
        mixed, note = training_precision("auto", "cpu")
        assert mixed == ("bf16" if bf16 else "no")
        assert ("AVX-512 BF16/AMX" in note) if bf16 else ("no bf16 matrix units" in note)
        assert training_precision("fp32", "cpu") == ("no", "fp32 (requested)")
        mixed, note = training_precision("bf16", "cpu")  # asked for: honoured, with a warning where it is emulated
        assert mixed == "bf16" and ("emulates bf16" in note) != bf16
        with pytest.raises(UserError, match="fp16 is for GPUs"):
            training_precision("fp16", "cpu")


# ---------------------------------------------------------------------------------------------------------
# The compile policy (lib.hardware.training_compile).


def test_compile_policy(monkeypatch):
    from lib.hardware import AUTO_COMPILE_MIN_STEPS, training_compile

    assert training_compile(False, "cpu", None, 1) == (False, "eager (compile: false)")
    monkeypatch.setenv(HARDWARE_ENV, json.dumps({"compiler": True}))
    assert training_compile(True, "cpu", 5, 2)[0]  # asked for: honoured
    assert training_compile("auto", "cpu", None, 1)[0]  # a time budget only: long enough
    assert training_compile("auto", "cpu", AUTO_COMPILE_MIN_STEPS, 1)[0]
    on, note = training_compile("auto", "cpu", AUTO_COMPILE_MIN_STEPS - 1, 1)
    assert not on and "too few" in note
    on, note = training_compile("auto", "cpu", None, 2)
    assert not on and "one process" in note
    monkeypatch.setenv(HARDWARE_ENV, json.dumps({"compiler": False}))
    on, note = training_compile("auto", "cpu", None, 1)
    assert not on and "does not work here" in note and "compiler=false" in note
    with pytest.raises(UserError, match=r"pretrain.compile: true, but torch.compile does not work on this machine"):
        training_compile(True, "cpu", None, 1)  # asked for where it cannot work: a clear error, not a traceback


@pytest.mark.slow
def test_compile_trial_finds_a_working_compiler_here(monkeypatch):
    """This machine has a C++ compiler (install.sh needs one for llama.cpp), so the real trial compile succeeds."""
    from lib.hardware import torch_compile_works

    monkeypatch.delenv(HARDWARE_ENV, raising=False)
    assert torch_compile_works("cpu") == (True, "")


# ---------------------------------------------------------------------------------------------------------
# The C allocator (lib.hardware.keep_freed_memory).

_HEAP_PROBE = """
import ctypes, sys
from lib.hardware import keep_freed_memory
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "keep":
    print(keep_freed_memory(), file=sys.stderr)
size = 20 << 20  # an activation-sized block: 20 MiB
mapped_before = libc.mallinfo2().hblkhd
block = libc.malloc(size)
ctypes.memset(block, 1, size)
mapped = libc.mallinfo2().hblkhd - mapped_before  # bytes served by a fresh mapping of their own
libc.free(block)
print(mapped, libc.mallinfo2().arena)  # the heap's size after the free: what the next step reuses
"""


@pytest.mark.skipif(sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc only")
def test_a_freed_activation_sized_block_stays_in_the_heap_for_reuse():
    """With glibc's defaults a fresh process serves a 20 MiB block by a mapping of its own and returns it to the OS on
    free, so the next training step faults its pages in again; with training's setting the block comes from the heap
    and stays there. (Page faults of whole training steps vary from run to run with the address-space layout, so
    bench/bench_train_step.py measures those; this checks the mechanism, which is deterministic.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(ROOT)

    def probe(mode: str) -> tuple[int, int, str]:
        res = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        mapped, heap = map(int, res.stdout.split())
        return mapped, heap, res.stderr

    size = 20 << 20
    mapped, heap, _ = probe("default")
    assert mapped >= size and heap < size  # glibc's defaults: its own mapping, gone after the free
    mapped, heap, note = probe("keep")
    assert "glibc malloc keeps freed memory" in note
    assert mapped == 0 and heap >= size  # from the heap, and still there for the next step


def test_the_users_own_allocator_settings_are_left_alone(monkeypatch):
    from lib.hardware import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    keep_freed_memory.cache_clear()
    try:
        assert keep_freed_memory() == "C allocator as configured (MALLOC_TRIM_THRESHOLD_ set)"
    finally:
        keep_freed_memory.cache_clear()
