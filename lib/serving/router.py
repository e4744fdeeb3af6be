"""One server for every install of a models dir (`07_serve.py --all`), as Ollama and llama-server's router mode do:
a request goes by its "model" to that install's own server, which the router starts on its first request — the
install's start.sh on a free loopback port, in the install's own environment, as the user would start it alone
(its page off) — and stops after `serve.keep_alive` without a request (a request's Ollama `keep_alive` sets its
own). Like Ollama's runners, each model is a process of its own: models never slow each other down (one process
holding llama.cpp and torch beside each other decoded 2.2x slower), an embedding install needs no training stack,
and stopping a model gives its memory back.

    router = Router(models_dir, cfg.serve)
    run_server(router.app(), bind_socket("127.0.0.1", 7860))     # GET /v1/models: every install and its kind

Memory: before starting a model, 05_check's estimate of serving it (its report, kept in model_info.json) is held
against the RAM available less `serve.reserve_gb`; the least recently used idle models are stopped to make room,
and when even that is not enough the request gets a 503 naming what it needs and what there is. Requests to
different models run at the same time; a model with requests in flight is never stopped under them.
Not here: the APIs themselves (lib.serving.api, lib.serving.task_api, lib.serving.ollama), binding (server).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import psutil
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request as StarletteRequest

from lib.config import ServeConfig
from lib.errors import UserError
from lib.models_dir import START
from lib.serving.api import API_ROUTES, APIError, StatusCounter, check_bearer, error_body, install_error_handlers
from lib.serving.engine import Metrics
from lib.serving.ollama import VERSION, OllamaError, OllamaRoot, keep_alive_seconds
from lib.serving.process import MeasuredProcess, NotServing, free_port, wait_ready
from lib.serving.resolve import ModelRef, installed_models
from lib.serving.router_page import router_page
from lib.serving.server import API_KEY_ENV, LOOPBACK_HOSTS

# The requests that name a model: the router reads "model" from them and hands them to that model's API.
MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/classify", "/v1/rerank",
                "/v1/audio/transcriptions", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings",
                "/api/show")
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class RouterError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def need_bytes(info: dict) -> int:
    """What serving an install takes: 05_check's CPU estimate for the dtype (or GGUF quantization) it is served in,
    from the report in its model_info.json (a whole process: Python and its libraries included); without an
    estimate (speech models), the install's post-test peak, else 1.5 x its size."""
    check = info.get("check") or {}
    rows = [r for r in (check.get("compatibility") or {}).get("inference") or [] if r.get("device") == "cpu"]
    want = DTYPES.get((check.get("verdict") or {}).get("cpu_torch_dtype"), "fp32")
    if info.get("engine") == "llama.cpp":
        quant = " ".join(str(g) for g in info.get("gguf_files") or []).lower() + str(info.get("quantization") or "")
        want = "int4" if "q4" in quant or "q5" in quant else "int8" if "q8" in quant else "fp16"
    row = next((r for r in rows if r["dtype"] == want), None)
    if row is not None:
        return int(row["need_bytes"])
    return int((info.get("post_test") or {}).get("peak_rss_bytes") or (info.get("size_bytes") or 0) * 1.5)


@dataclass
class Slot:
    """A running model: its install's server (a process of its own) and the name it answers to."""
    ref: ModelRef
    proc: MeasuredProcess
    url: str
    name: str  # what the model's own server calls it ("model" in the requests it is handed)
    need: int
    keep_alive: float | None  # seconds after the last request; None: until the server stops
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0


class Router:
    def __init__(self, models_dir, serve: ServeConfig, device: str = "auto", api_key: str | None = None,
                 available: Callable[[], int] = lambda: psutil.virtual_memory().available,
                 clock: Callable[[], float] = time.monotonic, reap_every: float | None = 1.0):
        try:
            self.keep_alive = keep_alive_seconds(serve.keep_alive)
        except Exception:
            raise UserError(f"serve.keep_alive {serve.keep_alive!r}: expected seconds or a duration like \"5m\" "
                            f"(negative: keep models loaded)") from None
        self.models_dir, self.serve, self.api_key = models_dir, serve, api_key
        self.device = device  # "auto": each model's server picks (a GPU where there is one)
        self.available, self.clock = available, clock
        self.metrics = Metrics()
        self.slots: dict[str, Slot] = {}
        # each install's start.sh picks its own environment; its server takes requests only with this process's own
        # key (through the environment, which `ps` does not show), so that nothing else on the machine reaches it
        # around this server's key and limits
        self._runner_key = secrets.token_urlsafe(24)
        self.env = {**{k: v for k, v in os.environ.items() if k != "PYTHON"}, API_KEY_ENV: self._runner_key}
        self._runner_auth = {"Authorization": f"Bearer {self._runner_key}"}
        self.start_timeout = 600.0
        self._client: httpx.AsyncClient | None = None
        self._lock = threading.Lock()  # slots and memory decisions
        self._loading: dict[str, threading.Lock] = {}  # one load per model at a time
        self._stop = threading.Event()
        self.reap_every = reap_every  # seconds between looks for idle models (None: only when unload_idle() is called)
        if reap_every is not None:
            threading.Thread(target=self._reap, name="router-unload", daemon=True).start()

    # -- the catalog ---------------------------------------------------------------------------------------

    def catalog(self) -> dict[str, ModelRef]:
        """Every intact install of the models dir (adapters as NAME+ADAPTER), by the name clients send."""
        return {ref.served_name: ref for ref in installed_models(self.models_dir)}

    def find(self, name: str) -> ModelRef:
        catalog = self.catalog()
        ref = catalog.get(name) or catalog.get(name.removesuffix(":latest"))
        if ref is None:
            raise RouterError(404, f"The model '{name}' is not installed in {self.models_dir} (installed: "
                                   f"{', '.join(catalog) or 'none'}; see GET /v1/models)", "model_not_found")
        return ref

    # -- loading and unloading -----------------------------------------------------------------------------

    def get(self, name: str, keep_alive=None) -> Slot:
        """The loaded model `name`, loading it first (in the caller's thread) when it is not, with the caller's
        request counted in `active` (the caller takes it out when answered): it is not unloaded meanwhile."""
        ref = self.find(name)
        key = ref.served_name
        with self._lock:
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:
            slot = self.slots.get(key)
            if slot is not None and slot.proc.proc.poll() is not None:  # its server died: start it again
                with self._lock:
                    self._unload(slot, "its server had exited")
                slot = None
            if slot is None:
                slot = self._load(ref)
            with self._lock:
                slot.active += 1  # the caller's request, until _dispatch has answered it
                slot.last_used = self.clock()
                if keep_alive is not None:
                    slot.keep_alive = keep_alive_seconds(keep_alive)
            return slot

    def _load(self, ref: ModelRef) -> Slot:
        kind = ref.info.get("kind") or "chat"
        need = need_bytes(ref.info)
        self._make_room(ref.served_name, need)
        t0 = time.perf_counter()
        port = free_port()
        args = ["--port", str(port), "--no-ui", *(["--adapter", ref.adapter] if ref.adapter else [])]
        if self.device != "auto":
            args += ["--device", self.device]
        proc = MeasuredProcess(["sh", str(ref.install_dir / START), *args], self.env, ref.install_dir)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(proc, url, self.start_timeout)
            name = httpx.get(url + "/v1/models", headers=self._runner_auth, timeout=30).json()["data"][0]["id"]
        except (NotServing, httpx.HTTPError, KeyError, IndexError) as e:
            res = proc.stop()
            tail = " | ".join([line for line in res["stderr"].splitlines() if line.strip()][-3:])
            raise RouterError(500, f"'{ref.served_name}' did not start: {e}" + (f" ({tail})" if tail else ""),
                              "model_failed_to_start") from None
        slot = Slot(ref, proc, url, name, need, self.keep_alive)
        with self._lock:
            self.slots[ref.served_name] = slot
        self.metrics.inc("models_loaded")
        self.metrics.observe(time.perf_counter() - t0, None, 0)
        print(f"started {ref.served_name} ({kind}) in {time.perf_counter() - t0:.1f} s", flush=True)
        return slot

    def _make_room(self, name: str, need: int) -> None:
        """Unload idle models, least recently used first, until `need` bytes fit; a 503 (and nothing unloaded)
        when even all of them would not make room."""
        reserve = int(self.serve.reserve_gb * 1e9)
        with self._lock:
            idle = sorted((s for s in self.slots.values() if s.active == 0), key=lambda s: s.last_used)
            room = self.available() - reserve
            if room + sum(s.need for s in idle) < need:
                busy = [s.ref.served_name for s in self.slots.values() if s.active]
                raise RouterError(503, f"not enough memory to load '{name}': 05_check estimates {need / 1e9:.2f} GB, "
                                       f"and {max(room, 0) / 1e9:.2f} GB are available (serve.reserve_gb = "
                                       f"{self.serve.reserve_gb} kept back)"
                                       + (f"; answering requests: {', '.join(busy)}" if busy else ""),
                                  "insufficient_memory")
            while room < need:
                victim = idle.pop(0)
                room += victim.need
                self._unload(victim, "to make room for " + name)

    def _unload(self, slot: Slot, why: str) -> None:  # holding self._lock
        self.slots.pop(slot.ref.served_name, None)
        slot.proc.stop()
        self.metrics.inc("models_unloaded")
        print(f"stopped {slot.ref.served_name} ({why})", flush=True)

    def unload_idle(self) -> list[str]:
        """Unload the models whose keep_alive has run out since their last request; their names."""
        now = self.clock()
        with self._lock:
            done = [s for s in list(self.slots.values()) if s.active == 0 and s.keep_alive is not None
                    and now - s.last_used >= s.keep_alive]
            for s in done:
                self._unload(s, f"idle for {s.keep_alive:g} s")
        return [s.ref.served_name for s in done]

    def _reap(self) -> None:
        while not self._stop.wait(self.reap_every):
            self.unload_idle()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for s in list(self.slots.values()):
                self._unload(s, "server stopping")

    # -- the app -------------------------------------------------------------------------------------------

    def app(self, loopback: bool = True):
        """The ASGI app: model requests dispatched to their model's API, the listings answered here."""
        listing = self._listing_app()
        listing.add_middleware(OllamaRoot)
        router = self

        async def dispatch(scope, receive, send):
            if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in MODEL_ROUTES:
                return await router._dispatch(scope, receive, send)
            await listing(scope, receive, send)

        app = dispatch
        if loopback:
            app = TrustedHostMiddleware(app, allowed_hosts=LOOPBACK_HOSTS)
        outer = StatusCounter(app, self.metrics)
        outer.router = self
        return outer

    async def _dispatch(self, scope, receive, send):
        path = scope["path"]
        ollama = path.startswith("/api/")
        try:
            body = await self._read_body(scope, receive)
            request = StarletteRequest(scope, _replay(body, receive))
            check_bearer(request, self.api_key)
            name, keep_alive = await _model_of(request, body)
            if not name:
                raise RouterError(400, "name the model: \"model\" (GET /v1/models lists them)",
                                  "missing_required_parameter")
            keep_alive_seconds(keep_alive) if keep_alive is not None else None  # a bad one: 400 before loading
            slot = await asyncio.to_thread(self.get, name, keep_alive)
        except OllamaError as e:
            return await JSONResponse({"error": e.message} if ollama else error_body(e.message, param="keep_alive"),
                                      status_code=e.status)(scope, receive, send)
        except RouterError as e:
            body = {"error": e.message} if ollama else error_body(e.message, "invalid_request_error" if e.status < 500
                                                                   else "server_error", "model", e.code)
            return await JSONResponse(body, status_code=e.status)(scope, receive, send)
        except APIError as e:  # the API key
            return await JSONResponse({"error": e.message} if ollama else error_body(
                e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)(scope, receive, send)
        try:  # get() counted this request in: the model stays loaded until it is answered
            await self._proxy(slot, scope, receive, send, _renamed(body, slot.name))
        finally:
            with self._lock:
                slot.active -= 1
                slot.last_used = self.clock()

    async def _proxy(self, slot: Slot, scope, receive, send, body: bytes) -> None:
        """Hand the request to the model's server and stream its answer back as it comes; a client that goes away
        closes the connection to it, which stops the generation there."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30))
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.lower() not in (b"host", b"content-length", b"authorization", b"connection")]
        headers += list(self._runner_auth.items())
        query = scope.get("query_string", b"").decode("latin-1")
        request = self._client.build_request(scope["method"], slot.url + scope["path"] + (f"?{query}" if query else ""),
                                             headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as e:
            return await JSONResponse(error_body(f"'{slot.ref.served_name}' did not answer: {e}", "server_error",
                                                 "model", "model_unavailable"), 502)(scope, receive, send)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()
                                    if k.lower() not in ("content-length", "transfer-encoding", "connection")]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _read_body(self, scope, receive) -> bytes:
        limit = int(self.serve.max_body_mb * 2**20)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RouterError(400, "the client went away", "client_disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RouterError(413, f"the request is over {limit} bytes (serve.max_body_mb)", "request_too_large")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _listing_app(self) -> FastAPI:
        app = FastAPI(title="Models at Home", docs_url=None, redoc_url=None, openapi_url=None)
        install_error_handlers(app)

        def key(request: Request) -> None:
            check_bearer(request, self.api_key)

        auth = [Depends(key)]

        @app.get("/", response_class=HTMLResponse)
        async def page():  # a browser's look at what this server has (clients get Ollama's line: OllamaRoot)
            return router_page([self._card(ref) for ref in self.catalog().values()], str(self.models_dir),
                               needs_key=bool(self.api_key))

        @app.get("/health")
        async def health():
            return {"status": "ok", "models": len(self.catalog()), "loaded": sorted(self.slots)}

        @app.get("/metrics", dependencies=auth)
        async def metrics():
            return {**self.metrics.snapshot(), "loaded": sorted(self.slots)}

        @app.get("/v1/models", dependencies=auth)
        async def list_models():
            return {"object": "list", "data": [self._card(ref) for ref in self.catalog().values()]}

        @app.get("/v1/models/{model_id:path}", dependencies=auth)
        async def get_model(model_id: str):
            try:
                return self._card(self.find(model_id))
            except RouterError as e:
                return JSONResponse(error_body(e.message, "invalid_request_error", "model", e.code), e.status)

        @app.get("/api/version")
        async def version():
            return {"version": VERSION}

        @app.get("/api/tags", dependencies=auth)
        async def tags():
            return {"models": [self._tag(ref) for ref in self.catalog().values()]}

        @app.get("/api/ps", dependencies=auth)
        async def ps():
            now = self.clock()
            out = []
            for slot in list(self.slots.values()):
                left = None if slot.keep_alive is None else max(slot.keep_alive - (now - slot.last_used), 0)
                expires = "2318-01-01T00:00:00Z" if left is None else time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + left))
                out.append({**self._tag(slot.ref), "expires_at": expires, "size_vram": 0})
            return {"models": out}

        add_listing_fallbacks(app, auth)
        return app

    def _card(self, ref: ModelRef) -> dict:
        info = ref.info
        return {"id": ref.served_name, "object": "model", "created": int(_installed_at(info)),
                "owned_by": "models-at-home", "kind": info.get("kind") or "chat", "engine": info.get("engine"),
                "loaded": ref.served_name in self.slots}

    def _tag(self, ref: ModelRef) -> dict:
        info = ref.info
        name = f"{ref.served_name}:latest"
        n = info.get("params") or 0
        size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
        sums = ref.install_dir / "SHA256SUMS" if ref.install_dir is not None else None
        digest = hashlib.sha256(sums.read_bytes() if sums is not None and sums.is_file() else name.encode())
        return {"name": name, "model": name,
                "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_installed_at(info))),
                "size": info.get("size_bytes") or 0, "digest": digest.hexdigest(),
                "details": {"parent_model": "", "format": "gguf" if info.get("engine") == "llama.cpp"
                            else "safetensors", "family": info.get("family") or "unknown",
                            "families": [info.get("family") or "unknown"], "parameter_size": size,
                            "quantization_level": str(info.get("quantization") or "unknown")}}


def add_listing_fallbacks(app: FastAPI, auth: list) -> None:
    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], dependencies=auth)
    async def unknown(request: Request, rest: str):
        path = f"/v1/{rest}"
        routes = {**API_ROUTES, "/v1/embeddings": "POST", "/v1/classify": "POST", "/v1/rerank": "POST",
                  "/v1/audio/transcriptions": "POST"}
        status = 405 if path in routes else 404
        return JSONResponse(error_body(f"no API endpoint {request.method} {path}" if status == 404 else
                                       f"{request.method} {path} is not allowed; use {routes[path]}", "invalid_request_error",
                                       None, "not_found" if status == 404 else "method_not_allowed"), status)


def _installed_at(info: dict) -> float:
    try:
        return time.mktime(time.strptime(str(info.get("installed_at"))[:19], "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0.0


def _renamed(body: bytes, name: str) -> bytes:
    """A JSON body with "model" set to the name the model's own server answers to (an adapter install is
    NAME+ADAPTER here); a multipart form (speech) as it is (an install's name is its server's)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body
    if isinstance(data, dict) and ("model" in data or "name" in data):
        data["model" if "model" in data else "name"] = name
        return json.dumps(data).encode()
    return body


def _replay(body: bytes, receive):
    """An ASGI receive() that hands over the `body` already read, then the client's own messages (its disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _model_of(request: StarletteRequest, body: bytes) -> tuple[str | None, object]:
    """The "model" a request names (and its Ollama keep_alive): from the JSON body, or a multipart form's field."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=16) as form:
            model = form.get("model")
            return (model if isinstance(model, str) else None), None
    try:
        data = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RouterError(400, "the body is not valid JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise RouterError(400, "expected a JSON object", "invalid_value")
    model = data.get("model") or data.get("name")
    return (model if isinstance(model, str) else None), data.get("keep_alive")
