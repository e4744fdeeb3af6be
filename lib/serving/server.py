"""Where a server listens, and whether it may: binding a socket safely and running uvicorn on it.

    sock = bind_socket("127.0.0.1", 7860)     # a UserError naming the port when it is taken
    run_server(app, sock)                      # the ASGI app lib.app builds (API + page)

Safety of the bind: 127.0.0.1 by default. Any address other than loopback exposes the model (and the machine's
CPU/GPU) to the network, so it needs `--api-key` (checked on the API as a Bearer token and as the UI's login
password) or an explicit `--insecure`, which prints a loud warning. On loopback, requests must name a local Host
(127.0.0.1 / localhost), which stops DNS-rebinding pages from reaching the server through the browser.
Not here: what is served (lib.app puts the API, the page and the studio together).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

from lib.errors import UserError

API_KEY_ENV = "HOMELLM_API_KEY"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


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


