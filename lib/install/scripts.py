"""What an install writes to run itself: start.sh, its serving config, and the post-install test that loads the
installed model in the install's own environment and generates a few tokens.
"""


from __future__ import annotations

import os
import subprocess
import tempfile
import threading
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


def _run_start_sh(folder: Path, args: list[str], env: dict, timeout: float) -> dict:
    cmd = ["sh", str(folder / "start.sh"), *args]
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=folder)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS (start.sh execs python)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, log = out.read(), err.read()
    seconds = round(time.time() - t0, 2)
    engine = next((line for line in log.splitlines() if line.startswith("engine ")), "")
    if proc.returncode != 0:
        if seconds >= timeout:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
        tail = [line for line in log.strip().splitlines() if line.strip()][-3:]
        return {"ok": False, "error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return {"ok": True, "text": text.strip(), "engine": engine, "seconds": seconds,
            "peak_rss_bytes": usage.ru_maxrss * 1024}


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
#   ./train.sh DATA [--name NAME]      LoRA, settings chosen for this model, data and machine (printed with reasons)
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


