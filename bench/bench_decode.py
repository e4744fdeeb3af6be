"""Decode speed (tokens/s at batch 1) and time to first token: our KV-cache engine (lib.model.generate) against
transformers' `generate` on the same exported weights, measured in the same run, interleaved.

    .venv/bin/python -m bench.bench_decode                        # 512-8-8, vocab 8192, 256-token prompt, 64 new tokens
    .venv/bin/python -m bench.bench_decode --preset demo --new-tokens 128
    .venv/bin/python -m bench.bench_decode --threads 1 --clock cpu   # on a busy shared machine (see below)
    .venv/bin/python -m bench.bench_decode --bf16                   # also time bf16 weights / bf16 autocast for ours

The model is randomly initialised (speed does not depend on the values), saved with lib.model.hf_io.save_hf and loaded
by both sides from that folder. Both decode greedily with no stop token, so they produce the same number of tokens
(and, being the same weights, the same tokens: checked). TTFT = prompt in -> first new token out (prefill + one
sampling step); decode tokens/s = (N - 1) / (time to N tokens - TTFT).

--clock cpu measures this process's CPU time instead of wall time: with --threads 1 that is the time the work
itself takes, unaffected by other programs competing for the cores (wall time is what a user sees on a quiet
machine; on a shared one it mostly measures the neighbours). Each figure is the best of the interleaved rounds
(other programs can only slow a round down), with the median beside it.

Targets: ours >= 2x transformers' decode tokens/s; TTFT <= 100 ms at 512-8-8.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from lib.config import ModelConfig
from lib.model.generate import SamplingParams, stream
from lib.model.hf_io import load_hf, save_hf
from lib.model.homellm import HomeLLM, model_args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="512-8-8")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the best is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--bf16", action="store_true", help="also time ours with bf16 weights and with bf16 autocast")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    args = model_args(ModelConfig(preset=a.preset), a.vocab)
    with tempfile.TemporaryDirectory() as d:
        save_hf(HomeLLM(args), d, bos_token_id=1, eos_token_id=2)
        ours = load_hf(d)
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        ours_bf16 = load_hf(d, dtype=torch.bfloat16) if a.bf16 else None
    prompt = torch.randint(0, a.vocab, (a.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    N = a.new_tokens
    params = SamplingParams(max_new_tokens=N, temperature=0)

    def run_ours(model, autocast=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            t0 = clock()
            it = stream(model, prompt, params)
            first = next(it)
            t1 = clock()
            rest = list(it)
            t2 = clock()
        return t1 - t0, (len(rest)) / (t2 - t1), [first, *rest]

    def run_hf():
        x = torch.tensor([prompt])
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            t0 = clock()
            theirs.generate(x, max_new_tokens=1, **kw)
            t1 = clock()
            out = theirs.generate(x, max_new_tokens=N, min_new_tokens=N, **kw)
            t2 = clock()
        ttft = t1 - t0
        return ttft, (N - 1) / ((t2 - t1) - ttft), out[0, len(prompt):].tolist()

    runs = {"ours (fp32)": lambda: run_ours(ours), "transformers generate (fp32)": run_hf}
    if a.bf16:
        runs["ours (bf16 weights)"] = lambda: run_ours(ours_bf16)
        runs["ours (fp32 weights, bf16 autocast)"] = lambda: run_ours(ours, autocast=True)
    for fn in runs.values():  # warm-up: first-call allocations, lazy inits
        fn()
    results = {name: [] for name in runs}
    tokens = {}
    for _ in range(a.repeats):
        for name, fn in runs.items():
            ttft, tps, toks = fn()
            results[name].append((ttft, tps))
            tokens[name] = toks

    print(f"# decode benchmark: {a.preset} ({ours.num_params() / 1e6:.1f}M params, vocab {a.vocab}), batch 1, "
          f"{a.prompt_tokens}-token prompt, {N} new tokens, greedy; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {a.clock} clock, best of {a.repeats} interleaved rounds")
    print(f"{'engine':<36} {'TTFT ms':>9} {'(median)':>9} {'decode tok/s':>13} {'(median)':>9}")
    best = {}
    for name, rs in results.items():
        best[name] = (min(r[0] for r in rs), max(r[1] for r in rs))
        print(f"{name:<36} {best[name][0] * 1e3:>9.1f} {statistics.median(r[0] for r in rs) * 1e3:>9.1f} "
              f"{best[name][1]:>13.1f} {statistics.median(r[1] for r in rs):>9.1f}")
    spread = max(max(statistics.median(r[0] for r in rs) / min(r[0] for r in rs),
                     max(r[1] for r in rs) / statistics.median(r[1] for r in rs)) for rs in results.values())
    if spread > 1.15:
        print(f"WARNING: rounds differ by up to {spread - 1:.0%} from the best: other programs were competing for the "
              "CPU, so the comparison is unreliable. Rerun on a quiet machine"
              + (", or with --threads 1 --clock cpu." if a.clock == "wall" else "."))
    same = tokens["ours (fp32)"] == tokens["transformers generate (fp32)"]
    print(f"same greedy tokens as transformers: {same}")
    speedup = best["ours (fp32)"][1] / best["transformers generate (fp32)"][1]
    ttft = best["ours (fp32)"][0] * 1e3
    print(f"decode speed-up vs transformers: {speedup:.2f}x (target >= 2x): {'MET' if speedup >= 2 else 'NOT MET'}")
    print(f"our TTFT: {ttft:.1f} ms (target <= 100 ms): {'MET' if ttft <= 100 else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
