"""The models 07_serve answers with other than chat: embeddings, classifiers, rerankers and speech-to-text, each
loaded by the library its authors made for it (lib.handlers declares which) and called one request at a
time (a lock: torch already spreads one forward over every core).

    model = load_task_model(ref, "embedding")          # the kind: lib.handlers.kind_of(ref)
    vectors, n_tokens = model.embed(["a text", "another"])
    model.describe()                                    # what /info and the UI show

Not here: the HTTP routes (lib.serving.task_api), the page (lib.serving.task_ui).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lib.check.detect import detect
from lib.check.source import open_source
from lib.errors import UserError
from lib.handlers import HANDLERS, handler_for
from lib.serving.engines import loader
from lib.serving.llamacpp import LlamaCppEmbeddings
from lib.serving.resolve import ModelRef

EMBED_BATCH = 32  # sentence-transformers' own default batch size


class InputTooLong(ValueError):
    """A text longer than the model reads; the API answers 400 naming the input's index."""

    def __init__(self, index: int, tokens: int, limit: int):
        super().__init__(f"input[{index}] is {tokens} tokens long; this model reads at most {limit}. Shorten it, "
                         "or send \"truncate\": true to embed its first tokens only")
        self.index = index


@dataclass
class TaskModel:
    ref: ModelRef
    kind: str
    engine: str
    model: Any
    parameters: int
    max_tokens: int | None  # the longest input the model reads (None: audio)
    config: dict = field(default_factory=dict)  # the model's config.json
    tokenizer: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def id(self) -> str:
        return self.ref.id

    @property
    def handler(self):
        return HANDLERS[self.kind]

    def describe(self) -> dict:
        return {"id": self.id, "kind": self.kind, "engine": self.engine, "source": self.ref.source,
                "path": str(self.ref.path or self.ref.gguf), "parameters": self.parameters,
                "max_tokens": self.max_tokens, "endpoints": list(self.handler.endpoints),
                "architecture": (self.config.get("architectures") or [self.config.get("model_type")])[0],
                "info": self.ref.info}

    def close(self) -> None:
        pass


@dataclass
class Embedder(TaskModel):
    """sentence-transformers' modules (Transformer → Pooling → Normalize as the model's modules.json says; a plain
    encoder gets mean pooling), run the way its encode() runs them, in batches of texts of similar length.

    Requests that arrive while a forward runs are combined: the next request to get the model embeds the texts of
    every request waiting, sorted by length together, and hands each its own vectors (fuller batches, less
    padding; each request still gets exactly the vectors it would alone)."""

    _waiting: list = field(default_factory=list, repr=False)
    _waiting_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # a transformers fast tokenizer is not thread-safe (each call sets its padding and truncation state): request
    # threads count tokens while the model's forward tokenizes its batch
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def dimensions(self) -> int:
        return self.model.get_embedding_dimension()

    def embed(self, texts: list[str], truncate: bool = False) -> tuple[np.ndarray, int]:
        """(vectors as float32 [n, d], tokens read). Too long a text raises InputTooLong unless truncate."""
        inputs, lengths = self.tokenize(texts)
        if not truncate:
            for i, n in enumerate(lengths):
                if n > self.max_tokens:
                    raise InputTooLong(i, n, self.max_tokens)
        lengths = [min(n, self.max_tokens) for n in lengths]
        job = {"inputs": inputs, "lengths": lengths, "out": None, "error": None}
        with self._waiting_lock:
            self._waiting.append(job)
        with self.lock:
            if job["out"] is None and job["error"] is None:  # nobody took it along: take everyone waiting
                with self._waiting_lock:
                    jobs, self._waiting = self._waiting, []
                try:
                    out = self.forward([x for j in jobs for x in j["inputs"]], [n for j in jobs for n in j["lengths"]])
                    at = 0
                    for j in jobs:
                        j["out"], at = out[at:at + len(j["inputs"])], at + len(j["inputs"])
                except Exception as e:  # every request of the batch gets the error
                    for j in jobs:
                        j["error"] = e
        if job["error"] is not None:
            raise job["error"]
        return job["out"], sum(lengths)

    def tokenize(self, texts: list[str]) -> tuple[list, list[int]]:
        """(what forward() takes for each text, its token count), in the request's thread: here the texts
        themselves (sentence-transformers tokenizes them in its batches)."""
        with self._tokenizer_lock:
            ids = self.model.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return texts, [len(x) for x in ids]

    def forward(self, texts: list, lengths: list[int]) -> np.ndarray:
        """The vectors of what tokenize() gave (token lengths after truncation given), under the lock."""
        import torch
        from sentence_transformers.util import batch_to_device

        st = self.model
        # batches of texts of equal token length, longest first: sentence-transformers sorts by characters, which
        # pads ~20% more tokens on KJV verses (bench/bench_embeddings.py); the vectors are the same
        order = np.argsort([-n for n in lengths], kind="stable")
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), EMBED_BATCH):
                idx = order[start:start + EMBED_BATCH]
                with self._tokenizer_lock:
                    features = st.preprocess([texts[i] for i in idx])
                features = batch_to_device(features, st.device)
                out[idx] = st(features)["sentence_embedding"].float().cpu().numpy()
        return out


class GgufEmbedder(Embedder):
    """A GGUF embedding model through llama.cpp (lib.serving.llamacpp.LlamaCppEmbeddings): the pooling the GGUF
    declares, unit vectors as llama-server gives them."""

    @property
    def dimensions(self) -> int:
        return self.model.dim

    def tokenize(self, texts: list[str]) -> tuple[list, list[int]]:
        ids = [self.model.tokenize(t) for t in texts]  # llama.cpp's tokenizer: token ids, tokenized once
        return ids, [len(x) for x in ids]

    def forward(self, ids: list, lengths: list[int]) -> np.ndarray:
        return self.model.embed([self.model.truncate(x) for x in ids])

    def close(self) -> None:
        self.model.close()


class Classifier(TaskModel):
    """transformers' *ForSequenceClassification: a score per label (softmax; sigmoid for multi-label models)."""

    def classify(self, texts: list[str]) -> tuple[list[list[dict]], int]:
        import torch

        tok, labels = self.tokenizer, self.model.config.id2label
        multi = self.model.config.problem_type == "multi_label_classification"
        results, n_tokens = [], 0
        with self.lock, torch.inference_mode():
            for start in range(0, len(texts), EMBED_BATCH):
                batch = tok(texts[start:start + EMBED_BATCH], padding=True, truncation=True,
                            max_length=self.max_tokens, return_tensors="pt")
                n_tokens += int(batch["attention_mask"].sum())
                logits = self.model(**batch).logits.float()
                scores = logits.sigmoid() if multi else logits.softmax(-1)
                for row in scores.tolist():
                    ranked = sorted(range(len(row)), key=lambda j: -row[j])
                    results.append([{"label": labels.get(j, f"LABEL_{j}"), "score": row[j]} for j in ranked])
        return results, n_tokens


class Reranker(TaskModel):
    """A cross-encoder (sentence-transformers' CrossEncoder): one relevance score per (query, document) pair."""

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        tok = self.model.tokenizer
        pairs = [(query, d) for d in documents]
        n_tokens = sum(len(ids) for ids in tok([query] * len(documents), documents, truncation=True,
                                                max_length=self.max_tokens)["input_ids"])
        with self.lock:
            scores = self.model.predict(pairs, batch_size=EMBED_BATCH, show_progress_bar=False)
        return [float(s) for s in np.asarray(scores).reshape(len(documents), -1)[:, 0]], n_tokens


class Transcriber(TaskModel):
    """faster-whisper (CTranslate2) on the CPU: int8 weights where the CPU has the instructions for them."""

    def transcribe(self, audio: str | Path, language: str | None = None, prompt: str | None = None,
                   temperature: float | None = None) -> dict:
        from faster_whisper.audio import decode_audio

        kw = {"beam_size": 5, "language": language, "initial_prompt": prompt}
        if temperature is not None:
            kw["temperature"] = temperature
        samples = decode_audio(str(audio), sampling_rate=self.model.feature_extractor.sampling_rate)
        if samples.size == 0:  # a file PyAV opens that holds no sound (faster-whisper would fail on it)
            raise ValueError("it holds no audio samples")
        with self.lock:
            segments, info = self.model.transcribe(samples, **kw)
            segs = [{"id": i, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text,
                     "avg_logprob": s.avg_logprob, "no_speech_prob": s.no_speech_prob}
                    for i, s in enumerate(segments)]  # decoding happens while iterating
        return {"task": "transcribe", "language": info.language, "duration": round(info.duration, 3),
                "text": "".join(s["text"] for s in segs).strip(), "segments": segs}


def kind_of(ref: ModelRef) -> str | None:
    """The handler kind that serves `ref`: what its install recorded, "chat" for the pipeline's own models, else
    from its files (lib.check.detect) as 05_check decides it; None when no handler does (07_serve then says what the
    model is). Detection reads a GGUF's whole metadata (9 s for Gemma 3's 262k-token vocabulary): not at every start."""
    if ref.info.get("kind"):
        return ref.info["kind"]
    if ref.source == "pipeline":
        return "chat"
    det = detect(open_source(str(ref.path or ref.gguf)))
    h = handler_for(det.task, det.full_config, det.loader)
    return h.kind if h else None


def load_task_model(ref: ModelRef, kind: str, device: str = "cpu") -> TaskModel:
    """Load `ref` (an HF or CTranslate2 folder) for the handler `kind`; a UserError names what is wrong."""
    import json

    folder = ref.path
    if folder is None and kind == "embedding":
        return loader("llama.cpp", kind)(ref, None, {}, device)
    if folder is None:
        raise UserError(f"{ref.gguf}: a {kind} model is served from its Hugging Face folder; GGUF {kind} models "
                        "are not served")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{folder / 'config.json'}: cannot read the model config ({e})") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr, in every start.sh's log
    load = loader(HANDLERS[kind].engine(config, has_gguf=False, device=device), kind)
    try:
        return load(ref, folder, config, device)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{folder}: cannot load it as a {kind} model ({type(e).__name__}: {e})") from None


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_embedder(ref, folder, config, device):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device=device, local_files_only=True, trust_remote_code=False)
    st.eval()
    return Embedder(ref=ref, kind="embedding", engine="sentence-transformers", model=st, parameters=_count(st),
                    max_tokens=st.max_seq_length, config=config)


def load_gguf_embedder(ref, folder, config, device):
    m = LlamaCppEmbeddings(ref.gguf)
    return GgufEmbedder(ref=ref, kind="embedding", engine="llama.cpp", model=m, parameters=m.n_params,
                        max_tokens=m.n_ctx_train, config={"model_type": m.meta("general.architecture")})


def load_classifier(ref, folder, config, device):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True).to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    limit = min(getattr(tok, "model_max_length", 512) or 512, config.get("max_position_embeddings") or 512)
    return Classifier(ref=ref, kind="classifier", engine="transformers", model=model, parameters=_count(model),
                      max_tokens=limit, config=config, tokenizer=tok)


def load_reranker(ref, folder, config, device):
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(folder), device=device, local_files_only=True, trust_remote_code=False)
    limit = ce.max_seq_length or min(ce.tokenizer.model_max_length, config.get("max_position_embeddings") or 512)
    return Reranker(ref=ref, kind="reranker", engine="sentence-transformers", model=ce, parameters=_count(ce.model),
                    max_tokens=limit, config=config)


def load_transcriber(ref, folder, config, device):
    import os

    import ctranslate2
    from faster_whisper import WhisperModel

    int8 = "int8" in ctranslate2.get_supported_compute_types("cpu")
    model = WhisperModel(str(folder), device="cpu" if device == "cpu" else "cuda",
                         compute_type="int8" if int8 and device == "cpu" else "default",
                         cpu_threads=len(os.sched_getaffinity(0)), local_files_only=True)
    size = (folder / "model.bin").stat().st_size
    return Transcriber(ref=ref, kind="speech", engine="faster-whisper", model=model, parameters=size // 2,
                       max_tokens=None, config=config)
