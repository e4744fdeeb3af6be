"""What an install writes to run itself: start.sh, its serving config, and the post-install test that loads the
installed model in the install's own environment and generates a few tokens.
"""


from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import yaml

from lib.config import ServeConfig, to_dict
from lib.handlers import HANDLERS

MAX_TEXT = 400  # of the post-test's answer kept in model_info.json (an embedding prints hundreds of numbers)


def silent_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """A clip of silence: what a speech model's post-test transcribes (it loads and decodes; nothing to hear)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return path


def post_install_test(folder: Path, tokens: int, timeout: float = 900, kind: str = "chat") -> dict:
    """Ask the installed model once the way the user's first `./start.sh --prompt ...` will: the install's own
    start.sh, its runtime copy of 07_serve, its environment, engine choice and chat template; on the CPU, greedy.
    The handler of `kind` (lib.handlers) says what to ask. Returns {ok, args, text, engine, seconds,
    peak_rss_bytes} (ok False with the error's last lines)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="post-test-") as tmp:
        args = [str(silent_wav(Path(tmp) / "silence.wav")) if a == "SILENCE" else a
                for a in HANDLERS[kind].post_test]
        result = _run_start_sh(folder, [*args, "--seed", "0", "--device", "cpu", "--set",
                                        f"serve.max_new_tokens={tokens}", "--set", "serve.temperature=0.0"],
                               env, timeout)
    if result["ok"]:
        result["args"] = list(HANDLERS[kind].post_test)
        result["text"] = result["text"][:MAX_TEXT]
    return result


# A small interpreter that runs the command and reports its peak RSS. A child forked straight from the installer
# would count the installer's own pages in its peak (Linux keeps the pre-exec high-water mark of a forked copy:
# 1.30 GB measured for a 0.87 GB server); forked from this launcher it starts from the launcher's few MB.
_LAUNCHER = """import json, os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
open(sys.argv[1], "w").write(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}))
"""


def run_measured(cmd: list[str], env: dict, cwd: Path, timeout: float) -> dict:
    """Run `cmd`: {rc, stdout, stderr, seconds, peak_rss_bytes} (its own peak RSS; rc None when it timed out)."""
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".json") as rep:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, rep.name, *cmd], stdout=out, stderr=err,
                                text=True, env=env, cwd=cwd, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        report = json.loads(rep.read() or "{}")
        return {"rc": report.get("rc"), "stdout": out.read(), "stderr": err.read(),
                "seconds": round(time.time() - t0, 2), "peak_rss_bytes": report.get("maxrss_kb", 0) * 1024}


def _run_start_sh(folder: Path, args: list[str], env: dict, timeout: float) -> dict:
    res = run_measured(["sh", str(folder / "start.sh"), *args], env, folder, timeout)
    log = res["stderr"]
    engine = next((line for line in log.splitlines() if line.startswith("engine ")), "")
    if res["rc"] is None:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    if res["rc"] != 0:
        tail = [line for line in log.strip().splitlines() if line.strip()][-3:]
        return {"ok": False, "error": " | ".join(tail) or f"exit code {res['rc']}"}
    return {"ok": True, "text": res["stdout"].strip(), "engine": engine, "seconds": res["seconds"],
            "peak_rss_bytes": res["peak_rss_bytes"]}


START_SH = """#!/bin/sh
# Start the server for the installed model "{name}" (written by 06_install.py on {date}).
# Everything is found relative to this folder, so it keeps working when the Models at Home checkout is moved or
# deleted, or this models dir is moved. PYTHON=... overrides the interpreter; extra arguments go to 07_serve.py
# (e.g. ./start.sh --port 8000). What the server prints on stderr is also appended to logs/server.log.
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ -z "$PYTHON" ]; then
  if [ -x "$HERE/venv/bin/python" ]; then PYTHON="$HERE/venv/bin/python"; else PYTHON="$HERE/{shared_python}"; fi
fi
if [ ! -x "$PYTHON" ]; then
  echo "start.sh: no Python environment at $PYTHON; reinstall the model with 06_install.py, or set PYTHON" >&2
  exit 1
fi
exec "$PYTHON" "$HERE/runtime/07_serve.py" --model "$HERE" --config "$HERE/config.yaml" \\
  --log-file "$HERE/logs/server.log" "$@"
"""


TRAIN_SH = """#!/bin/sh
# Fine-tune the installed model "{name}" on your own data (written by 06_install.py on {date}):
#   ./train.sh DATA [--name NAME] [--tensorboard]   LoRA, settings chosen for this model, data and machine
#                                                    (printed with reasons); --tensorboard: live curves on 127.0.0.1
# The adapter and its training report go to adapters/NAME/; serve it with ./start.sh --adapter NAME.
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ -z "$PYTHON" ]; then
  if [ -x "$HERE/venv/bin/python" ]; then PYTHON="$HERE/venv/bin/python"; else PYTHON="$HERE/{shared_python}"; fi
fi
exec "$PYTHON" "$HERE/runtime/06_install.py" train "$HERE" "$@" --config "$HERE/config.yaml" --quiet-config
"""


def serve_config_yaml(name: str, context: int | None, serve: ServeConfig) -> str:
    s = to_dict(serve)
    if context:  # leave room for the prompt: at most half the context for one answer
        s["max_new_tokens"] = max(1, min(s["max_new_tokens"], context // 2))
    head = (f"# Serving defaults for {name} (edit freely). start.sh passes this file to 07_serve.py as --config;\n"
            "# it is an ordinary Models at Home config that only sets the serve: section.\n")
    return head + yaml.safe_dump({"serve": s}, sort_keys=False, allow_unicode=True)


