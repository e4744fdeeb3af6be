"""The `07_serve.py` process: pick the model, load it once, then serve UI + API, chat in the terminal, or answer once.

    app = build_app(engine, cfg.serve, api_key=None, list_models=lambda: available_models(cfg))
    run_server(app, "127.0.0.1", 7860)

Safety of the bind: 127.0.0.1 by default. Any address other than loopback exposes the model (and the machine's
CPU/GPU) to the network, so it needs `--api-key` (checked on the API as a Bearer token and as the UI's login
password) or an explicit `--insecure`, which prints a loud warning. On loopback, requests must name a local Host
(127.0.0.1 / localhost), which stops DNS-rebinding pages from reaching the server through the browser.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lib.config import Config, ServeConfig, to_dict
from lib.errors import UserError
from lib.handlers import HANDLERS
from lib.install.models_dir import verify_install
from lib.serving.engine import Engine, Metrics
from lib.serving.loading import adapter_ref, load_model, pick_device
from lib.serving.resolve import ModelRef, available_models, is_chat_model, latest_pipeline_model, resolve_model
from lib.serving.task_models import kind_of, load_task_model

API_KEY_ENV = "HOMELLM_API_KEY"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="installed model name, model directory (HF dir, install folder, stage dir) or a "
                                   "pipeline id like 04_sft/<hash> (default: the latest model the pipeline produced)")
    p.add_argument("--models-dir", help="where installed models live (default: install.models_dir of the config)")
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
# Binding.


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address (resolving names, e.g. localhost)."""
    h = host.strip("[]")
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(h, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_bind(host: str, api_key: str | None, insecure: bool) -> str | None:
    """Refuse an exposed bind without protection; return a warning to print when one is allowed unprotected."""
    if is_loopback(host):
        return None
    if api_key:
        return (f"serving on {host}, reachable from other machines; the API requires the key and the UI asks for it "
                f"as password. Traffic is plain HTTP: put a TLS reverse proxy in front for untrusted networks.")
    if insecure:
        bar = "!" * 78
        return (f"{bar}\nWARNING: --insecure: serving on {host} WITHOUT AN API KEY. Anyone who can reach this port can "
                f"use the model and this machine's CPU/GPU, and read what is typed into the chat UI.\n{bar}")
    raise UserError(f"--host {host}: binding a non-loopback address exposes the model to the network. Pass --api-key "
                    f"KEY (or set {API_KEY_ENV}) to require a key, or --insecure to expose it without one, or bind "
                    f"127.0.0.1 (the default) for this machine only.")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free one. Listening before the URL is printed means a
    client that reads the URL can connect at once (the kernel queues it until the server accepts)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address or name this machine can resolve ({e})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot bind ({e.strerror}); is another server running there? "
                        f"Pick another --port (0 = any free one).") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = socket.gethostname()
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


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
    outer = _mount(server, blocks, api_key, loopback)
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


def _mount(server, blocks, api_key: str | None, loopback: bool):
    """The API server's app with the Gradio page `blocks` (if any) at /, the Host check on loopback and the status
    counter outermost (so that it also counts the 500s Starlette's error middleware answers)."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from lib.serving.api import StatusCounter

    app = server.app
    if blocks is not None:
        import gradio as gr

        from lib.studio.ui import CSS

        auth = None
        if api_key:
            # Any user name; the API key is the password.
            auth = lambda _user, password: secrets.compare_digest(password.encode(), api_key.encode())  # noqa: E731
        app = gr.mount_gradio_app(app, blocks, path="/", auth=auth,
                                  auth_message="Log in with any user name and the server's API key as password.",
                                  ssr_mode=False, mcp_server=False, footer_links=["settings"], css=CSS,
                                  max_file_size="1gb")  # conversation imports, corpus uploads, audio clips
    if loopback:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS)
    outer = StatusCounter(app, server.metrics)
    outer.api = server
    return outer


def run_server(app, sock: socket.socket, log_level: str = "warning") -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


class BackgroundServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a daemon thread; for tests and benchmarks.

        with BackgroundServer(app) as url:      # "http://127.0.0.1:PORT/"
            httpx.get(url + "health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="serve-uvicorn")

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the background server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


# ---------------------------------------------------------------------------------------------------------
# The command.


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
        print(f"serving {loaded.id} ({loaded.parameters / 1e6:.1f}M parameters, context {loaded.context_length}) on "
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
