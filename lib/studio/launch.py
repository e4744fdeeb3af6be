"""Start, stop and resume the pipeline from the studio: the same Snakemake command a user types, as a child process.

    launcher = Launcher(project_dir=".", artifacts_dir="artifacts")
    launcher.start("config/studio/my-run.yaml")   # snakemake --cores all --configfile config/studio/my-run.yaml ...
    launcher.active()                             # {"pid", "command", "config", "started", "log"} or None
    launcher.stop()                               # SIGTERM to the whole process group: the trainer checkpoints
    launcher.start("config/studio/my-run.yaml")   # resumes: finished stages are cache hits, training continues

One pipeline at a time per artifacts dir: <artifacts>/.studio/launch.json names the running one (pid, command), so
a second start, from this studio or another one on the same directory, is refused with what is running. Snakemake's
own lock on the working directory stops a run started from a terminal at the same time.
The child gets its own session (process group), so Stop reaches Snakemake and the stage it runs at once: the
trainer turns SIGTERM into a checkpoint (lib.train.loop), Snakemake marks the job incomplete, and the next start
resumes from that checkpoint (`--rerun-incomplete`).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lib import ROOT
from lib.artifacts import read_json
from lib.atomic import atomic_write_json
from lib.errors import UserError
from lib.models_dir import TRAIN
from lib.stages import STAGES
from lib.studio.runs import pid_alive

STATE = "launch.json"
SNAKEFILE = ROOT / "Snakefile"
# what the studio can run up to: everything, or any stage's target (the stage map's), furthest first; the install
# is the command line's business (it writes outside the project)
TARGETS = ("all", *(s.target for s in reversed(STAGES) if s.kind != "install"))


class Launcher:
    def __init__(self, project_dir: str | Path, artifacts_dir: str | Path, snakefile: Path | None = None):
        self.project = Path(project_dir).resolve()
        artifacts = Path(artifacts_dir)
        self.artifacts = artifacts if artifacts.is_absolute() else self.project / artifacts
        self.dir = self.artifacts / ".studio"
        self.snakefile = Path(snakefile or SNAKEFILE).resolve()
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def command(self, config_file: str | Path, target: str = "all") -> list[str]:
        """What runs, as a user would type it in the project dir."""
        if target not in TARGETS:
            raise UserError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
        cmd = ["snakemake", "--cores", "all"]
        if self.snakefile != self.project / "Snakefile":
            cmd += ["-s", str(self.snakefile)]
        # the target goes before --configfile, which takes every value after it
        return cmd + ["--rerun-incomplete", target, "--configfile", _rel(self._path(config_file), self.project)]

    def _path(self, config_file: str | Path) -> Path:
        """A config file named relative to the project dir (where Snakemake runs), or absolute."""
        p = Path(config_file)
        return p if p.is_absolute() else self.project / p

    def display(self, config_file: str | Path, target: str = "all") -> str:
        return shlex.join(self.command(config_file, target))

    # -- state ---------------------------------------------------------------------------------------------

    def _state(self) -> dict | None:
        try:
            return read_json(self.dir / STATE)
        except (OSError, ValueError):
            return None

    def active(self) -> dict | None:
        """The pipeline running here (from any studio), or None. Reaps our own child when it has ended."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is not None:
                self._finish(self._proc.returncode)
            state = self._state()
            if not state or state.get("ended") is not None:
                return None
            if self._proc is not None and self._proc.pid == state.get("pid"):
                return state
            if pid_alive(int(state.get("pid", -1))) and _is_ours(int(state["pid"])):
                return state
            return None

    def last(self) -> dict | None:
        """The latest launch's state, ended or not (for Resume and the exit code)."""
        self.active()
        return self._state()

    def _finish(self, code: int) -> None:
        state = self._state() or {}
        if state.get("pid") == self._proc.pid:
            atomic_write_json(self.dir / STATE, {**state, "ended": time.time(), "returncode": code})
        self._proc = None

    # -- actions -------------------------------------------------------------------------------------------

    def start(self, config_file: str | Path, target: str = "all") -> dict:
        if not self._path(config_file).is_file():
            raise UserError(f"{self._path(config_file)}: config file not found")
        cmd = self.command(config_file, target)
        # the interpreter running the studio runs Snakemake, so its rules use the same environment
        return self._launch([sys.executable, "-m", *cmd], shlex.join(cmd),
                            {"kind": "pipeline", "config": str(config_file), "target": target})

    def finetune(self, install: str | Path, data: str | Path, name: str) -> dict:
        """An installed model's own train.sh on `data` (LoRA into <install>/adapters/<name>/), as a user would run
        it; one training at a time here, pipeline or fine-tune."""
        cmd = ["sh", str(Path(install) / TRAIN), str(data), "--name", name]
        return self._launch(cmd, shlex.join(cmd), {"kind": "finetune", "install": str(install), "adapter": name})

    def _launch(self, argv: list[str], command: str, meta: dict) -> dict:
        running = self.active()
        if running:
            raise UserError(f"a training is already running from {self.artifacts}: `{running['command']}` (pid "
                            f"{running['pid']}, started {time.strftime('%H:%M:%S', time.localtime(running['started']))}"
                            f"). Stop it first, or wait for it to finish.")
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / f"launch-{time.strftime('%Y%m%d-%H%M%S')}.log"
        with self._lock, open(log, "ab") as out:
            self._proc = subprocess.Popen(argv, cwd=self.project, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
            state = {"pid": self._proc.pid, "command": command, **meta, "started": time.time(), "log": str(log),
                     "ended": None}
            atomic_write_json(self.dir / STATE, state)
        return state

    def stop(self, timeout_s: float = 60.0) -> dict | None:
        """SIGTERM to the pipeline's process group; wait for it to end (the trainer saves a checkpoint first)."""
        state = self.active()
        if not state:
            return None
        pid = int(state["pid"])
        atomic_write_json(self.dir / STATE, {**state, "stopped": time.time()})  # asked to stop: not a failure
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.active():
            time.sleep(0.1)
        if self.active():  # a stage that ignores SIGTERM: stop it for good (training resumes from its checkpoint)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            time.sleep(0.5)
            self.active()
        return self._state()

    def log_tail(self, max_chars: int = 6000) -> str:
        state = self._state()
        if not state or not Path(state.get("log", "")).is_file():
            return ""
        path = Path(state["log"])
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - max_chars))
            return f.read().decode("utf-8", "replace")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path.resolve())


def _is_ours(pid: int) -> bool:
    """A pid from launch.json is still our pipeline or fine-tune (not a recycled pid of something else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"snakemake" in cmdline or b"06_install.py" in cmdline  # train.sh execs 06_install.py train
    except OSError:
        return True  # no /proc (macOS): trust the pid
