"""What an install writes to run itself: start.sh, its serving config, and the post-install test: the install's
own start.sh serving in its own environment, asked once over HTTP the way apps ask it.
"""


from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import httpx
import yaml

from lib.config import ServeConfig, to_dict
from lib.handlers import HANDLERS, POST_TEST_TEXT
from lib.models_dir import START
from lib.serving.process import MeasuredProcess, NotServing, free_port, wait_ready

MAX_TEXT = 400  # of the post-test's answer kept in model_info.json (an embedding prints hundreds of numbers)


def silent_wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """A clip of silence: what a speech model's post-test transcribes (it loads and decodes; nothing to hear)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(seconds * rate))
    return path


def spoken_wav(path: Path, text: str = POST_TEST_TEXT) -> tuple[Path, bool]:
    """`text` spoken by espeak-ng where it is installed (install.sh --dev installs it), else a second of silence;
    returns (the clip, whether it holds speech)."""
    exe = shutil.which("espeak-ng")
    if exe is not None and subprocess.run([exe, "-s", "140", "-w", str(path), text], capture_output=True).returncode == 0:
        return path, True
    return silent_wav(path), False


def post_install_test(folder: Path, tokens: int, timeout: float = 900, kind: str = "chat") -> dict:
    """Serve the install the way the user's `./start.sh` does (its runtime copy of 07_serve, its environment, engine
    choice, chat template and page; nothing added but a free loopback port and, for the test, the CPU), wait for
    /health, then call the handler's endpoint once over HTTP (lib.handlers: a greedy chat completion of at most
    `tokens` tokens, embeddings, labels, a ranking, the transcript of a spoken clip) and load the page.
    Returns {ok, args, endpoint, text, engine, seconds, peak_rss_bytes}; ok False with the reason (the server's
    last lines when it died)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    handler = HANDLERS[kind]
    args = ["--port", str(free_port())]
    url = f"http://127.0.0.1:{args[1]}"
    with tempfile.TemporaryDirectory(prefix="post-test-") as tmp:
        server = MeasuredProcess(["sh", str(folder / START), *args], env, folder)
        try:
            wait_ready(server, url, timeout)
            text = _ask(url, handler.endpoints[0], handler.post_test, tokens, Path(tmp), timeout)
            page = httpx.get(url + "/", headers={"accept": "text/html"}, timeout=60)  # as a browser asks
            if page.status_code != 200 or "<html" not in page.text.lower():
                raise PostTestFailed(f"the page at / answered {page.status_code}: {page.text[:200]}")
            error = None
        except (PostTestFailed, NotServing, httpx.HTTPError) as e:
            error = str(e) or type(e).__name__
        res = server.stop()
    log = res["stderr"]
    if error is not None:
        tail = [line for line in log.strip().splitlines() if line.strip()][-3:]
        return {"ok": False, "error": " | ".join([error, *tail])}
    engine = next((line for line in log.splitlines() if line.startswith("engine ")), "")
    return {"ok": True, "args": args, "endpoint": handler.endpoints[0], "text": text[:MAX_TEXT], "engine": engine,
            "seconds": res["seconds"], "peak_rss_bytes": res["peak_rss_bytes"]}


class PostTestFailed(Exception):
    pass


def _ask(url: str, endpoint: str, request: dict, tokens: int, tmp: Path, timeout: float) -> str:
    """POST the handler's request to `endpoint`; what it answered, as text (a chat reply, a transcript, or the
    answer's JSON for vectors, labels and rankings). A PostTestFailed when it is not the endpoint's shape."""
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    if "file" in request:  # speech: OpenAI's multipart upload
        clip, speech = spoken_wav(tmp / "speech.wav")
        with open(clip, "rb") as f:
            r = httpx.post(url + endpoint, data={"model": model}, files={"file": (clip.name, f, "audio/wav")},
                           timeout=timeout)
    else:
        body = {"model": model, **request}
        if endpoint == "/v1/chat/completions":
            body |= {"max_tokens": tokens, "temperature": 0, "seed": 0}
        r = httpx.post(url + endpoint, json=body, timeout=timeout)
    if r.status_code != 200:
        raise PostTestFailed(f"POST {endpoint} answered {r.status_code}: {r.text[:300]}")
    answer = r.json()
    try:
        if endpoint == "/v1/chat/completions":
            return str(answer["choices"][0]["message"]["content"])
        if endpoint == "/v1/audio/transcriptions":
            text = answer["text"].strip()
            if speech and not text:
                raise PostTestFailed(f"POST {endpoint}: an empty transcript of spoken words")
            return text
        part = {"/v1/embeddings": lambda a: a["data"][0]["embedding"], "/v1/classify": lambda a: a["data"][0]["labels"],
                "/v1/rerank": lambda a: a["results"]}[endpoint](answer)
    except (KeyError, IndexError, TypeError) as e:
        raise PostTestFailed(f"POST {endpoint}: not the endpoint's answer ({e!r} missing): {r.text[:300]}") from None
    if not part:
        raise PostTestFailed(f"POST {endpoint}: an empty answer: {r.text[:300]}")
    return json.dumps(part)


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


