"""The API of a server whose model is not a chat model, in the shapes clients already speak:

    POST /v1/embeddings              OpenAI's: input string or list, encoding_format float|base64, dimensions, usage
    POST /v1/classify                {"input": str|[str]} -> data[i].labels [{label, score}] (best first)
    POST /v1/rerank                  llama-server's / the hosted rerank APIs': query, documents, top_n -> results
                                     [{index, relevance_score, document}] best first
    POST /v1/audio/transcriptions    OpenAI's multipart form: file, language, prompt, temperature,
                                     response_format json|text|verbose_json|srt|vtt
    GET  /v1/models  /health  /info  /metrics

Errors, auth and body limits are those of the chat API (lib.serving.api): OpenAI's error shape, Bearer key, strict
bodies. The work runs in a thread (never on the event loop), one request at a time per model.
"""

from __future__ import annotations

import base64
import tempfile
import time
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from pydantic import Field, field_validator

from lib.config import ServeConfig
from lib.serving.api import (
    APIError,
    _Body,
    add_fallback_routes,
    check_bearer,
    install_error_handlers,
    read_json_body,
)
from lib.serving.engine import Metrics
from lib.serving.ollama import OllamaFace
from lib.serving.task_models import InputTooLong, TaskModel

MAX_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request
RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


def _texts(v, what: str = "input") -> list[str]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items:
        raise ValueError(f"expected a string or a non-empty list of strings as {what}")
    if all(isinstance(x, int) for x in items) or all(isinstance(x, list) for x in items):
        raise ValueError("token-id input is not supported here: send the text itself")
    if not all(isinstance(x, str) for x in items):
        raise ValueError("expected a string or a list of strings")
    if len(items) > MAX_INPUTS:
        raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(items)}")
    if any(not x for x in items):
        raise ValueError("an input is empty; every input must be a non-empty string")
    return items


class _TextsBody(_Body):
    """A request naming the model and one text or a list of them as `input`."""

    model: str
    input: list[str]

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v):
        return _texts(v)


class EmbeddingsBody(_TextsBody):
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate: bool = False  # an extension: embed the first tokens of a text the model cannot read whole


class ClassifyBody(_TextsBody):
    top_k: int | None = Field(default=None, ge=1)


class RerankBody(_Body):
    model: str
    query: str = Field(min_length=1)
    documents: list[str]
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True

    @field_validator("documents", mode="before")
    @classmethod
    def _docs(cls, v):
        """Strings, or {"text": ...} objects as some clients send them."""
        if isinstance(v, list):
            v = [d["text"] if isinstance(d, dict) and isinstance(d.get("text"), str) else d for d in v]
        return _texts(v, "documents")


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def subtitles(result: dict, fmt: str) -> str:
    """The transcript as SRT or WebVTT cues."""
    sep = "," if fmt == "srt" else "."
    cues = [f"{_timestamp(s['start'], sep)} --> {_timestamp(s['end'], sep)}\n{s['text'].strip()}\n"
            for s in result["segments"]]
    if fmt == "srt":
        return "\n".join(f"{i + 1}\n{c}" for i, c in enumerate(cues))
    return "WEBVTT\n\n" + "\n".join(cues)


class TaskServer:
    """Routes over one TaskModel; `app` is the FastAPI application (lib.app mounts the page on it)."""

    def __init__(self, model: TaskModel, serve: ServeConfig, api_key: str | None = None):
        self.model, self.serve, self.api_key = model, serve, api_key
        self.metrics = Metrics()
        self.max_body = int(serve.max_body_mb * 2**20)
        self.app = self._build()

    def _auth(self, request: Request) -> None:
        check_bearer(request, self.api_key)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model.id:
            raise APIError(404, f"The model '{name}' does not exist on this server; it serves '{self.model.id}' "
                                f"(see GET /v1/models)", param="model", code="model_not_found")

    async def _run(self, fn, *args, **kw):
        t0 = time.monotonic()
        try:
            return await run_in_threadpool(fn, *args, **kw)
        finally:
            self.metrics.observe(time.monotonic() - t0, None, 0)

    # -- the endpoints -------------------------------------------------------------------------------------

    async def embeddings(self, request: Request):
        body = await read_json_body(request, EmbeddingsBody, self.max_body)
        self._check_model(body.model)
        try:
            vectors, n_tokens = await self._run(self.model.embed, body.input, body.truncate)
        except InputTooLong as e:
            raise APIError(400, str(e), param="input", code="context_length_exceeded") from None
        d = vectors.shape[1]
        if body.dimensions is not None:
            if body.dimensions > d:
                raise APIError(400, f"dimensions {body.dimensions} is more than this model's {d}",
                               param="dimensions", code="invalid_value")
            if body.dimensions < d:  # shortened the way OpenAI's text-embedding-3 models are: cut, then re-normalised
                vectors = vectors[:, :body.dimensions]
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if body.encoding_format == "base64":
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            data = vectors.tolist()
        self.metrics.inc("embeddings", len(data))
        return {"object": "list", "model": self.model.id,
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    async def classify(self, request: Request):
        body = await read_json_body(request, ClassifyBody, self.max_body)
        self._check_model(body.model)
        results, n_tokens = await self._run(self.model.classify, body.input)
        data = [{"object": "classification", "index": i, "label": labels[0]["label"], "score": labels[0]["score"],
                 "labels": labels[:body.top_k] if body.top_k else labels} for i, labels in enumerate(results)]
        return {"object": "list", "model": self.model.id, "data": data,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    async def rerank(self, request: Request):
        body = await read_json_body(request, RerankBody, self.max_body)
        self._check_model(body.model)
        scores, n_tokens = await self._run(self.model.rerank, body.query, body.documents)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:body.top_n]
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": body.documents[i]}} if body.return_documents else {})} for i in order]
        return {"object": "list", "id": f"rerank-{int(time.time() * 1000)}", "model": self.model.id,
                "results": results, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    async def transcriptions(self, request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise APIError(415, "send the audio as multipart/form-data with a 'file' field (OpenAI's shape), "
                                f"got {ctype or 'no Content-Type'}", code="unsupported_media_type")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise APIError(413, f"the upload is {int(declared)} bytes; this server takes at most {self.max_body} "
                                "(serve.max_body_mb)", code="request_too_large")
        async with request.form(max_files=1, max_fields=16) as form:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise APIError(400, "the form has no 'file' field holding the audio", param="file",
                               code="missing_required_parameter")
            fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
            unknown = set(fields) - {"model", "language", "prompt", "response_format", "temperature"}
            if unknown:
                raise APIError(400, f"unknown form field(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0],
                               code="unknown_parameter")
            self._check_model(fields.get("model"))
            fmt = fields.get("response_format", "json")
            if fmt not in RESPONSE_FORMATS:
                raise APIError(400, f"response_format {fmt!r}: expected one of {', '.join(RESPONSE_FORMATS)}",
                               param="response_format", code="invalid_value")
            temperature = None
            if "temperature" in fields:
                try:
                    temperature = float(fields["temperature"])
                except ValueError:
                    temperature = -1.0
                if not 0.0 <= temperature <= 1.0:
                    raise APIError(400, "temperature: expected a number from 0 to 1", param="temperature",
                                   code="invalid_value")
            with tempfile.NamedTemporaryFile(suffix="-" + (upload.filename or "audio")[-40:].replace("/", "_")) as f:
                while chunk := await upload.read(1 << 20):
                    f.write(chunk)
                f.flush()
                try:
                    result = await self._run(self.model.transcribe, f.name, fields.get("language") or None,
                                             fields.get("prompt") or None, temperature)
                except (ValueError, RuntimeError, OSError) as e:  # PyAV cannot decode it, an unknown language …
                    raise APIError(400, f"cannot transcribe {upload.filename or 'the upload'}: {e}", param="file",
                                   code="invalid_audio") from None
        self.metrics.inc("audio_seconds", int(result["duration"]))
        if fmt == "text":
            return PlainTextResponse(result["text"] + "\n")
        if fmt in ("srt", "vtt"):
            return PlainTextResponse(subtitles(result, fmt), media_type="text/vtt" if fmt == "vtt" else "text/plain")
        if fmt == "verbose_json":
            return result
        return {"text": result["text"]}

    # -- the app -------------------------------------------------------------------------------------------

    def _model_card(self) -> dict:
        return {"id": self.model.id, "object": "model", "created": int(self.metrics.started),
                "owned_by": "models-at-home", "kind": self.model.kind}

    def _build(self) -> FastAPI:
        app = FastAPI(title="Models at Home", docs_url=None, redoc_url=None, openapi_url=None)
        auth = [Depends(self._auth)]
        install_error_handlers(app)
        routes = {"embedding": ("/v1/embeddings", self.embeddings), "classifier": ("/v1/classify", self.classify),
                  "reranker": ("/v1/rerank", self.rerank),
                  "speech": ("/v1/audio/transcriptions", self.transcriptions)}
        path, endpoint = routes[self.model.kind]

        @app.get("/health")
        async def health():
            return {"status": "ok", "model": self.model.id, "kind": self.model.kind}

        @app.get("/info", dependencies=auth)
        async def info():
            return {"model": self.model.describe(), "auth": "bearer" if self.api_key else "none"}

        @app.get("/metrics", dependencies=auth)
        async def get_metrics():
            return {**self.metrics.snapshot(), "model": self.model.id}

        @app.get("/v1/models", dependencies=auth)
        async def list_models():
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model_id:path}", dependencies=auth)
        async def get_model(model_id: str):
            self._check_model(model_id)
            return self._model_card()

        app.add_api_route(path, endpoint, methods=["POST"], dependencies=auth)
        OllamaFace(self.serve, task=self.model).add_routes(app, [self._auth])
        add_fallback_routes(app, {"/v1/models": "GET", path: "POST"}, auth)
        return app
