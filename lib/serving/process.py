"""A server in a process of its own, as the post-install test and `07_serve.py --all` start an install's start.sh: a
free loopback port, a launcher that measures the process's own peak RSS, ready once /health answers, stopped with
its whole session.

    server = MeasuredProcess(["sh", "start.sh", "--port", str(port)], env, folder)
    wait_ready(server, f"http://127.0.0.1:{port}", timeout=600)
    ...
    res = server.stop()        # {rc, stdout, stderr, seconds, peak_rss_bytes}
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


class NotServing(RuntimeError):
    """The process ended before it served, or did not answer /health in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A small interpreter that runs the command and reports its peak RSS. A child forked straight from the installer
# would count the installer's own pages in its peak (Linux keeps the pre-exec high-water mark of a forked copy:
# 1.30 GB measured for a 0.87 GB server); forked from this launcher it starts from the launcher's few MB. It
# outlives the SIGTERM that stops a server (a handler, which exec resets for the child), to report.
_LAUNCHER = """import json, os, signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *_: None)
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
open(sys.argv[1], "w").write(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}))
"""


class MeasuredProcess:
    """`cmd` started in a session of its own from the launcher above; stop() (or its end) gives {rc, stdout, stderr,
    seconds, peak_rss_bytes} (rc None when it was killed)."""

    def __init__(self, cmd: list[str], env: dict, cwd: Path):
        self.name = " ".join(Path(c).name for c in cmd[:2])  # what errors call it ("sh start.sh")
        self.t0 = time.time()
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.rep = tempfile.NamedTemporaryFile("r", suffix=".json")
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, self.rep.name, *cmd], stdout=self.out,
                                     stderr=self.err, text=True, env=env, cwd=cwd, start_new_session=True)

    def wait(self, timeout: float | None = None) -> dict:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()
        self.out.seek(0)
        self.err.seek(0)
        report = json.loads(self.rep.read() or "{}")
        res = {"rc": report.get("rc"), "stdout": self.out.read(), "stderr": self.err.read(),
               "seconds": round(time.time() - self.t0, 2), "peak_rss_bytes": report.get("maxrss_kb", 0) * 1024}
        for f in (self.out, self.err, self.rep):
            f.close()
        return res

    def stop(self, grace: float = 30) -> dict:
        """SIGTERM to the whole session (the server stops as on Ctrl+C), SIGKILL after `grace` seconds."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
        return self.wait(grace)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


def run_measured(cmd: list[str], env: dict, cwd: Path, timeout: float) -> dict:
    """Run `cmd` to its end: {rc, stdout, stderr, seconds, peak_rss_bytes} (its own peak RSS; rc None when it timed
    out)."""
    return MeasuredProcess(cmd, env, cwd).wait(timeout)


def wait_ready(server: MeasuredProcess, url: str, timeout: float) -> None:
    """Until `url`/health answers 200; NotServing when the process ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise NotServing(f"{server.name} exited before it served")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise NotServing(f"{server.name} did not answer /health within {timeout:.0f} s")
