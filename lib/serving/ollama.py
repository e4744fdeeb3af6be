"""Ollama's API beside OpenAI's on the same port: the subset apps that speak Ollama send, so they work unchanged
when pointed at this server instead of Ollama's 127.0.0.1:11434 (`OLLAMA_HOST=127.0.0.1:7860`, or the app's
"Ollama URL" setting).

    GET  /                  "Ollama is running" (to a client that does not ask for HTML; a browser gets the page)
    GET  /api/version       GET /api/tags (the model served), POST /api/show, GET /api/ps
    POST /api/chat          messages -> the reply, streamed as NDJSON lines unless "stream": false
    POST /api/generate      a prompt (through the model's chat template unless "raw") -> the reply, the same way
    POST /api/embed         texts -> vectors (an embedding model); POST /api/embeddings, the older one-text form

Options honoured: temperature, top_p, top_k, num_predict, seed, stop, repeat_penalty; runtime options (num_ctx,
num_thread, num_gpu, ...) are accepted and left to the server's config; a sampling option this server cannot apply
at a value that changes anything (min_p, typical_p, mirostat, presence/frequency penalties) is a 400, never
silently ignored. `keep_alive` is checked as Ollama reads it; a server of one model keeps it loaded while it runs,
which /api/ps says. Errors are Ollama's shape: {"error": "..."} with the HTTP status.
Not here: OpenAI's API (lib.serving.api, lib.serving.task_api), which these routes share the engine and models with.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lib.chat import ChatTemplateError, encode_chat
from lib.serving.constrain import ollama_grammar
from lib.serving.engine import EngineBusy
from lib.serving.text import ContextTooLong, sampling_params
from lib.serving.tools import ToolError, ToolPlan, as_text_messages

VERSION = "0.12.6"  # the Ollama API release whose answers these follow (clients compare it for features)
RUNNING = "Ollama is running"
HONOURED = ("temperature", "top_p", "top_k", "num_predict", "seed", "stop", "repeat_penalty")
RUNTIME = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa", "num_keep",
           "repeat_last_n", "low_vram", "vocab_only", "f16_kv", "logits_all")
NEUTRAL = {"min_p": 0.0, "typical_p": 1.0, "mirostat": 0, "mirostat_tau": None, "mirostat_eta": None,
           "presence_penalty": 0.0, "frequency_penalty": 0.0, "penalize_newline": None, "tfs_z": 1.0}
FOREVER = "2318-01-01T00:00:00Z"  # what Ollama's /api/ps shows for a model kept loaded without end


class OllamaError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def keep_alive_seconds(value) -> float | None:
    """Ollama's keep_alive: a number of seconds or a Go duration ("5m", "1h30m", "300ms"), absent = 5 minutes;
    negative = forever (None). A 400 for anything else."""
    if value is None:
        return 300.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value < 0 else float(value)
    if isinstance(value, str):
        text = value.strip()
        units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
        parts = re.findall(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
        if parts and "".join(n + u for n, u in parts) == text:
            total = sum(float(n) * units[u] for n, u in parts)
            return None if total < 0 else total
        try:
            number = float(text)
        except ValueError:
            pass
        else:
            return None if number < 0 else number
    raise OllamaError(400, f"keep_alive {value!r}: expected seconds or a duration like \"5m\" (negative: forever)")


def _base_name(name: str) -> str:
    return name[:-len(":latest")] if name.endswith(":latest") else name


def wants_html(scope) -> bool:
    accept = dict(scope.get("headers") or []).get(b"accept", b"").decode("latin-1").lower()
    return "text/html" in accept


class OllamaRoot:
    """Pure ASGI middleware: GET / answers "Ollama is running" to clients that do not ask for HTML (how tools check
    for a server); browsers go on to the page mounted at /."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "HEAD") \
                and not wants_html(scope):
            return await PlainTextResponse(RUNNING)(scope, receive, send)
        await self.app(scope, receive, send)


class OllamaFace:
    """The /api routes over one served model: `chat` an OpenAIServer (its engine may come later), or `task` a
    lib.serving.task_models.TaskModel (embedding models answer /api/embed)."""

    def __init__(self, serve, chat=None, task=None):
        self.serve, self.chat, self.task = serve, chat, task
        self.max_body = int(serve.max_body_mb * 2**20)

    # -- the model -------------------------------------------------------------------------------------------

    def _name(self) -> str | None:
        if self.task is not None:
            return self.task.id
        return self.chat.engine.loaded.name if self.chat.engine is not None else None

    def _ids(self) -> tuple[str, ...]:
        if self.task is not None:
            return (self.task.id,)
        loaded = self.chat.engine.loaded
        return loaded.name, loaded.id

    def _check(self, body: dict, capability: str):
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise OllamaError(400, "model is required")
        if self._name() is None:
            raise OllamaError(404, f"model '{name}' not found: this server has no model loaded yet")
        if _base_name(name) not in self._ids() and name not in self._ids():
            raise OllamaError(404, f"model '{name}' not found (this server serves '{self._name()}')")
        kind = self.task.kind if self.task is not None else "chat"
        if capability == "completion" and kind != "chat":
            raise OllamaError(400, f"\"{name}\" does not support generate (it is a {kind} model)")
        if capability == "embedding" and kind != "embedding":
            raise OllamaError(400, f"\"{name}\" does not support embeddings (it is a {kind} model)")
        keep_alive_seconds(body.get("keep_alive"))
        return self.task if self.task is not None else self.chat.engine.loaded

    def _files(self) -> list[Path]:
        ref = self.task.ref if self.task is not None else self.chat.engine.loaded.ref
        if self.task is None and self.chat.engine.loaded.engine == "llama.cpp" and ref.gguf is not None:
            return [ref.gguf]
        folder = ref.path or (ref.gguf.parent if ref.gguf else None)
        weights = ("*.safetensors", "*.bin", "*.gguf")
        return sorted(p for pat in weights for p in folder.glob(pat)) if folder is not None else []

    def _details(self) -> dict:
        m = self.task if self.task is not None else self.chat.engine.loaded
        family = m.config.get("model_type") or "unknown"
        files = self._files()
        fmt = "gguf" if files and files[0].suffix == ".gguf" else "safetensors"
        quant = "unknown"
        if fmt == "gguf":
            found = re.search(r"(q\d_[a-z0-9_]+|q\d_\d|f16|bf16|f32)", files[0].stem.lower())
            quant = found.group(1).upper() if found else "unknown"
        elif getattr(m, "dtype", None):
            quant = str(m.dtype).replace("torch.", "").upper().replace("FLOAT", "F").replace("BFLOAT", "BF")
        n = m.parameters
        size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
        return {"parent_model": "", "format": fmt, "family": family, "families": [family], "parameter_size": size,
                "quantization_level": quant}

    def _card(self) -> dict:
        files = self._files()
        ref = self.task.ref if self.task is not None else self.chat.engine.loaded.ref
        sums = ref.install_dir / "SHA256SUMS" if ref.install_dir is not None else None
        stamp = hashlib.sha256()  # an install's: of its checksums (its content); else of the weights' names and sizes
        if sums is not None and sums.is_file():
            stamp.update(sums.read_bytes())
        for f in files if sums is None or not sums.is_file() else []:
            stamp.update(f"{f.name}:{f.stat().st_size}".encode())
        name = f"{self._name()}:latest"
        modified = max((f.stat().st_mtime for f in files), default=time.time())
        return {"name": name, "model": name,
                "modified_at": datetime.fromtimestamp(modified, UTC).isoformat().replace("+00:00", "Z"),
                "size": sum(f.stat().st_size for f in files), "digest": stamp.hexdigest(),
                "details": self._details()}

    # -- routes ----------------------------------------------------------------------------------------------

    def add_routes(self, app: FastAPI, auth: list) -> None:
        deps = [Depends(a) for a in auth]

        @app.exception_handler(OllamaError)
        async def ollama_error(request: Request, e: OllamaError):
            return JSONResponse({"error": e.message}, status_code=e.status)

        @app.get("/api/version")
        async def version():
            return {"version": VERSION}

        @app.get("/api/tags", dependencies=deps)
        async def tags():
            return {"models": [self._card()] if self._name() is not None else []}

        @app.get("/api/ps", dependencies=deps)
        async def ps():
            if self._name() is None:
                return {"models": []}
            card = self._card()
            m = self.task if self.task is not None else self.chat.engine.loaded
            return {"models": [{k: card[k] for k in ("name", "model", "size", "digest", "details")}
                               | {"expires_at": FOREVER, "size_vram": 0,
                                  "context_length": getattr(m, "context_length", None) or m.max_tokens}]}

        @app.post("/api/show", dependencies=deps)
        async def show(request: Request):
            body = await _json(request, self.max_body)
            body.setdefault("model", body.get("name"))
            m = self._check(body, "any")
            card = self._card()
            info = {"general.architecture": card["details"]["family"], "general.parameter_count": m.parameters}
            ctx = getattr(m, "context_length", None) or getattr(m, "max_tokens", None)
            if ctx:
                info[f"{card['details']['family']}.context_length"] = ctx
            capabilities = ["completion"] if self.task is None else (
                ["embedding"] if self.task.kind == "embedding" else [])
            params = ""
            if self.task is None:
                params = "\n".join([f"temperature {self.serve.temperature}", f"top_p {self.serve.top_p}",
                                    f"num_predict {self.serve.max_new_tokens}"])
            files = self._files()
            return {"modelfile": f"# served by Models at Home\nFROM {files[0] if files else self._name()}\n",
                    "parameters": params, "template": getattr(getattr(m, "tokenizer", None), "chat_template", "") or "",
                    "details": card["details"], "model_info": info, "capabilities": capabilities,
                    "modified_at": card["modified_at"]}

        @app.post("/api/chat", dependencies=deps)
        async def chat(request: Request):
            body = await _json(request, self.max_body)
            loaded = self._check(body, "completion")
            messages = body.get("messages") or []
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise OllamaError(400, "messages: expected a list of {\"role\", \"content\"} objects")
            for m in messages:
                if m.get("images"):
                    raise OllamaError(400, "images: this model reads text only")
                if m.get("role") not in ("system", "user", "assistant", "tool"):
                    raise OllamaError(400, f"messages: unknown role {m.get('role')!r}")
            if not messages:  # Ollama: an empty conversation loads the model
                return {"model": body["model"], "created_at": _now(), "message": {"role": "assistant", "content": ""},
                        "done_reason": "load", "done": True}
            try:
                plan = ToolPlan.make(body.get("tools") or None, "auto", loaded.tokenizer)
            except ToolError as e:
                raise OllamaError(400, str(e)) from None
            turns = [_turn(m, i) for i, m in enumerate(messages)]
            turns, tools = plan.conversation(turns) if plan else (as_text_messages(turns), None)
            return await self._reply(request, body, loaded, await _encode(loaded, turns, tools), chat=True, plan=plan)

        @app.post("/api/generate", dependencies=deps)
        async def generate(request: Request):
            body = await _json(request, self.max_body)
            loaded = self._check(body, "completion")
            prompt = body.get("prompt") or ""
            if not isinstance(prompt, str):
                raise OllamaError(400, "prompt: expected a string")
            if body.get("images"):
                raise OllamaError(400, "images: this model reads text only")
            if body.get("suffix"):
                raise OllamaError(400, "suffix: fill-in-the-middle is not supported by this model")
            if not prompt:  # Ollama: an empty prompt loads the model
                return {"model": body["model"], "created_at": _now(), "response": "", "done": True,
                        "done_reason": "load"}
            if body.get("raw"):
                ids = loaded.tokenizer.encode(prompt, add_special_tokens=True)
            else:
                turns = ([{"role": "system", "content": str(body["system"])}] if body.get("system") else []) \
                    + [{"role": "user", "content": prompt}]
                ids = await _encode(loaded, turns)
            return await self._reply(request, body, loaded, ids, chat=False)

        @app.post("/api/embed", dependencies=deps)
        async def embed(request: Request):
            body = await _json(request, self.max_body)
            model = self._check(body, "embedding")
            texts = body.get("input")
            texts = [texts] if isinstance(texts, str) else texts
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
                raise OllamaError(400, "input: expected a non-empty string or list of non-empty strings")
            t0 = time.perf_counter()
            vectors, n_tokens = await self._embed(model, texts, body.get("truncate", True))
            dims = body.get("dimensions")
            if dims is not None:
                if not isinstance(dims, int) or not 0 < dims <= vectors.shape[1]:
                    raise OllamaError(400, f"dimensions: expected 1..{vectors.shape[1]}")
                import numpy as np

                vectors = vectors[:, :dims]
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            return {"model": body["model"], "embeddings": vectors.tolist(),
                    "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": 0,
                    "prompt_eval_count": n_tokens}

        @app.post("/api/embeddings", dependencies=deps)
        async def embeddings(request: Request):
            body = await _json(request, self.max_body)
            model = self._check(body, "embedding")
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise OllamaError(400, "prompt: expected a non-empty string")
            vectors, _ = await self._embed(model, [prompt], True)
            return {"embedding": vectors[0].tolist()}

    async def _embed(self, model, texts: list[str], truncate):
        try:
            return await asyncio.to_thread(model.embed, texts, bool(truncate))
        except ValueError as e:  # lib.serving.task_models.InputTooLong: a text longer than the model reads
            raise OllamaError(400, str(e)) from None

    # -- generating ------------------------------------------------------------------------------------------

    async def _reply(self, request: Request, body: dict, loaded, ids: list[int], chat: bool, plan=None):
        options = body.get("options") or {}
        params, stop = self._params(options, loaded, len(ids))
        if plan is not None and plan.grammar and body.get("format"):
            raise OllamaError(400, "format: with tools, the reply's form is the tool call's; send one of them")
        grammar = plan.grammar if plan is not None and plan.grammar else _grammar(body)
        if grammar is not None:
            params = replace(params, grammar=grammar)
        engine = self.chat.engine
        t0 = time.perf_counter()
        try:
            handle = engine.submit(ids, params, stop, loaded=loaded, loop=asyncio.get_running_loop())
        except EngineBusy as e:
            raise OllamaError(503, f"server busy: {e}") from None
        except ContextTooLong as e:
            raise OllamaError(400, str(e)) from None
        name = body["model"]

        def line(piece: str, done_reason: str | None = None, first_at: float | None = None, whole: bool = False) -> dict:
            """One NDJSON line; whole: `piece` is the finished reply, read for tool calls when tools were given."""
            out = {"model": name, "created_at": _now()}
            message = {"role": "assistant", "content": piece}
            if whole and plan is not None:
                content, calls = plan.parse(piece)
                message["content"] = content or ""
                if calls:  # Ollama's shape: arguments as an object, no ids
                    message["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                                           "arguments": json.loads(c["function"]["arguments"])}}
                                             for c in calls]
            out |= {"message": message} if chat else {"response": piece}
            out["done"] = done_reason is not None
            if done_reason is not None:
                end = time.perf_counter()
                first = first_at or end
                out |= {"done_reason": "length" if done_reason == "length" else "stop",
                        "total_duration": int((end - t0) * 1e9), "load_duration": 0,
                        "prompt_eval_count": handle.prompt_tokens, "prompt_eval_duration": int((first - t0) * 1e9),
                        "eval_count": handle.completion_tokens, "eval_duration": int((end - first) * 1e9)}
            return out

        if body.get("stream", True):
            async def lines():
                first_at = None
                try:
                    async for kind, value in handle.aiter():
                        if kind == "text":
                            first_at = first_at or time.perf_counter()
                            if plan is None:  # with tools, the reply goes out once whole (it may be a call)
                                yield json.dumps(line(value)) + "\n"
                        elif kind == "done":
                            if plan is not None:
                                yield json.dumps(line(handle.text, whole=True)) + "\n"
                            yield json.dumps(line("", value, first_at)) + "\n"
                        elif kind == "error":
                            yield json.dumps({"error": value}) + "\n"
                finally:
                    if handle.finish_reason is None:
                        handle.cancel()

            return StreamingResponse(lines(), media_type="application/x-ndjson")
        first_at = None
        try:
            async for kind, value in handle.aiter(poll_s=0.5):
                if kind == "text":
                    first_at = first_at or time.perf_counter()
                elif kind == "idle" and await request.is_disconnected():
                    handle.cancel()
                elif kind == "error":
                    raise OllamaError(500, value)
        finally:
            if handle.finish_reason is None:
                handle.cancel()
        return line(handle.text, handle.finish_reason, first_at, whole=True)

    def _params(self, options: dict, loaded, prompt_len: int):
        if not isinstance(options, dict):
            raise OllamaError(400, "options: expected an object")
        for key, value in options.items():
            if key in HONOURED or key in RUNTIME:
                continue
            if key in NEUTRAL:
                if NEUTRAL[key] is not None and value != NEUTRAL[key] or NEUTRAL[key] is None and value:
                    raise OllamaError(400, f"options.{key}={value!r}: not supported by this server (leave it at its "
                                           f"default)")
                continue
            raise OllamaError(400, f"options.{key}: unknown option")
        room = loaded.context_length - prompt_len
        if room < 1:
            raise OllamaError(400, f"the prompt is {prompt_len} tokens; this model's context is "
                                   f"{loaded.context_length}")
        num_predict = options.get("num_predict")
        if num_predict is None:
            max_new = self.serve.max_new_tokens
        elif isinstance(num_predict, int) and not isinstance(num_predict, bool):
            max_new = room if num_predict < 0 else num_predict  # -1: until the end of the turn or the context
        else:
            raise OllamaError(400, "options.num_predict: expected an integer")
        stop = options.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise OllamaError(400, "options.stop: expected a list of strings")
        seed = options.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise OllamaError(400, "options.seed: expected an integer")
        extra = {}
        if options.get("top_k") is not None:
            extra["top_k"] = int(options["top_k"])
        if options.get("repeat_penalty") not in (None, 1, 1.0):
            extra["repetition_penalty"] = float(options["repeat_penalty"])
        try:
            params = sampling_params(float(options.get("temperature", self.serve.temperature)),
                                     float(options.get("top_p", self.serve.top_p)), max(1, min(max_new, room)),
                                     seed=seed, **extra)
        except (TypeError, ValueError) as e:
            raise OllamaError(400, f"options: {e}") from None
        return params, stop


def _turn(m: dict, i: int) -> dict:
    """An Ollama message in OpenAI's terms (lib.serving.tools reads those): calls get ids, a tool's result names the
    call by its tool's name (Ollama's `tool_name`), as the calls' ids are made up here."""
    turn = {"role": m["role"], "content": str(m.get("content") or "")}
    calls = m.get("tool_calls")
    if m["role"] == "assistant" and calls:
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                  and isinstance(c["function"].get("name"), str) for c in calls):
            raise OllamaError(400, f"messages[{i}].tool_calls: expected [{{\"function\": {{\"name\", \"arguments\"}}}}]")
        turn["tool_calls"] = [{"id": c["function"]["name"], "type": "function",
                               "function": {"name": c["function"]["name"],
                                            "arguments": c["function"].get("arguments") or {}}} for c in calls]
    if m["role"] == "tool":
        turn["tool_call_id"] = str(m.get("tool_name") or m.get("name") or "tool")
    return turn


async def _encode(loaded, turns: list[dict], tools: list | None = None) -> list[int]:
    """The conversation through the model's chat template (off the event loop); a 400 when the template refuses it."""
    try:
        return await asyncio.to_thread(encode_chat, loaded.tokenizer, turns, True, tools)
    except ChatTemplateError as e:
        raise OllamaError(400, str(e)) from None


def _grammar(body: dict) -> str | None:
    """The grammar Ollama's `format` asks for ("json" or a JSON schema; lib.serving.constrain)."""
    if body.get("format") in (None, ""):
        return None
    try:
        return ollama_grammar(body["format"])
    except ValueError as e:
        raise OllamaError(400, f"format: {e}") from None


async def _json(request: Request, limit: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise OllamaError(413, f"the request is {declared} bytes; this server takes at most {limit} (serve.max_body_mb)")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise OllamaError(413, f"the request is over {limit} bytes (serve.max_body_mb)")
    try:
        body = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OllamaError(400, f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise OllamaError(400, "expected a JSON object")
    return body
