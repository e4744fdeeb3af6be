"""Training-step throughput (forward + backward + gradient clipping + AdamW step, tokens/s) of our HomeLLM against
transformers' LlamaForCausalLM with the same shapes, weights and precision policy, plus this machine's measured
matmul GFLOP/s, all in the same run (the two models interleaved, so a busy neighbour slows both alike).

    .venv/bin/python -m bench.bench_train_step                          # reference: 512-8-8, batch 8 x 256, vocab 8192
    .venv/bin/python -m bench.bench_train_step --threads 1 --clock cpu  # on a busy shared machine (see below)
    .venv/bin/python -m bench.bench_train_step --preset demo --batch 16 --no-hf   # the demo config's step time
    .venv/bin/python -m bench.bench_train_step --precision bf16         # force bf16 autocast
    .venv/bin/python -m bench.bench_train_step --compile                # also ours compiled (blocks + loss)

Precision "auto" is the pipeline's policy (lib.hardware.training_precision): bf16 autocast where the CPU has bf16
matrix units (AVX-512 BF16 / AMX), fp32 otherwise, because without them torch emulates bf16 matmuls far slower
than fp32. The matmul peak is measured in that same dtype, as the best of large GEMMs and of the model's own
GEMM shapes. --clock cpu measures process CPU time; with --threads 1 that is the work itself, unaffected by other
programs competing for the cores. Step times are reported as the best and the median of the interleaved steps;
the targets are judged on the best (other programs can only slow a step down, so the best is the closest to a
quiet machine), and the peak is the best matmul rate measured in any round. A warning says when the rounds
disagree too much for the figures to mean anything. The C allocator is set as training sets it
(lib.hardware.keep_freed_memory); --malloc-defaults leaves glibc's defaults, and the faults/step column counts the
fresh pages each step had to map in.

Targets: ours >= 1.3x transformers' Llama; 6 x params x tokens/s >= 80% of the measured matmul peak.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from lib.config import ModelConfig
from lib.model.hf_io import hf_config
from lib.model.homellm import HomeLLM, model_args
from lib.train.loop import param_groups
from lib.train.pretrain import TokenWindows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="512-8-8")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=1, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--no-hf", action="store_true", help="time ours only (e.g. to size a preset)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (bench/bench_gpu.sh); the matmul peak is measured "
                                                    "on the same device")
    p.add_argument("--compile", action="store_true", help="also time ours compiled as training compiles it "
                                                           "(HomeLLM.compile_for_training: blocks and loss)")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="leave glibc's malloc at its defaults instead of training's setting "
                        "(lib.hardware.keep_freed_memory), to measure what that setting gains")
    p.add_argument("--profile-steps", type=int, default=3,
                   help="steps of ours profiled (torch.profiler) after the timed rounds for the breakdown (0 = none)")
    return p.parse_args(argv)


def matmul_peak(dtype: torch.dtype, shapes: list[tuple[int, int, int]], clock, seconds: float = 0.5,
                device: str = "cpu") -> float:
    """Best GFLOP/s over (M, K, N) GEMMs on `device`, each run for ~`seconds`."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
        a @ b
        sync()
        iters, t0 = 0, clock()
        while clock() - t0 < seconds or iters < 2:
            for _ in range(10 if device.startswith("cuda") else 1):  # a GPU GEMM takes microseconds
                a @ b
                iters += 1
            sync()
        best = max(best, 2 * m * k * n * iters / (clock() - t0) / 1e9)
    return best


def gemm_floor(model: HomeLLM, tokens: int, dtype: torch.dtype, clock, device: str = "cpu", chunk: int = 512,
               rounds: int = 3) -> float:
    """Seconds that the step's 6N matmuls alone take, at the shapes and memory layouts the step gives them: for every
    projection x @ W^T forward, g @ W and g^T @ x backward; for the LM head the same three per chunk of `chunk` rows
    (lib.model.homellm.linear_cross_entropy). Best of `rounds`. A step cannot be faster than this, whatever else is
    fused away, so 6N x tokens / floor is the share of the peak this machine's GEMMs allow at this shape."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gemms = []
    for p_ in model.model.layers.parameters():
        if p_.dim() == 2:
            w = torch.randn(p_.shape, device=device).to(dtype)
            x, g = (torch.randn(tokens, n, device=device).to(dtype) for n in (w.shape[1], w.shape[0]))
            gemms += [lambda x=x, w=w: F.linear(x, w), lambda g=g, w=w: g @ w, lambda g=g, x=x: g.t() @ x]
    head = model.lm_head.weight
    w = torch.randn(head.shape, device=device).to(dtype)
    x, g = (torch.randn(chunk, n, device=device).to(dtype) for n in (head.shape[1], head.shape[0]))
    gemms += [lambda: x @ w.t(), lambda: g @ w, lambda: g.t() @ x] * max(1, tokens // chunk)
    best = float("inf")
    for _ in range(rounds):
        sync()
        t0 = clock()
        for f in gemms:
            f()
        sync()
        best = min(best, clock() - t0)
    return best


# What the profile's breakdown reports, in order. Each op's self time goes to one row: by the step's phase (the
# record_function ranges of step()), by whether the loss over the vocabulary called it, and by the kind of op.
ROWS = ("data (a batch of windows from the token file)", "matmuls, forward", "attention, forward",
        "norms, activations, RoPE, casts, forward", "loss over the vocabulary (LM head + CE, fwd + bwd)",
        "matmuls, backward", "attention, backward", "elementwise, backward", "optimizer (clip + AdamW)",
        "Python and framework overhead")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul",
              "aten::linear", "aten::mkldnn_linear", "aten::_mkldnn_linear"}
PHASES = ("data", "forward", "backward", "optimizer")


def _row(event) -> str:
    """The breakdown row of one profiler event (its self time is what it adds)."""
    chain, parent = [event.name], event.cpu_parent
    while parent is not None:
        chain.append(parent.name)
        parent = parent.cpu_parent
    phase = next((c for c in reversed(chain) if c in PHASES), None)
    if event.name in ("data", "optimizer"):  # Python inside the range itself (numpy indexing, the update loop)
        return ROWS[0] if event.name == "data" else ROWS[8]
    if event.name in PHASES or event.name.startswith("autograd::engine::evaluate_function") or phase is None:
        return ROWS[-1]
    if any("LinearCrossEntropy" in c for c in chain):
        return ROWS[4]
    if phase in ("data", "optimizer"):
        return ROWS[0] if phase == "data" else ROWS[8]
    attention = any("scaled_dot_product" in c.lower() or "attention" in c.lower() for c in chain)
    if phase == "forward":
        return ROWS[2] if attention else ROWS[1] if event.name in MATMUL_OPS else ROWS[3]
    return ROWS[6] if attention else ROWS[5] if event.name in MATMUL_OPS else ROWS[7]


def profile_breakdown(step, n: int) -> tuple[dict[str, float], float]:
    """({row: seconds per step}, wall seconds per step) over n profiled steps; whatever the ops' self times do
    not cover of the wall time (Python between ops) goes to the overhead row."""
    from torch.profiler import ProfilerActivity, profile

    step()  # a warm step outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        wall = (time.perf_counter() - t0) / n
    rows = dict.fromkeys(ROWS, 0.0)
    for e in prof.events():
        rows[_row(e)] += e.self_cpu_time_total / 1e6 / n
    rows[ROWS[-1]] += max(0.0, wall - sum(rows.values()))
    return rows, wall


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    from lib.hardware import cpu_has_fast_bf16, keep_freed_memory

    cuda = a.device.startswith("cuda")
    # the C allocator as training sets it: on CPU only
    allocator = ("unchanged (GPU)" if cuda else "glibc's defaults (--malloc-defaults)" if a.malloc_defaults
                 else keep_freed_memory())
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here")
    bf16 = a.precision == "bf16" or (a.precision == "auto" and (cuda or cpu_has_fast_bf16()))
    dtype = torch.bfloat16 if bf16 else torch.float32
    policy = "bf16 autocast" if bf16 else "fp32"
    if a.precision == "auto":
        policy += " (auto: " + ("CPU has bf16 matrix units)" if bf16 else "no bf16 matrix units on this CPU)")

    torch.manual_seed(0)
    args = model_args(ModelConfig(preset=a.preset, max_seq_len=max(a.seq, 8)), a.vocab)
    ours = HomeLLM(args).train().to(a.device)
    models = {"ours (HomeLLM)": ours}
    if not a.no_hf:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = {k: v for k, v in hf_config(args).items() if k not in ("architectures", "model_type", "torch_dtype")}
        theirs = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).train().to(a.device)
        theirs.load_state_dict(ours.state_dict())  # same weights: the first losses must agree
        models["transformers LlamaForCausalLM"] = theirs
    if a.compile:
        compiled = HomeLLM(args).train().to(a.device)
        compiled.load_state_dict(ours.state_dict())
        models["ours, compiled (blocks + loss)"] = compiled.compile_for_training()  # what compile: auto runs

    # batches as the pretraining loader gives them: random windows of a token file (2M random tokens here)
    tmp = tempfile.TemporaryDirectory(prefix="bench-train-step-")
    tokens = np.random.default_rng(1).integers(0, a.vocab, 2_000_000).astype(np.uint16 if a.vocab <= 65536 else np.uint32)
    tokens.tofile(Path(tmp.name) / "train.bin")
    windows = TokenWindows(Path(tmp.name) / "train.bin", tokens.dtype.name, a.seq, a.batch, 1, "random", 1, "train")
    # the optimizer the training loop builds on one process (lib.train.loop: decay on matrices only, fused)
    optims = {name: torch.optim.AdamW(param_groups(m, 0.1), lr=1e-4, fused=True) for name, m in models.items()}
    count = {name: 0 for name in models}

    def step(name) -> float:
        m, opt = models[name], optims[name]
        with record_function("data"):
            batch = windows.get(count[name], 0, 0, 1)  # the same windows for every model, step by step
            x, y = batch["x"].to(a.device, non_blocking=True), batch["y"].to(a.device, non_blocking=True)
            count[name] += 1
        with record_function("forward"), torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16,
                                                        enabled=bf16):
            if isinstance(m, HomeLLM):
                _, loss = m(x, y)
            else:  # y is already shifted: shift_labels stops transformers from shifting it again
                loss = m(input_ids=x, labels=y, shift_labels=y.contiguous()).loss
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    first, t_compile = {}, None
    for name in models:  # warm-up step (and the compile, if any)
        t0 = time.perf_counter()
        first[name] = step(name)
        if "compile" in name:
            t_compile = time.perf_counter() - t0

    shapes = [(a.batch * a.seq, args.dim, args.ffn_dim), (a.batch * a.seq, args.ffn_dim, args.dim),
              (a.batch * a.seq, args.dim, args.vocab_size), (2048, 2048, 2048)]
    peaks = []
    times = {name: [] for name in models}
    faults = {name: 0 for name in models}  # minor page faults: fresh pages the allocator had to map
    for _ in range(a.rounds):
        peaks.append(matmul_peak(dtype, shapes, clock, 0.15, a.device))  # in every round: one may be disturbed
        for name in models:
            for _ in range(a.steps):
                f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, clock()
                step(name)
                times[name].append(clock() - t0)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    peak = max(peaks)
    floor = gemm_floor(ours, a.batch * a.seq, dtype, clock, a.device)

    tokens = a.batch * a.seq
    n_params = ours.num_params()
    flops_6n = 6 * n_params
    where = torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"# training-step benchmark on {where}: {a.preset} ({n_params / 1e6:.2f}M params, vocab {a.vocab}), batch {a.batch} x "
          f"seq {a.seq} = {tokens} tokens/step, {policy}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, "
          f"{a.clock} clock, {a.rounds} x {a.steps} interleaved steps per model (tok/s from the best)")
    print(f"C allocator: {allocator}")
    print(f"matmul peak ({str(dtype).split('.')[-1]}): {peak:.1f} GFLOP/s (best of {len(shapes)} GEMM shapes, "
          f"measured in each round: {' '.join(f'{p:.0f}' for p in peaks)})")
    print(f"the step's 6N matmuls alone, at its shapes and layouts: {floor * 1e3:.1f} ms = "
          f"{6 * n_params * tokens / floor / 1e9:.0f} GFLOP/s = {6 * n_params * tokens / floor / 1e9 / peak:.0%} of the "
          "peak: the most any step of this shape can reach on this machine")
    print("first-step loss (same weights): " + ", ".join(f"{n} {v:.4f}" for n, v in first.items()))
    if t_compile is not None:
        print(f"compile + first step of the compiled model: {t_compile:.1f} s")
    print(f"{'model':<32} {'best s':>7} {'median s':>9} {'tok/s':>7} {'6N GFLOP/s':>11} {'of peak':>8} "
          f"{'MFU (6N+attn)':>14} {'faults/step':>12}")
    tps = {}
    for name, ts in times.items():
        t = min(ts)
        tps[name] = tokens / t
        gf = flops_6n * tps[name] / 1e9
        mfu = ours.estimate_flops_per_token(a.seq) * tps[name] / 1e9 / peak
        print(f"{name:<32} {t:>7.3f} {statistics.median(ts):>9.3f} {tps[name]:>7.0f} {gf:>11.1f} {gf / peak:>7.0%} "
              f"{mfu:>13.0%} {faults[name] / len(ts):>12,.0f}")
    spread = max(statistics.median(ts) / min(ts) for ts in times.values())
    if spread > 1.15 or min(peaks) < 0.85 * peak:
        print(f"WARNING: steps differ by up to {spread - 1:.0%} from the best, the matmul peak by up to "
              f"{1 - min(peaks) / peak:.0%}: other programs were competing for the CPU, so the figures are "
              "unreliable. Rerun on a quiet machine"
              + (", or with --threads 1 --clock cpu." if a.clock == "wall" else "."))
    for name in (n for n in models if n.startswith("ours")):
        frac = flops_6n * tps[name] / 1e9 / peak
        print(f"target: 6N x tok/s >= 80% of the matmul peak: {name}: {frac:.0%} -> "
              f"{'MET' if frac >= 0.8 else 'NOT MET'}")
        if not a.no_hf:
            ratio = tps[name] / tps["transformers LlamaForCausalLM"]
            print(f"target: >= 1.3x transformers: {name}: {ratio:.2f}x -> {'MET' if ratio >= 1.3 else 'NOT MET'}")
    for name in (n for n in models if n.startswith("ours")) if a.profile_steps else ():
        rows, wall = profile_breakdown(lambda name=name: step(name), a.profile_steps)
        print(f"profile of {name} (torch.profiler, {a.profile_steps} steps, {wall:.3f} s per profiled step; the "
              "profiler itself adds a little to each op):")
        for row, sec in rows.items():
            print(f"  {row:<52} {sec * 1e3:>8.1f} ms  {sec / wall:>4.0%}")
        if "compiled" in name and a.device == "cpu":
            print("  (compiled on CPU, attention's backward is part of the blocks' compiled backward graph: its matmuls "
                  "count as matmuls, its softmax maths as elementwise)")
    if a.profile_steps:  # the training loop's choice of AdamW, measured here against the multi-tensor one
        m = models["ours (HomeLLM)"]
        for p_ in m.parameters():
            p_.grad = torch.randn_like(p_) * 1e-3
        opts = {"foreach": torch.optim.AdamW(param_groups(m, 0.1), lr=1e-9, fused=False),
                "fused": torch.optim.AdamW(param_groups(m, 0.1), lr=1e-9, fused=True)}
        best = {k: float("inf") for k in opts}
        for _ in range(5):
            for k, opt in opts.items():
                t0 = clock()
                opt.step()
                best[k] = min(best[k], clock() - t0)
        print(f"AdamW step alone ({n_params / 1e6:.1f}M parameters, best of 5, interleaved): multi-tensor "
              f"{best['foreach'] * 1e3:.1f} ms, fused {best['fused'] * 1e3:.1f} ms (the loop uses fused on one "
              "process or DDP)")
    if a.no_hf or a.preset == "demo":
        print(f"projected time for 2000 steps of this shape: {2000 * tokens / tps['ours (HomeLLM)'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
