"""The app `07_serve.py` runs: a model's API (lib.serving) with its page at / and, beside a chat model's page, the
training studio (lib.studio) — or the terminal chat, or one answer. It sits above serving and the studio: neither
imports it, and serving never imports the studio, so an install's environment carries only what its kind of model
needs (an embedding or speech install has no training stack).

    app = build_app(engine, cfg.serve, api_key=None, list_models=lambda: available_models(cfg))
    run_server(app, bind_socket("127.0.0.1", 7860))
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lib.config import Config, ServeConfig, to_dict
from lib.errors import UserError
from lib.handlers import HANDLERS
from lib.models_dir import models_dir_for, verify_install
from lib.serving.engine import Engine, Metrics
from lib.serving.loading import adapter_ref, load_model, pick_device
from lib.serving.resolve import ModelRef, available_models, is_chat_model, latest_pipeline_model, resolve_model
from lib.serving.server import (
    API_KEY_ENV,
    LOOPBACK_HOSTS,
    bind_socket,
    check_bind,
    is_loopback,
    run_server,
    url_of,
)
from lib.serving.task_models import kind_of, load_task_model


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="installed model name, model directory (HF dir, install folder, stage dir) or a "
                                   "pipeline id like 04_sft/<hash> (default: the latest model the pipeline produced)")
    p.add_argument("--models-dir", help="where installed models live (default: install.models_dir of the config)")
    p.add_argument("--all", action="store_true",
                   help="serve every installed model of the models dir at one port (OpenAI's and Ollama's APIs; a "
                        "request's \"model\" picks it), each loaded on its first request and unloaded after "
                        "serve.keep_alive idle")
    p.add_argument("--host", help="address to bind (default: serve.host = 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="port (default: serve.port = 7860; 0 = any free port)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on the API and KEY as the UI password "
                                     f"(safer: set the {API_KEY_ENV} environment variable, which `ps` does not show)")
    p.add_argument("--insecure", action="store_true",
                   help="allow binding a non-loopback address without an API key (anyone on the network can use it)")
    p.add_argument("--no-ui", action="store_true", help="serve only the API, not the Gradio UI")
    p.add_argument("--studio", action="store_true",
                   help="open the page on the training studio (Runs / Train / Data tabs) instead of the chat; with no "
                        "model yet, the studio opens by itself")
    p.add_argument("--cli", action="store_true", help="chat in the terminal instead of serving")
    p.add_argument("--prompt", help="answer this one prompt on stdout and exit ('-' reads it from stdin)")
    p.add_argument("--documents", nargs="+", metavar="DOC",
                   help="a reranker's documents to rank for --prompt QUERY (prints them best first as JSON)")
    p.add_argument("--audio", metavar="FILE", help="a speech-to-text model: transcribe this clip on stdout and exit")
    p.add_argument("--adapter", metavar="NAME", help="an installed chat model with its LoRA adapter NAME (trained by "
                                                     "its train.sh) merged in")
    p.add_argument("--system", help="system prompt for --cli / --prompt")
    p.add_argument("--seed", type=int, help="sampling seed for --cli / --prompt (default: random)")
    p.add_argument("--log-file", help="also append what the server prints on stderr (loading, engine, requests, "
                                      "errors) to this file; an install's start.sh passes logs/server.log")
    p.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1 …")
    p.add_argument("--engine", choices=["auto", "torch", "llama.cpp"],
                   help="what decodes (default: serve.engine = auto: llama.cpp for a model with a GGUF file on a CPU, "
                        "else torch)")



# ---------------------------------------------------------------------------------------------------------
# The app.


def build_app(engine: Engine | None, serve: ServeConfig, api_key: str | None = None,
              list_models: Callable[[], list[ModelRef]] | None = None, ui: bool = True, loopback: bool = True,
              studio=None, open_tab: str = "chat", no_model_note: str = "",
              load_engine: Callable[[ModelRef, Metrics], Engine] | None = None,
              default_model: Callable[[], ModelRef | None] | None = None):
    """The ASGI app: the OpenAI API, and (unless ui=False) the Gradio UI mounted at /: the chat tab and, given a
    lib.studio.ui.Studio, the studio's tabs. engine=None: no model yet (the API says so, the chat tab says how to
    get one); given `load_engine` and `default_model`, the chat tab watches for a model (a run finished in the
    studio), loads it and from then on the page and the API serve it. The app's `api` is the OpenAIServer,
    its `start(ref)` what loads that model."""
    # The web stack (FastAPI, and gradio below: seconds to import) loads only when serving; --cli and --prompt
    # never import it.
    from lib.serving.api import OpenAIServer

    server = OpenAIServer(engine, serve, api_key, no_model=no_model_note)
    start = None
    if engine is None and load_engine is not None:
        lock = threading.Lock()

        def start(ref: ModelRef) -> Engine:  # one engine for every page and the API, however many ask at once
            with lock:
                if server.engine is None:
                    server.attach(load_engine(ref, server.metrics))
                return server.engine

    blocks = None
    if ui:  # gradio only with the UI (--no-ui serves the API without it)
        from lib.serving.ui import build_ui

        blocks = build_ui(engine, serve, list_models or (lambda: []), studio=studio, open_tab=open_tab,
                          no_model_note=no_model_note, start=start, default_model=default_model)
    outer = _mount(server, blocks, api_key, loopback, css=studio.css if studio is not None else None)
    outer.start = start
    return outer


def build_task_app(model, serve: ServeConfig, api_key: str | None = None, ui: bool = True, loopback: bool = True):
    """The ASGI app of a model that is not a chat model (lib.handlers): its API and its page."""
    from lib.serving.task_api import TaskServer

    blocks = None
    if ui:
        from lib.serving.task_ui import build_task_ui

        blocks = build_task_ui(model)
    return _mount(TaskServer(model, serve, api_key), blocks, api_key, loopback)


def _mount(server, blocks, api_key: str | None, loopback: bool, css: str | None = None):
    """The API server's app with the Gradio page `blocks` (if any, styled by `css`) at /, the Host check on loopback
    and the status counter outermost (so that it also counts the 500s Starlette's error middleware answers)."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from lib.serving.api import StatusCounter
    from lib.serving.ollama import OllamaRoot

    app = server.app
    if blocks is not None:
        import gradio as gr

        auth = None
        if api_key:
            # Any user name; the API key is the password.
            auth = lambda _user, password: secrets.compare_digest(password.encode(), api_key.encode())  # noqa: E731
        app = gr.mount_gradio_app(app, blocks, path="/", auth=auth,
                                  auth_message="Log in with any user name and the server's API key as password.",
                                  ssr_mode=False, mcp_server=False, footer_links=["settings"], css=css,
                                  max_file_size="1gb")  # conversation imports, corpus uploads, audio clips
    app.add_middleware(OllamaRoot)  # GET / for Ollama's clients; inside the Host check
    if loopback:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS)
    outer = StatusCounter(app, server.metrics)
    outer.api = server
    return outer



class _TeeStderr:
    """sys.stderr that also appends everything written to it to a log file (line-buffered)."""

    def __init__(self, stream, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.stream, self.file = stream, open(path, "a", encoding="utf-8", buffering=1)

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def serve_command(cfg: Config, args: argparse.Namespace) -> int:
    """What `python 07_serve.py` does with its config and parsed arguments."""
    if args.log_file:
        sys.stderr = _TeeStderr(sys.stderr, Path(args.log_file))
        print(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} 07_serve {' '.join(sys.argv[1:])}", file=sys.stderr,
              flush=True)
    serve = cfg.serve
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    host = args.host or serve.host
    port = serve.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: expected 0..65535 (0 = any free port)")
    warning = None
    if args.prompt is None and not args.cli:  # refuse a bad bind before spending time on loading the model
        warning = check_bind(host, api_key, args.insecure)
    log = sys.stderr
    if args.all:
        if args.model or args.prompt is not None or args.cli or args.audio or args.adapter:
            raise UserError("--all serves every installed model and takes none of --model, --prompt, --cli, --audio, "
                            "--adapter: name the model in each request instead")
        return _serve_all(args, cfg, host, port, api_key, warning)
    if args.model is None and latest_pipeline_model(cfg) is None and args.prompt is None and not args.cli:
        if args.no_ui:
            resolve_model(None, cfg, args.models_dir)  # raises: what to serve, and how to get it
        print("no model yet: opening the training studio (train one there: the Chat tab loads it when the run is done)",
              file=log, flush=True)
        return _serve_page(args, cfg, None, host, port, api_key, warning, open_tab="train")
    ref = resolve_model(args.model, cfg, args.models_dir)
    kind = kind_of(ref)
    if kind != "chat":
        return _serve_task(ref, kind, args, serve, host, port, api_key, warning)
    if args.audio or args.documents:
        raise UserError(f"--{'audio' if args.audio else 'documents'}: {ref.id} is a chat model; ask it with --prompt")
    if args.adapter:
        if ref.install_dir is not None:
            verify_install(ref.install_dir)
        ref = adapter_ref(ref, args.adapter)
    print(f"loading {ref.id} from {ref.path or ref.gguf} …", file=log, flush=True)
    engine = _engine(ref, args, serve)
    try:
        if args.prompt is not None:
            from lib.serving.chat_cli import one_shot

            prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
            return one_shot(engine, prompt, serve, system=args.system, seed=args.seed)
        if args.cli:
            from lib.serving.chat_cli import repl

            return repl(engine, serve, system=args.system, seed=args.seed)
        return _serve_page(args, cfg, engine, host, port, api_key, warning,
                           open_tab="train" if args.studio else "chat")
    finally:
        engine.close()


def _serve_task(ref: ModelRef, kind: str | None, args, serve: ServeConfig, host: str, port: int,
                api_key: str | None, warning: str | None) -> int:
    """Answer once, or serve the API and page, for a model whose handler is not chat (lib.handlers)."""
    from lib.serving.task_ui import one_shot

    if kind is None:
        raise UserError(f"--model {ref.id}: 07_serve serves {', '.join(HANDLERS)} models, and this one is none of "
                        f"them (05_check.py {ref.path or ref.gguf} says what it is)")
    if args.cli:
        raise UserError(f"--cli chats with a chat model; {ref.id} is a {kind} model: use "
                        f"{HANDLERS[kind].cli}, or serve it")
    if ref.install_dir is not None:
        verify_install(ref.install_dir)
    print(f"loading {ref.id} ({kind}) from {ref.path or ref.gguf} …", file=sys.stderr, flush=True)
    model = load_task_model(ref, kind, pick_device(args.device))
    print(f"engine {model.engine} ({kind})", file=sys.stderr, flush=True)
    if args.prompt is not None or args.audio:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        return one_shot(model, prompt, args.documents, args.audio)
    sock = bind_socket(host, port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    app = build_task_app(model, serve, api_key, ui=not args.no_ui, loopback=is_loopback(host))
    url = url_of(sock)
    print(f"serving {model.id} ({kind}, {model.parameters / 1e6:.1f}M parameters) with {model.engine}", flush=True)
    print(f"  page:       {url}" if not args.no_ui else "  page:       off (--no-ui)", flush=True)
    print(f"  API:        {url}v1  ({', '.join(HANDLERS[kind].endpoints)}; auth: "
          f"{'Bearer key' if api_key else 'none'})", flush=True)
    print(f"Running on {url}  (Ctrl+C to stop)", flush=True)
    try:
        run_server(app, sock)
    except KeyboardInterrupt:
        pass
    print("server stopped", file=sys.stderr, flush=True)
    return 0


def _serve_all(args, cfg: Config, host: str, port: int, api_key: str | None, warning: str | None) -> int:
    """Every install of the models dir behind one port (lib.serving.router), each loaded on its first request."""
    from lib.serving.router import Router

    models_dir = models_dir_for(cfg.install, args.models_dir)
    router = Router(models_dir, cfg.serve, device=args.device, api_key=api_key)
    names = list(router.catalog())
    if not names:
        raise UserError(f"--all: no models installed in {models_dir}; install one with `python 06_install.py install "
                        f"PATH|owner/name`, or pass --models-dir")
    sock = bind_socket(host, port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    url = url_of(sock)
    print(f"serving {len(names)} installed models from {models_dir} ({', '.join(names)}), each loaded on its first "
          f"request and unloaded after serve.keep_alive = {cfg.serve.keep_alive} without one", flush=True)
    print(f"  OpenAI API: {url}v1  (GET /v1/models lists them; auth: {'Bearer key' if api_key else 'none'})",
          flush=True)
    print(f"  Ollama API: {url}api  (point Ollama's apps at {url.rstrip('/')})", flush=True)
    print(f"Running on {url}  (Ctrl+C to stop)", flush=True)
    try:
        run_server(router.app(loopback=is_loopback(host)), sock)
    except KeyboardInterrupt:
        pass
    finally:
        router.close()
    print("server stopped", file=sys.stderr, flush=True)
    return 0


def _engine(ref: ModelRef, args, serve: ServeConfig, metrics: Metrics | None = None) -> Engine:
    choice = args.engine or serve.engine
    loaded = load_model(ref, args.device, choice, serve.max_active, serve.max_context)
    print(loaded.engine_note, file=sys.stderr, flush=True)
    return Engine(loaded, max_active=serve.max_active, max_queue=serve.max_queue, engine=choice,
                  max_context=serve.max_context, metrics=metrics)


def _serve_page(args, cfg: Config, engine: Engine | None, host: str, port: int, api_key: str | None,
                warning: str | None, open_tab: str) -> int:
    """Bind, build the app (API + chat + studio) and serve until Ctrl+C."""
    from lib.studio.ui import Studio, studio_note

    log = sys.stderr
    sock = bind_socket(host, port)
    if not args.quiet_config:  # what it serves with: the host and port it is bound to, not the config's defaults
        bound = {**to_dict(cfg.serve), "host": host, "port": sock.getsockname()[1]}
        print("# serve config: " + ", ".join(f"{k}={v}" for k, v in bound.items()), file=log, flush=True)
    if warning:
        print(warning, file=log, flush=True)
    loopback = is_loopback(host)
    # starting processes from a web page: only where nobody else can reach the page, or behind the API key
    studio = None if args.no_ui else Studio(Path.cwd(), cfg, can_launch=loopback or bool(api_key))

    def default_model() -> ModelRef | None:
        """What the chat tab loads when a model appears: while the studio's run goes on, its chat model, not the
        phase-1 model it has on the way."""
        ref = latest_pipeline_model(cfg)
        if ref is not None and not is_chat_model(ref) and studio is not None and studio.launcher.active():
            return None
        return ref

    def load_engine(ref: ModelRef, metrics: Metrics) -> Engine:  # a model that appears while serving (the studio)
        print(f"loading {ref.id} from {ref.path or ref.gguf} …", file=log, flush=True)
        return _engine(ref, args, cfg.serve, metrics)

    app = build_app(engine, cfg.serve, api_key, lambda: available_models(cfg, args.models_dir), ui=not args.no_ui,
                    loopback=loopback, studio=studio, open_tab=open_tab, no_model_note=studio_note(cfg),
                    load_engine=load_engine, default_model=default_model)
    url = url_of(sock)
    if engine is not None:
        loaded = engine.loaded
        print(f"serving {loaded.name} ({loaded.parameters / 1e6:.1f}M parameters, context {loaded.context_length}) on "
              f"{loaded.device} with {loaded.engine}", flush=True)
    print(f"  chat UI:    {url}" if not args.no_ui else "  chat UI:    off (--no-ui)", flush=True)
    if studio is not None:
        print(f"  studio:     {url} (Runs, Train, Data tabs)" + ("" if studio.can_launch else
                                                                 "; launching is off (no API key)"), flush=True)
    print(f"  OpenAI API: {url}v1  (auth: {'Bearer key' if api_key else 'none'})", flush=True)
    print(f"Running on {url}  (Ctrl+C to stop)", flush=True)
    try:
        run_server(app, sock)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after its graceful shutdown: the normal way to stop
        pass
    finally:
        if engine is None and app.api.engine is not None:  # the one the page loaded
            app.api.engine.close()
    print("server stopped", file=log, flush=True)
    return 0
