"""The llama.cpp engine behind 07_serve: GGUF files served as they are, the same greedy output as the torch engine
on our exports, batched decoding of concurrent replies, the same sampling knobs, and the torch fallback.
llama-cpp-python is built by install.sh; where it cannot be built these tests are skipped and serving uses torch."""

import json
import shutil
import subprocess
import sys
import threading

import httpx
import openai
import pytest
import torch
from conftest import ROOT

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (./install.sh builds it from source)")

from lib.app import build_app  # noqa: E402
from lib.chat import encode_chat  # noqa: E402
from lib.config import Config, ServeConfig  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.export.gguf import write_gguf  # noqa: E402
from lib.model.generate import SamplingParams  # noqa: E402
from lib.serving.engine import Engine  # noqa: E402
from lib.serving.loading import choose_engine, load_model  # noqa: E402
from lib.serving.resolve import resolve_model  # noqa: E402
from lib.serving.server import BackgroundServer  # noqa: E402

PROMPTS = ["Hello there", "And God said, Let there be light", "What is the capital of France?"]


@pytest.fixture(scope="module")
def export_dir(tiny_chat_model_talkative, tmp_path_factory):
    """An export-like folder: hf/ (our tiny model, never ends a reply early) and an f16 GGUF beside it."""
    d = tmp_path_factory.mktemp("export")
    shutil.copytree(tiny_chat_model_talkative, d / "hf")
    write_gguf(d / "hf", d / "tiny-f16.gguf", "f16", name="tiny")
    return d


@pytest.fixture(scope="module")
def both(export_dir):
    ref = resolve_model(str(export_dir), Config())
    assert ref.gguf == (export_dir / "tiny-f16.gguf").resolve() and ref.path == (export_dir / "hf").resolve()
    return load_model(ref, "cpu", "torch"), load_model(ref, "cpu", "llama.cpp", max_active=8, max_context=512)


def test_auto_picks_llama_cpp_for_a_gguf_and_says_why(export_dir, tiny_chat_model):
    ref = resolve_model(str(export_dir), Config())
    assert choose_engine(ref, "cpu") == ("llama.cpp", "engine llama.cpp on tiny-f16.gguf")
    engine, why = choose_engine(resolve_model(str(tiny_chat_model), Config()), "cpu")
    assert engine == "torch" and "has no GGUF file" in why
    with pytest.raises(UserError, match="serve.engine llama.cpp: the model has no GGUF file"):
        choose_engine(resolve_model(str(tiny_chat_model), Config()), "cpu", "llama.cpp")
    assert choose_engine(ref, "cpu", "torch") == ("torch", "engine torch (asked for)")


def test_greedy_output_is_identical_on_both_engines(both):
    torch_model, lcpp = both
    assert (torch_model.engine, lcpp.engine) == ("torch", "llama.cpp")
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=torch_model.stop_token_ids)
    for prompt in PROMPTS:
        ids = encode_chat(torch_model.tokenizer, [{"role": "user", "content": prompt}])
        ours = list(torch_model.stream(ids, params))
        assert len(ours) == 24
        assert list(lcpp.stream(ids, params)) == ours, prompt
        with torch.no_grad():
            ref_logits = torch_model.model.net(torch.tensor([ids]))[0][0, -1]
        theirs = torch.tensor(lcpp.model.logits_of_prompt(ids))
        assert (theirs - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()  # f16 weights


def test_sampling_knobs_mean_the_same(both):
    _, lcpp = both
    ids = encode_chat(lcpp.tokenizer, [{"role": "user", "content": "Hello"}])
    seeded = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    assert list(lcpp.stream(ids, seeded)) == list(lcpp.stream(ids, seeded))  # a seed reproduces the reply
    draws = {tuple(lcpp.stream(ids, SamplingParams(max_new_tokens=16, temperature=1.5, seed=s))) for s in range(4)}
    assert len(draws) > 1  # and sampling does sample
    assert len(list(lcpp.stream(ids, SamplingParams(max_new_tokens=5, temperature=0)))) == 5  # max tokens
    greedy = list(lcpp.stream(ids, SamplingParams(max_new_tokens=8, temperature=0)))
    assert list(lcpp.stream(ids, SamplingParams(max_new_tokens=8, temperature=0.7, top_k=1, seed=3))) == greedy
    stop = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[greedy[3]])
    assert list(lcpp.stream(ids, stop)) == greedy[:greedy.index(greedy[3])]  # a stop id ends it, unreturned


def test_api_serves_concurrent_replies_in_batched_decodes(both):
    _, lcpp = both
    engine = Engine(lcpp, max_active=8)
    try:
        with BackgroundServer(build_app(engine, ServeConfig(max_active=8), ui=False)) as url:
            client = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0, timeout=120)
            results, errors = [], []

            def ask(i):
                try:
                    r = client.chat.completions.create(model=lcpp.id, max_tokens=32, seed=i, messages=[
                        {"role": "user", "content": f"Tell me about day {i}"}])
                    results.append(r.usage.completion_tokens)
                except Exception as e:  # collected, asserted below
                    errors.append(e)

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert errors == [] and results == [32] * 8
            metrics = httpx.get(url + "metrics", timeout=10).json()["engine"]
            assert metrics["engine"] == "llama.cpp" and metrics["replies_per_decode"] > 1.5, metrics
            info = httpx.get(url + "info", timeout=10).json()["model"]
            assert info["engine"] == "llama.cpp" and info["gguf"].endswith("tiny-f16.gguf")

            # stop strings are cut by the engine's text stream, as on the torch path
            full = client.chat.completions.create(model=lcpp.id, max_tokens=16, temperature=0, messages=[
                {"role": "user", "content": "Hi"}]).choices[0].message.content
            cut = full[len(full) // 2:len(full) // 2 + 3]
            short = client.chat.completions.create(model=lcpp.id, max_tokens=16, temperature=0, stop=[cut], messages=[
                {"role": "user", "content": "Hi"}])
            assert short.choices[0].message.content == full[:full.index(cut)]
            assert short.choices[0].finish_reason == "stop"
    finally:
        engine.close()


@pytest.mark.slow
def test_07_serve_takes_a_gguf_file_or_a_folder_holding_one(export_dir, tmp_path):
    only = tmp_path / "only-gguf"
    only.mkdir()
    shutil.copy2(export_dir / "tiny-f16.gguf", only / "tiny-f16.gguf")
    for target, engine in [(only / "tiny-f16.gguf", "llama.cpp"), (only, "llama.cpp"),
                           (only / "tiny-f16.gguf", "torch")]:
        cmd = [sys.executable, str(ROOT / "07_serve.py"), "--model", str(target), "--prompt", "Hello",
               "--quiet-config", "--engine", engine, "--set", "serve.max_new_tokens=8"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.strip() and f"engine {engine}" in res.stderr
    bad = tmp_path / "notes.txt"
    bad.write_text("hi")
    res = subprocess.run([sys.executable, str(ROOT / "07_serve.py"), "--model", str(bad), "--prompt", "x",
                          "--quiet-config"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "expected a model directory or a .gguf file" in res.stderr
    assert "Traceback" not in res.stderr


def test_info_json_is_plain_and_says_what_runs(both):
    """/info's model description survives JSON unchanged and names the engine, the GGUF and the model's sizes on both
    engines alike."""
    torch_side, lcpp = both
    for loaded, engine in ((torch_side, "torch"), (lcpp, "llama.cpp")):
        d = loaded.describe()
        assert json.loads(json.dumps(d)) == d
        assert d["engine"] == engine and d["gguf"].endswith("tiny-f16.gguf")
    assert {k: lcpp.describe()[k] for k in ("vocab_size", "stop_token_ids")} == \
           {k: torch_side.describe()[k] for k in ("vocab_size", "stop_token_ids")}
    # the context each engine runs with: llama.cpp's KV cache was sized at 512 tokens, torch serves the model's own
    assert lcpp.describe()["context_length"] == 512 < torch_side.describe()["context_length"]


_CONTEXT_PROBE = r"""
import ctypes, json, re, sys
import llama_cpp as L
import lib.serving.llamacpp as lc
lines = []
@L.llama_log_callback
def keep(level, text, user_data):
    lines.append(text.decode("utf-8", "replace"))
lc._LOG_CALLBACK = keep  # quiet_logs() then leaves this one in place
L.llama_log_set(keep, ctypes.c_void_p(0))
out = {}
for n_ctx_seq in (4096, 8192):
    lines.clear()
    model = lc.LlamaCppModel(sys.argv[1], n_ctx_seq=n_ctx_seq, n_seq=2)
    log = "".join(lines)
    out[n_ctx_seq] = {"flash_attn": re.search(r"flash_attn\s*=\s*(\w+)", log).group(1),
                      "n_ctx_seq": int(re.search(r"n_ctx_seq\s*=\s*(\d+)", log).group(1)),
                      "compute_mib": float(re.search(r"compute buffer size\s*=\s*([\d.]+) MiB", log).group(1))}
    model.close()
print(json.dumps(out))
"""


def test_chat_context_decodes_without_flash_attention_and_the_check_counts_its_scores(smollm2_gguf):
    """The chat engine's llama.cpp context, as llama.cpp itself reports it: flash attention off and a KV stream per
    sequence (bench_serving_engines: single-stream decode 79 vs 61 tok/s on SmolLM2 with llama.cpp's default "auto"),
    and the compute buffer that this costs for long contexts is what 05_check adds as attention scores."""
    from lib.check.formulas import llama_cpp_estimates
    from lib.model.dims import Dims

    res = subprocess.run([sys.executable, "-c", _CONTEXT_PROBE, str(smollm2_gguf)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    ctx = {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}
    assert {c["flash_attn"] for c in ctx.values()} == {"disabled"}
    assert [ctx[n]["n_ctx_seq"] for n in (4096, 8192)] == [4096, 8192]  # each of the 2 sequences its own stream
    grown = (ctx[8192]["compute_mib"] - ctx[4096]["compute_mib"]) * 2**20
    smol = Dims(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152)
    scores = {n: llama_cpp_estimates(smol, {"q": 0}, n, 2, 0)["by_quant"]["q"]["attention_scores"] for n in (4096, 8192)}
    assert scores[4096] == 0  # up to here the scores fit in the logits' memory: the buffer does not grow
    assert 0.7 * grown <= scores[8192] - scores[4096] <= 1.3 * grown, (grown, scores)


# after the batching test: these run replies on the same llama.cpp model, whose decode counters it reads
def test_prompt_scores_agree_on_both_engines_and_through_the_api(both):
    """LoadedModel.score (what /v1/completions' echo + logprobs answers from) gives llama.cpp's log-probabilities
    what the torch engine gives (f16 weights against fp32), top tokens included; through the API on llama.cpp too,
    while replies are being generated beside it."""
    torch_model, lcpp = both
    ids = torch_model.tokenizer.encode("And God said, Let there be light: and there was light.")
    (ta, tt), (la, lt) = torch_model.score(ids, 3), lcpp.model.score(ids, 3)
    assert len(ta) == len(la) == len(ids) - 1 and len(tt) == len(lt) == len(ids)
    assert max(abs(a - b) for a, b in zip(ta, la)) < 0.05
    assert [t[0][0] for t in tt] == [t[0][0] for t in lt]  # the same most likely token at every position
    engine = Engine(lcpp)
    try:
        with BackgroundServer(build_app(engine, ServeConfig(), ui=False)) as url:
            busy = engine.submit(ids, SamplingParams(max_new_tokens=64, temperature=0.8, seed=1))
            r = httpx.post(url + "v1/completions", timeout=60, json={
                "model": lcpp.name, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
            assert r["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(la, abs=1e-4)
            busy.cancel()
    finally:
        engine.close()


def test_json_schema_and_json_object_replies_follow_the_grammar(both):
    """response_format (OpenAI) and format (Ollama) on both engines (llama.cpp's grammar sampler; llguidance's mask
    for torch): even a random-weight model's replies parse and are valid against the schema; a keyword the grammar
    cannot express is a 400 naming it."""
    import jsonschema
    import ollama

    torch_model, lcpp = both
    verdict = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"},
                                                "score": {"type": "integer"}},
               "required": ["answer", "sure", "score"], "additionalProperties": False}
    # a long string: llama.cpp's GBNF nests an optional per character, 32 deep, beyond what llguidance's Lark reader
    # takes; the torch engines compile the schema itself (lib.serving.constrain.Grammar)
    # (and a score from a list: llguidance's integers have no digit limit, and this model repeats its last token)
    wordy = {**verdict, "properties": {**verdict["properties"], "score": {"enum": [1, 2, 3]},
                                       "why": {"type": "string", "maxLength": 32}},
             "required": [*verdict["required"], "why"]}
    engine, other = Engine(lcpp), Engine(torch_model)
    try:
        for served, seeds, schema, room in ((lcpp, range(3), verdict, 200), (torch_model, range(2), wordy, 600)):
            with BackgroundServer(build_app(engine if served is lcpp else other,
                                            ServeConfig(), ui=False)) as url:
                client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
                ask = dict(model=served.name, messages=[{"role": "user", "content": "Is the sky blue?"}],
                           max_tokens=room)
                for seed in seeds:
                    r = client.chat.completions.create(**ask, seed=seed, temperature=1.0, response_format={
                        "type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
                    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
                r = client.chat.completions.create(**ask, temperature=0, response_format={"type": "json_object"})
                reply = r.choices[0].message.content  # an object at the top (random weights: it may run to max_tokens)
                assert reply.startswith("{") and (r.choices[0].finish_reason == "length"
                                                  or isinstance(json.loads(reply), dict)), reply
                said = ollama.Client(host=url.rstrip("/")).chat(model=served.name, messages=ask["messages"],
                                                                 format=schema, options={"num_predict": room, "seed": 4})
                jsonschema.validate(json.loads(said.message.content), schema)
                for keyword, value in (("uniqueItems", True), ("maximum", 9)):  # llama.cpp's converter ignores both
                    bad = {**schema, "properties": {**schema["properties"], "tags": {"type": "array", keyword: value}}}
                    with pytest.raises(openai.BadRequestError, match=f"properties.tags.{keyword}"):
                        client.chat.completions.create(**ask, response_format={
                            "type": "json_schema", "json_schema": {"name": "v", "schema": bad}})
    finally:
        engine.close()
        other.close()
