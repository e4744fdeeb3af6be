"""Load test of `07_serve.py`: concurrent streaming chats through the official openai client, then a burst of
malformed requests, against a real server subprocess.

    python -m bench.bench_serve_load        # random weights in the demo model's shape (preset demo, vocab 8192)
    python -m bench.bench_serve_load --model artifacts/04_export/<hash> --requests 32 --max-tokens 64

Reports, measured in the same run:
  baseline    the same requests one after another (streaming, same seeds): what one user at a time gets
  concurrent  all requests at once: every one must complete with 0 errors; aggregate tokens/s, time to first
              token and latency percentiles
  malformed   N bad requests (bad JSON, wrong types, absurd values, unknown model, lone surrogates, invalid UTF-8,
              wrong methods, 50 MB bodies with and without Content-Length, ...) sent concurrently: every one must
              get a 4xx in OpenAI's error shape (no reset connection), and the server must answer /health and a
              real chat after
Exit code 1 if any of those checks fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lib import ROOT


def build_demo_shaped_model(out: Path) -> Path:
    """Random weights in the shape of the embedded demo's model (preset demo, BPE vocab 8192 on the Bible)."""
    import importlib.util

    import torch

    from lib.config import ModelConfig
    from lib.data.tokenizer import save_tokenizer, train_bpe, wrap_tokenizer
    from lib.model.hf_io import save_hf
    from lib.model.homellm import HomeLLM, model_args

    bible = Path(importlib.util.find_spec("bible").submodule_search_locations[0]) / "data" / "kjv.jsonl"
    with open(bible, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(8000))]
    tok = wrap_tokenizer(train_bpe(texts, vocab_size=8192), model_max_length=256)
    save_tokenizer(tok, out)
    torch.manual_seed(0)
    model = HomeLLM(model_args(ModelConfig(preset="demo"), vocab_size=len(tok)))
    save_hf(model, out, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "07_serve.py", "--model", model, "--port", "0", "--quiet-config", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    for line in proc.stdout:
        if line.startswith("Running on "):
            return proc, line.split()[2]
    proc.wait()
    raise SystemExit(f"the server exited with code {proc.returncode} before serving")


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def one_chat(client, model: str, i: int, max_tokens: int) -> dict:
    """One streaming chat; time to first content and total, token count from the usage chunk."""
    t0 = time.perf_counter()
    first = None
    text, usage = "", None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Request {i}: tell me something about the sea."}],
        max_tokens=max_tokens, temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text += chunk.choices[0].delta.content
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": usage.completion_tokens if usage else 0,
            "text": text}


def run_chats(client, model: str, n: int, max_tokens: int, concurrency: int) -> tuple[list[dict], list[str], float]:
    results, errors = [], []
    lock = threading.Lock()

    def job(i):
        try:
            r = one_chat(client, model, i, max_tokens)
            with lock:
                results.append(r)
        except Exception as e:  # counted, not raised: the benchmark reports every failure
            with lock:
                errors.append(f"request {i}: {type(e).__name__}: {e}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(job, range(n)))
    return results, errors, time.perf_counter() - t0


def report(name: str, results: list[dict], wall: float) -> float:
    tokens = sum(r["tokens"] for r in results)
    tps = tokens / wall if wall else 0.0
    print(f"{name:<11} {len(results):>3} requests  {tokens:>6} tokens in {wall:7.2f} s  = {tps:8.1f} tokens/s   "
          f"ttft p50 {pct([r['ttft'] for r in results], .5):6.3f} s  p95 {pct([r['ttft'] for r in results], .95):6.3f} s   "
          f"latency p50 {pct([r['latency'] for r in results], .5):6.2f} s  "
          f"p95 {pct([r['latency'] for r in results], .95):6.2f} s")
    return tps


def malformed_requests(model: str) -> list[dict]:
    """httpx.request kwargs of bad requests, of every kind the API validates."""
    ok = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
    j = {"content-type": "application/json"}
    bodies = [
        {"content": b'{"model": ', "headers": j},
        {"content": b"\xff\xfe\x00", "headers": j},
        {"content": b'{"model": "m", "temperature": NaN}', "headers": j},
        {"content": b"", "headers": j},
        {"data": {"model": model}},  # form-encoded
        {"json": [ok]},
        {"json": "just a string"},
        {"json": {"model": model}},
        {"json": {"messages": ok["messages"]}},
        {"json": {**ok, "messages": []}},
        {"json": {**ok, "messages": [{"role": "wizard", "content": "x"}]}},
        {"json": {**ok, "messages": [{"role": "user"}]}},
        {"json": {**ok, "messages": [{"role": "user", "content": {"nested": True}}]}},
        {"json": {**ok, "temperature": "hot"}},
        {"json": {**ok, "temperature": 99}},
        {"json": {**ok, "top_p": -1}},
        {"json": {**ok, "max_tokens": -1}},
        {"json": {**ok, "max_tokens": 10 ** 12}},
        {"json": {**ok, "max_tokens": 1.5}},
        {"json": {**ok, "n": 5}},
        {"json": {**ok, "stream": "yes"}},
        {"json": {**ok, "stop": ["a", "b", "c", "d", "e"]}},
        {"json": {**ok, "stop": [1, 2]}},
        {"json": {**ok, "seed": "abc"}},
        {"json": {**ok, "logprobs": True}},
        {"json": {**ok, "tools": [{"type": "function"}]}},
        {"json": {**ok, "frobnicate": 1}},
        {"json": {**ok, "model": "no-such-model"}},
        {"json": {**ok, "messages": [{"role": "user", "content": "word " * 20000}]}},
        {"json": {"model": model, "prompt": ["a", "b"]}, "path": "completions"},
        {"json": {"model": model, "prompt": [-1]}, "path": "completions"},
        {"json": {"model": model, "prompt": "x", "best_of": 3}, "path": "completions"},
        {"method": "GET", "path": "chat/completions"},
        {"method": "DELETE", "path": "models"},
        {"method": "POST", "path": "../health"},
        {"json": ok, "path": "engines/davinci/completions"},
        # strings that are legal JSON escapes or bytes but not text: lone surrogates, invalid UTF-8 inside a string
        {"content": json.dumps(ok).encode().replace(b'"Hi"', b'"H\\udcffi"'), "headers": j},
        {"content": b'{"model": "%s", "prompt": "a\\ud800"}' % model.encode(), "headers": j, "path": "completions"},
        {"content": json.dumps(ok).encode().replace(b'"Hi"', b'"H\xc3\x28i"'), "headers": j},
        # bodies over the limit (serve.max_body_mb, 4 MB by default), with and without a Content-Length
        {"content": json.dumps({**ok, "messages": [{"role": "user", "content": "x" * (50 * 2**20)}]}).encode(),
         "headers": j},
        {"content": "chunks", "headers": j},
    ]
    return bodies


def _chunks(total_mb: int = 50):
    for _ in range(total_mb):
        yield b"x" * 2**20


def run_malformed(url: str, model: str, n: int, concurrency: int) -> tuple[dict, list[str], float]:
    import httpx

    kinds = malformed_requests(model)
    statuses: dict[int, int] = {}
    problems: list[str] = []
    lock = threading.Lock()

    http = httpx.Client(timeout=60)  # one connection pool: the figure is the server's, not TLS-context setup's

    def job(i):
        spec = dict(kinds[i % len(kinds)])
        method, path = spec.pop("method", "POST"), spec.pop("path", "chat/completions")
        if spec.get("content") == "chunks":
            spec["content"] = _chunks()
        try:
            r = http.request(method, f"{url}v1/{path}", **spec)
            err = r.json().get("error") if r.headers.get("content-type", "").startswith("application/json") else None
            bad_shape = not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}
            with lock:
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if not 400 <= r.status_code < 500 or bad_shape:
                    problems.append(f"kind {i % len(kinds)}: {r.status_code} {r.text[:120]}")
        except Exception as e:
            with lock:
                problems.append(f"kind {i % len(kinds)}: {type(e).__name__}: {e}")

    t0 = time.perf_counter()
    with http, ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(job, range(n)))
    return statuses, problems, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model to serve (default: a random model of the demo's shape, built in a temp dir)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--malformed", type=int, default=200)
    p.add_argument("--skip-baseline", action="store_true", help="do not run the sequential baseline")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for 07_serve.py (repeatable)")
    args = p.parse_args(argv)

    import httpx
    import openai

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model_path = args.model or str(build_demo_shaped_model(Path(tmp) / "demo-shaped"))
        t0 = time.perf_counter()
        proc, url = start_server(model_path, args.server_arg)
        try:
            what = f"--model {args.model}" if args.model else "random demo-shaped model"
            print(f"server up in {time.perf_counter() - t0:.1f} s at {url} ({what})")
            client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=600)
            model = client.models.list().data[0].id
            info = httpx.get(url + "info").json()
            print(f"model {model}: {info['model']['parameters'] / 1e6:.2f}M parameters, context "
                  f"{info['model']['context_length']}, {info['model']['device']}; engine {info['engine']}")
            one_chat(client, model, -1, 4)  # warm-up (first-call allocations)
            failures = []

            base_tps = None
            if not args.skip_baseline:
                res, errs, wall = run_chats(client, model, args.requests, args.max_tokens, concurrency=1)
                base_tps = report("baseline", res, wall)
                failures += errs
            res, errs, wall = run_chats(client, model, args.requests, args.max_tokens, concurrency=args.requests)
            conc_tps = report("concurrent", res, wall)
            print(f"concurrent: {len(res)}/{args.requests} completed, {len(errs)} errors"
                  + (f"; {conc_tps / base_tps:.2f}x the baseline's aggregate tokens/s" if base_tps else ""))
            failures += errs
            if len(res) != args.requests:
                failures.append(f"only {len(res)} of {args.requests} concurrent requests completed")

            statuses, problems, wall = run_malformed(url, model, args.malformed, concurrency=16)
            print(f"malformed:  {args.malformed} requests in {wall:.2f} s, status codes "
                  f"{dict(sorted(statuses.items()))}, {len(problems)} not a 4xx in OpenAI's error shape")
            failures += problems
            health = httpx.get(url + "health")
            after = one_chat(client, model, 999, 8)
            metrics = httpx.get(url + "metrics").json()
            c = metrics["counters"]
            print(f"after:      /health {health.status_code} {health.json()['status']}, a new chat got {after['tokens']} "
                  f"tokens; server counted {c.get('http_2xx', 0)} 2xx, {c.get('http_4xx', 0)} 4xx, "
                  f"{c.get('http_5xx', 0)} 5xx; server decode p50 {metrics['decode_tokens_per_s'].get('p50')} tokens/s "
                  f"per request")
            if health.status_code != 200 or after["tokens"] == 0:
                failures.append("the server is not healthy after the malformed requests")
            if c.get("http_5xx", 0):
                failures.append(f"{c['http_5xx']} responses were 5xx")
        finally:
            proc.terminate()
            proc.wait(30)
    for f in failures[:20]:
        print("FAIL:", f)
    print("OK: all checks passed" if not failures else f"FAILED: {len(failures)} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
