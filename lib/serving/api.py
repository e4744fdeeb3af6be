"""The OpenAI-compatible HTTP API, served by FastAPI in the same process as the UI.

    GET  /v1/models                 the served model
    POST /v1/chat/completions       chat (the tokenizer's chat template); "stream": true sends SSE, then [DONE]
    POST /v1/completions            raw text continuation
    GET  /health  /info  /metrics   liveness, model + capabilities, counters and latencies

Any bad request gets a 4xx in OpenAI's error shape {"error": {"message", "type", "param", "code"}}: bodies are
parsed here (JSON only, size-capped, NaN rejected) and validated by strict pydantic models, so nothing a client
sends reaches the engine unchecked. With an API key, /v1, /info and /metrics need `Authorization: Bearer <key>`.
POST bodies must be sent as application/json: a web page in the user's browser cannot send that cross-site
without a CORS preflight (which this server never grants), so it cannot drive a server on localhost.

Not here: the engine (lib.serving.engine), binding (lib.serving.server), mounting the UI (lib.app).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
import uuid
from dataclasses import replace
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from lib.chat import ChatTemplateError, content_text, encode_chat
from lib.config import ServeConfig
from lib.serving.constrain import grammar_for
from lib.serving.engine import Engine, EngineBusy, Metrics
from lib.serving.llamacpp import NoFreeSequence
from lib.serving.ollama import OllamaFace
from lib.serving.text import ContextTooLong, sampling_params
from lib.serving.tools import ToolError, ToolPlan, as_text_messages, template_knows_tools

# After deciding on 413, the rest of an oversized body is read and dropped (never stored) so that the client, still
# sending, gets to read the answer instead of a reset connection; past this many times the limit we hang up.
DRAIN_FACTOR = 64
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 8  # choices per request (llama-server and vLLM take more; each one is a generation of its own)
API_ROUTES = {"/v1/models": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST"}
SERVICE_ROUTES = ("/health", "/info", "/metrics")  # GET only


class APIError(Exception):
    """An error answered in OpenAI's shape with a given HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------------------------------------------------
# Request bodies. Strict: "0.5" is not a number and 1 is not a boolean; unknown fields are errors (a typo such as
# "max_token" would otherwise be silently ignored), except the few that OpenAI clients send and that change
# nothing here.


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class FunctionCall(_Body):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1_000_000)  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = Field(None, max_length=256)  # the call a "tool" message answers
    refusal: str | None = None  # echoed back by some clients on assistant messages; nothing to render

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v):
        """A string, or a list of {"type": "text", "text": ...} parts (joined); no images or audio."""
        if v is None:
            return None
        try:
            return content_text(v, strict=True)
        except ValueError:
            raise ValueError('expected a string or a list of {"type": "text", "text": "..."} parts '
                             '(this model reads text only)') from None

    @model_validator(mode="after")
    def _complete(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may leave it out)")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self


def _check_stop(v):
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError("expected a string or a list of strings")
    if len(items) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(items)}")
    if any(not s or len(s) > 256 for s in items):
        raise ValueError("each stop sequence must be 1 to 256 characters long")
    return items


class _Sampling(_Body):
    """Fields shared by both endpoints."""

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict | None = None
    user: str | None = None
    # Extensions many OpenAI-compatible servers accept (vLLM, llama.cpp); lib.model.generate implements them.
    top_k: int | None = Field(None, ge=0, le=100_000)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, v):
        return _check_stop(v)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None
    store: bool | None = None
    metadata: dict | None = None
    service_tier: str | None = None


class CompletionRequest(_Sampling):
    prompt: Any
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for this endpoint; 0 with echo scores the prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=20)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        """A string or a list of token ids; a list of one of those is accepted too (batches are not)."""
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return v
        if isinstance(v, list) and len(v) > 1 and all(isinstance(p, (str, list)) for p in v):
            raise ValueError("several prompts in one request are not supported; send one request per prompt")
        raise ValueError("expected a string or a list of token ids")


def _unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def _check_unsupported(body: _Sampling) -> None:
    """Parameters OpenAI has and this server cannot honour: an error, never a silent ignore."""
    if (body.n or 1) > MAX_N:
        raise _unsupported("n", f"at most {MAX_N} choices per request (got {body.n}); send several requests instead")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise _unsupported(name, "not supported (only 0); use repetition_penalty (e.g. 1.1) instead")
    if body.logit_bias:
        raise _unsupported("logit_bias", "not supported")
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        if body.functions or body.function_call not in (None, "none"):
            raise _unsupported("functions" if body.functions else "function_call",
                               "the deprecated functions API is not supported; send tools and tool_choice")
        if body.tools and body.response_format and body.response_format.get("type") != "text" \
                and body.tool_choice not in (None, "none"):
            raise _unsupported("response_format", "with tools, the reply's form is the tool call's; send one of them")
        if body.max_tokens is not None and body.max_completion_tokens is not None \
                and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens differ; send one of them", param="max_tokens")
    else:
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 returns nothing without echo (echo with logprobs scores the prompt)",
                           param="max_tokens", code="invalid_value")
        if body.logprobs is not None and body.echo:  # the prompt's, from one forward pass over it (_score)
            if (body.max_tokens or 0) > 1:
                raise _unsupported("logprobs", "with echo, log probabilities come with at most one new token "
                                               "(max_tokens 0 or 1: what scoring a text needs)")
            if body.max_tokens == 1 and (body.temperature or 0) > 0:
                raise _unsupported("logprobs", "with echo and a new token, only greedy (temperature 0)")
        if body.logprobs is not None and body.stream:
            raise _unsupported("stream", "log probabilities of completions are not streamed (chat's are)")
        if body.suffix:
            raise _unsupported("suffix", "insertion (suffix) is not supported")
        if (body.best_of or 1) > 1:
            raise _unsupported("best_of", "only best_of=1 is supported")


# ---------------------------------------------------------------------------------------------------------
# Turning pydantic's and Starlette's errors into OpenAI's shape.


def _param(loc) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def _validation_error(errors: list[dict]) -> APIError:
    first = errors[0]
    param = _param(first.get("loc", ()))
    kind = first.get("type", "")
    if kind == "missing":
        code, msg = "missing_required_parameter", "required parameter is missing"
    elif kind == "extra_forbidden":
        code, msg = "unknown_parameter", "unrecognized request argument"
    elif kind in ("model_type", "dict_type") and not param:
        code, msg = "invalid_type", "the request body must be a JSON object"
    else:
        code = "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
        msg = first.get("msg", "invalid value").removeprefix("Value error, ")
        if "input" in first and kind not in ("json_invalid",):
            shown = json.dumps(first["input"], default=str)
            msg += f" (got {shown[:80]}{'…' if len(shown) > 80 else ''})"
    more = f" ({len(errors) - 1} more problem{'s' if len(errors) > 2 else ''} in this request)" if len(errors) > 1 else ""
    return APIError(400, f"{param + ': ' if param else ''}{msg}{more}", param=param, code=code)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def _too_large(request: Request, limit: int, received: int, declared: int | None) -> APIError:
    """The 413 for a body over `limit`, after dropping what the client still sends (up to DRAIN_FACTOR x limit)."""
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > DRAIN_FACTOR * limit:
                break
    except Exception:  # the client gave up: nothing left to drain
        pass
    size = f"{declared} bytes" if declared is not None else f"over {limit} bytes"
    return APIError(413, f"the request body is {size}; the limit is {limit} bytes ({limit / 2**20:g} MB, "
                         "serve.max_body_mb)", code="request_too_large", headers={"Connection": "close"})


def _bad_strings(value, path: str = "") -> str | None:
    """The first place in parsed JSON holding a string that is not valid Unicode text (a lone surrogate such as
    "\\udcff": legal JSON escapes, but no UTF-8 can carry them, so they would fail deep inside the engine)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            where = _bad_strings(k, path) or _bad_strings(v, f"{path}.{k}" if path else str(k))
            if where:
                return where
    elif isinstance(value, list):
        for i, v in enumerate(value):
            where = _bad_strings(v, f"{path}[{i}]")
            if where:
                return where
    return None


async def read_json_body(request: Request, model: type[BaseModel], limit: int) -> Any:
    """The request body as a validated `model`, or an APIError (415, 413, 400) saying what is wrong. The body is
    read in chunks and never held beyond `limit` bytes."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json' "
                            f"(got {ctype or 'no Content-Type'})", code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise await _too_large(request, limit, 0, int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise await _too_large(request, limit, size, None)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start}: {e.reason})",
                       code="invalid_json") from None
    except ValueError as e:
        detail = f" ({e})" if isinstance(e, json.JSONDecodeError) or "JSON" in str(e) else ""
        raise APIError(400, f"we could not parse the JSON body of your request{detail}", code="invalid_json") from None
    where = _bad_strings(data)
    if where:
        param = where.split(".")[0].split("[")[0] if where != "body" else None
        raise APIError(400, f"{where}: the string holds a lone UTF-16 surrogate (an escape such as \\udcff without "
                            "its pair), which is not valid Unicode text", param=param, code="invalid_value")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors(include_url=False)) from None


# ---------------------------------------------------------------------------------------------------------
# The app.


def _now() -> int:
    return int(time.time())


def _grammar(response_format: dict | None) -> str | None:
    """The grammar `response_format` asks for (lib.serving.constrain), or a 400 naming what cannot be done."""
    if response_format is None or response_format.get("type") == "text":
        return None
    try:
        return grammar_for(response_format)
    except ValueError as e:
        raise APIError(400, f"response_format: {e}", param="response_format", code="invalid_value") from None


def chat_logprobs(tokenizer, entries: list) -> list[dict]:
    """Handle.logprobs entries in chat's shape: token text, logprob, UTF-8 bytes, and the most likely alternatives."""
    def one(i: int, value: float) -> dict:
        text = tokenizer.decode([i])
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return [{**one(t, v), "top_logprobs": [one(i, lv) for i, lv in top]} for t, v, top in entries]


def legacy_logprobs(tokenizer, entries: list) -> dict:
    """Handle.logprobs entries in the completions endpoint's (legacy) shape."""
    tokens = [tokenizer.decode([t]) for t, _, _ in entries]
    offsets = [0, *itertools.accumulate(len(t) for t in tokens)][:len(tokens)]
    return {"tokens": tokens, "token_logprobs": [v for _, v, _ in entries],
            "top_logprobs": [{tokenizer.decode([i]): lv for i, lv in top} for _, _, top in entries],
            "text_offset": offsets}


def _usage(handles: list) -> dict:
    """A request's token counts: its prompt once, the completion tokens of all its choices."""
    prompt, completion = handles[0].prompt_tokens, sum(h.completion_tokens for h in handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _merged(handles: list, poll_s: float | None = None):
    """(choice index, kind, value) from several generations as their events come; with `poll_s`, also
    (-1, "idle", "") when none had anything for that long. Ends when every one has ended."""
    if len(handles) == 1:  # the common case, without tasks
        async for kind, value in handles[0].aiter(poll_s):
            yield (-1 if kind == "idle" else 0), kind, value
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, h):
        async for kind, value in h.aiter():
            await q.put((i, kind, value))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            try:
                i, kind, value = await asyncio.wait_for(q.get(), poll_s)
            except TimeoutError:
                yield -1, "idle", ""
                continue
            left -= kind != "text"
            yield i, kind, value
    finally:
        for t in tasks:
            t.cancel()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape ({"error": {...}}), never a traceback or the UI's HTML page."""
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, e: RequestValidationError):
        return _error_response(_validation_error(list(e.errors()) or [{"msg": "invalid request"}]))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(APIError(e.status_code, str(e.detail), code=code, headers=e.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        import traceback

        traceback.print_exception(e)
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error",
                                        code="internal_error"))


class OpenAIServer:
    """Routes over one Engine. `app` is the FastAPI application (the UI is mounted on it by lib.app).

    engine=None: a server started without a model (a fresh user opening the studio). Until `attach` gives it an
    engine, it answers in OpenAI's shape that there is nothing to serve yet, and `no_model` says how to get one.
    """

    def __init__(self, engine: Engine | None, serve: ServeConfig, api_key: str | None = None, no_model: str = ""):
        self.engine, self.serve, self.api_key, self.no_model = engine, serve, api_key, no_model
        self.metrics = engine.metrics if engine is not None else Metrics()
        self.max_body = int(serve.max_body_mb * 2**20)
        self.app = self._build()

    def attach(self, engine: Engine) -> None:
        """Start serving `engine` (built with this server's `metrics`, so the counts go on)."""
        self.engine = engine

    def _ready(self) -> None:
        if self.engine is None:
            raise APIError(503, f"no model is loaded: {self.no_model}", type="server_error", code="model_not_loaded")

    # -- auth ----------------------------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        check_bearer(request, self.api_key)

    # -- shared request handling ---------------------------------------------------------------------------

    def _check_model(self, name: str):
        loaded = self.engine.loaded
        if name not in (loaded.name, loaded.id):  # its API name, or what --model and the picker call it
            raise APIError(404, f"The model '{name}' does not exist on this server; it serves '{loaded.name}' "
                                f"(see GET /v1/models)", param="model", code="model_not_found")
        return loaded

    def _params(self, body: _Sampling, max_tokens: int | None, prompt_len: int, loaded, prompt_param: str):
        """Sampling parameters; like OpenAI, a max_tokens that does not fit the context is an error, not cut."""
        room = loaded.context_length - prompt_len
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {loaded.context_length} tokens, but the "
                                f"prompt is {prompt_len} tokens; shorten it", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {loaded.context_length} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                                f"for the completion). Lower max_tokens to at most {room}.", param="max_tokens",
                           code="context_length_exceeded")
        extra = {}
        if body.top_k is not None:
            extra["top_k"] = body.top_k
        if body.repetition_penalty is not None:
            extra["repetition_penalty"] = body.repetition_penalty
        return sampling_params(self.serve.temperature if body.temperature is None else body.temperature,
                               self.serve.top_p if body.top_p is None else body.top_p,
                               min(max_tokens or self.serve.max_new_tokens, room), seed=body.seed, **extra)

    def _submit(self, ids, params, stop, loaded, n: int = 1) -> list:
        """The request's `n` generations (choices), queued together; a seeded request gives choice i the seed
        seed + i, so that the choices differ and the request stays reproducible."""
        handles = []
        try:
            for i in range(n):
                p = params if i == 0 or params.seed is None else replace(params, seed=params.seed + i)
                handles.append(self.engine.submit(ids, p, stop, loaded=loaded, loop=asyncio.get_running_loop()))
        except EngineBusy as e:
            for h in handles:
                h.cancel()
            raise APIError(503, f"the server is busy: {e}", type="server_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        except ContextTooLong as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        return handles

    async def _collect(self, request: Request, handles: list) -> None:
        """Wait for a non-streamed request's generations; a client that hangs up cancels them."""
        try:
            async for _, kind, value in _merged(handles, poll_s=0.5):
                if kind == "idle" and await request.is_disconnected():
                    for h in handles:
                        h.cancel()
                elif kind == "error":
                    raise APIError(500, value, type="server_error", code="generation_failed")
        finally:
            for h in handles:
                if h.finish_reason is None:
                    h.cancel()

    def _stream(self, handles: list, make_chunk, first: dict | None, include_usage: bool, usage_chunk, held=None):
        """Server-sent events: make_chunk(choice index, piece, finish_reason) for each piece of each choice as it
        comes, `first` (the role, an echoed prompt) opening every choice, usage last when asked, then [DONE].
        held(handle) -> (deltas, finish_reason): a choice's pieces are sent only once it is finished, as these."""
        async def events():
            # Starlette cancels this generator when the client disconnects; `finally` then stops the generations.
            try:
                if first is not None:
                    for i in range(len(handles)):
                        yield _sse(make_chunk(i, first, None))
                async for i, kind, value in _merged(handles):
                    if kind == "text" and held is None:
                        yield _sse(make_chunk(i, value, None))
                    elif kind == "done" and held is not None:
                        deltas, reason = held(handles[i])
                        for delta in deltas:
                            yield _sse(make_chunk(i, delta, None))
                        yield _sse(make_chunk(i, None, reason))
                    elif kind == "done":
                        yield _sse(make_chunk(i, None, value))
                    elif kind == "error":
                        yield _sse(error_body(value, "server_error", None, "generation_failed"))
                if include_usage:
                    yield _sse(usage_chunk())
                yield "data: [DONE]\n\n"
            finally:
                if any(h.finish_reason is None for h in handles):
                    for h in handles:
                        h.cancel()
                    self.engine.metrics.inc("client_disconnects")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- routes --------------------------------------------------------------------------------------------

    async def chat_completions(self, request: Request):
        body: ChatCompletionRequest = await read_json_body(request, ChatCompletionRequest, self.max_body)
        _check_unsupported(body)
        loaded = self._check_model(body.model)
        self.engine.metrics.inc("requests_chat")
        try:
            plan = ToolPlan.make(body.tools, body.tool_choice, loaded.tokenizer)
        except ToolError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_value") from None
        # "developer" is the newer name of "system"; chat templates know only the latter.
        messages = [{**m.model_dump(exclude_none=True, exclude={"refusal"}),
                     "role": "system" if m.role == "developer" else m.role} for m in body.messages]
        messages, tools = plan.conversation(messages) if plan else (as_text_messages(messages), None)
        n_chars = sum(len(m["content"]) for m in messages)
        if loaded.surely_too_long(n_chars):
            raise APIError(400, f"This model's maximum context length is {loaded.context_length} tokens; the messages "
                                f"are {n_chars} characters, far more than that", param="messages",
                           code="context_length_exceeded")
        try:
            # Tokenizing a long conversation takes a while: off the event loop, which keeps serving meanwhile.
            ids = await run_in_threadpool(encode_chat, loaded.tokenizer, messages, True, tools)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        params = self._params(body, body.max_tokens or body.max_completion_tokens, len(ids), loaded, "messages")
        grammar = plan.grammar if plan else _grammar(body.response_format)
        if grammar is not None:
            params = replace(params, grammar=grammar)
        if body.logprobs:
            params = replace(params, logprobs=body.top_logprobs or 0)
        handles = self._submit(ids, params, body.stop, loaded, body.n or 1)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", _now()
        sent = [0] * len(handles)  # log-probability entries already streamed, per choice

        def logprobs(i: int) -> dict | None:
            """The choice's log-probabilities not sent yet, in chat's shape (None when not asked for)."""
            if not body.logprobs:
                return None
            entries, sent[i] = handles[i].logprobs[sent[i]:], len(handles[i].logprobs)
            return {"content": chat_logprobs(loaded.tokenizer, entries), "refusal": None}

        def message(h) -> tuple[dict, str | None]:
            """A finished choice's message and finish reason (its tool calls parsed out of the text)."""
            content, calls = plan.parse(h.text) if plan else (h.text, [])
            reason = "tool_calls" if calls else _public_reason(h.finish_reason)
            return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}, reason

        if body.stream:
            def chunk(i, piece, finish):
                delta = piece if isinstance(piece, dict) else ({} if piece is None else {"content": piece})
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": loaded.name,
                        "choices": [{"index": i, "delta": delta, "logprobs": logprobs(i) if delta else None,
                                     "finish_reason": _public_reason(finish)}]}

            def held(h) -> tuple[list[dict], str | None]:
                """With tools, a choice is sent once finished: its text, or its calls as OpenAI's deltas (the
                call's id and name, then its arguments)."""
                said, reason = message(h)
                if "tool_calls" not in said:
                    return ([{"content": said["content"]}] if said["content"] else []), reason
                deltas = [{"content": said["content"]}] if said["content"] else []
                for k, c in enumerate(said["tool_calls"]):
                    deltas.append({"tool_calls": [{"index": k, "id": c["id"], "type": "function",
                                                   "function": {"name": c["function"]["name"], "arguments": ""}}]})
                    deltas.append({"tool_calls": [{"index": k, "function": {"arguments": c["function"]["arguments"]}}]})
                return deltas, reason

            usage = lambda: {"id": cid, "object": "chat.completion.chunk", "created": created,  # noqa: E731
                             "model": loaded.name, "choices": [], "usage": _usage(handles)}
            include = bool(body.stream_options and body.stream_options.include_usage)
            return self._stream(handles, chunk, {"role": "assistant", "content": ""}, include, usage,
                                held=held if plan else None)
        await self._collect(request, handles)
        choices = []
        for i, h in enumerate(handles):
            said, reason = message(h)
            choices.append({"index": i, "message": said, "logprobs": logprobs(i), "finish_reason": reason})
        return {"id": cid, "object": "chat.completion", "created": created, "model": loaded.name,
                "choices": choices, "usage": _usage(handles)}

    async def completions(self, request: Request):
        body: CompletionRequest = await read_json_body(request, CompletionRequest, self.max_body)
        _check_unsupported(body)
        loaded = self._check_model(body.model)
        self.engine.metrics.inc("requests_completions")
        tok = loaded.tokenizer
        if isinstance(body.prompt, str):
            if loaded.surely_too_long(len(body.prompt)):
                raise APIError(400, f"This model's maximum context length is {loaded.context_length} tokens; the "
                                    f"prompt is {len(body.prompt)} characters, far more than that", param="prompt",
                               code="context_length_exceeded")
            ids = await run_in_threadpool(tok.encode, body.prompt, add_special_tokens=True, verbose=False)
            prompt_text = body.prompt
        else:
            vocab = loaded.config.get("vocab_size") or len(tok)
            bad = next((t for t in body.prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt",
                               code="invalid_value")
            ids = list(body.prompt)
            prompt_text = tok.decode(ids)
        if not ids:  # an empty prompt starts a fresh document, which in training followed an end-of-text token
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if start is None:
                raise APIError(400, "prompt: must not be empty for this model", param="prompt", code="invalid_value")
            ids = [start]
        if body.max_tokens == 0 or body.echo and body.logprobs is not None:
            return await self._score(body, loaded, ids, prompt_text)
        params = self._params(body, body.max_tokens, len(ids), loaded, "prompt")
        if body.logprobs is not None:
            params = replace(params, logprobs=body.logprobs)
        handles = self._submit(ids, params, body.stop, loaded, body.n or 1)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", _now()
        echo = prompt_text if body.echo else ""

        if body.stream:
            def chunk(i, piece, finish):
                return {"id": cid, "object": "text_completion", "created": created, "model": loaded.name,
                        "choices": [{"index": i, "text": piece or "", "logprobs": None,
                                     "finish_reason": _public_reason(finish)}]}

            usage = lambda: {"id": cid, "object": "text_completion", "created": created,  # noqa: E731
                             "model": loaded.name, "choices": [], "usage": _usage(handles)}
            include = bool(body.stream_options and body.stream_options.include_usage)
            return self._stream(handles, chunk, echo or None, include, usage)
        await self._collect(request, handles)
        return {"id": cid, "object": "text_completion", "created": created, "model": loaded.name,
                "choices": [{"index": i, "text": echo + h.text,
                             "logprobs": None if body.logprobs is None else legacy_logprobs(tok, h.logprobs),
                             "finish_reason": _public_reason(h.finish_reason)} for i, h in enumerate(handles)],
                "usage": _usage(handles)}

    async def _score(self, body: CompletionRequest, loaded, ids: list[int], prompt_text: str) -> dict:
        """A completion answered from one forward pass over the prompt: with echo, the prompt's tokens and their
        log-probabilities (OpenAI's legacy shape: the first token has none); with max_tokens 1, the greedy next token
        and its own. What lm-eval's local-completions sends to score a continuation (echo, logprobs, max_tokens
        0 or 1)."""
        if len(ids) + (body.max_tokens or 0) > loaded.context_length:
            raise APIError(400, f"This model's maximum context length is {loaded.context_length} tokens; the prompt "
                                f"is {len(ids)}", param="prompt", code="context_length_exceeded")
        top = body.logprobs or 0
        try:
            logps, tops = await asyncio.wrap_future(self.engine.call(lambda m: m.score(ids, max(top, 1))))
        except NoFreeSequence as e:
            raise APIError(503, f"the server is busy: {e}", type="server_error", code="server_busy",
                           headers={"Retry-After": "1"}) from None
        tok = loaded.tokenizer
        piece = lambda i: tok.decode([i])  # noqa: E731
        tokens, token_logprobs, top_logprobs = [], [], []
        if body.echo:
            tokens = [piece(i) for i in ids]
            token_logprobs = [None, *logps]
            top_logprobs = [None, *({piece(i): v for i, v in t[:top]} for t in tops[:-1])]
        text = prompt_text if body.echo else ""
        if body.max_tokens:
            new, value = tops[-1][0]
            tokens.append(piece(new))
            token_logprobs.append(value)
            top_logprobs.append({piece(i): v for i, v in tops[-1][:top]})
            text += piece(new)
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        self.engine.metrics.inc("scored_tokens", len(ids))
        done = body.max_tokens or 0
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": _now(),
                "model": loaded.name,
                "choices": [{"index": 0, "text": text, "finish_reason": "length",
                             "logprobs": None if body.logprobs is None else {
                                 "tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                                 "text_offset": offsets}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done}}

    def _model_card(self) -> dict:
        loaded = self.engine.loaded
        return {"id": loaded.name, "object": "model", "created": int(self.engine.metrics.started),
                "owned_by": "models-at-home", "kind": "chat", "context_length": loaded.context_length}

    def info(self) -> dict:
        return {
            "model": self.engine.loaded.describe(),
            "capabilities": {"chat_completions": True, "completions": True, "streaming": True, "stop": True,
                             "seed": True, "n": MAX_N, "logprobs": "chat and completions (top 20 at most; completions' echo: the prompt's)",
                             "tools": "native" if template_knows_tools(self.engine.loaded.tokenizer) else "generic",
                             "response_format": ["text", "json_object", "json_schema"], "images": False,
                             "extensions": ["top_k", "repetition_penalty"]},
            "defaults": {"max_tokens": self.serve.max_new_tokens, "temperature": self.serve.temperature,
                         "top_p": self.serve.top_p, "max_tokens_completions": 16},
            "engine": self.engine.pending(),
            "auth": "bearer" if self.api_key else "none",
        }

    def _build(self) -> FastAPI:
        # No /docs: its page loads scripts from a CDN, and the UI owns every path the API does not use.
        app = FastAPI(title="Models at Home", docs_url=None, redoc_url=None, openapi_url=None)
        auth = [Depends(self._auth)]
        ready = [*auth, Depends(self._ready)]
        metrics = self.metrics

        install_error_handlers(app)

        @app.get("/health")
        async def health():
            if self.engine is None:
                return {"status": "no model", "model": None}
            alive = self.engine._thread.is_alive()
            body = {"status": "ok" if alive else "engine stopped", "model": self.engine.loaded.name}
            return JSONResponse(body, status_code=200 if alive else 503)

        @app.get("/info", dependencies=ready)
        async def info():
            return self.info()

        @app.get("/metrics", dependencies=ready)
        async def get_metrics():
            return {**metrics.snapshot(), "engine": self.engine.pending(), "model": self.engine.loaded.name}

        @app.get("/v1/models", dependencies=auth)
        async def list_models():
            return {"object": "list", "data": [self._model_card()] if self.engine is not None else []}

        @app.get("/v1/models/{model_id:path}", dependencies=ready)
        async def get_model(model_id: str):
            self._check_model(model_id)
            return self._model_card()

        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"], dependencies=ready)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"], dependencies=ready)
        OllamaFace(self.serve, chat=self).add_routes(app, [self._auth])

        add_fallback_routes(app, API_ROUTES, auth)
        return app


def check_bearer(request: Request, api_key: str | None) -> None:
    """With an API key, the request must carry 'Authorization: Bearer <key>' (compared in constant time)."""
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the key the "
                            "server was started with (--api-key)", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def add_fallback_routes(app: FastAPI, api_routes: dict[str, str], auth: list) -> None:
    """A 405 naming the right method on the service paths and the API's own, and a 404 in the API's shape for
    anything else under /v1 (else the UI mounted at / answers with its HTML page). Added after the real routes."""
    async def wrong_method(request: Request):
        raise APIError(405, f"{request.method} {request.url.path} is not allowed; use GET",
                       code="method_not_allowed", headers={"Allow": "GET"})

    for path in SERVICE_ROUTES:
        app.add_api_route(path, wrong_method, methods=["POST", "PUT", "PATCH", "DELETE"])

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], dependencies=auth)
    async def unknown(request: Request, rest: str):
        path = f"/v1/{rest}"
        if path in api_routes:
            raise APIError(405, f"{request.method} {path} is not allowed; use {api_routes[path]}",
                           code="method_not_allowed", headers={"Allow": api_routes[path]})
        raise APIError(404, f"no API endpoint {request.method} {path} (this server has "
                            f"{', '.join(f'{m} {p}' for p, m in api_routes.items())})", code="not_found")


def _public_reason(reason: str | None) -> str | None:
    """OpenAI knows "stop" and "length"; a cancelled generation is only ever seen by a client that left."""
    return {"cancelled": "stop", "error": "stop"}.get(reason, reason)


class StatusCounter:
    """Pure ASGI middleware counting API responses by status class (BaseHTTPMiddleware would break streaming)."""

    PREFIXES = ("/v1/", "/api/", "/health", "/info", "/metrics")

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.PREFIXES):
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.inc(f"http_{message['status'] // 100}xx")
            await send(message)

        self.metrics.inc("http_requests")
        await self.app(scope, receive, send=counting_send)
