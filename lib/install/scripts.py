"""What an install writes to run itself: start.sh, its serving config, and the post-install test that loads the
installed model in the install's own environment and generates a few tokens.
"""


from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from lib.config import ServeConfig, to_dict

POST_TEST = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, n, remote, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
t0 = time.time()
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True,
                                             trust_remote_code=remote)
model.eval()
msgs = [{"role": "user", "content": "Hello! What is the capital of France?"}]
if tok.chat_template:
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
else:
    enc = tok(msgs[0]["content"], return_tensors="pt")
with torch.no_grad():
    out = model.generate(**enc, max_new_tokens=n, do_sample=False)
new = out[0, enc["input_ids"].shape[1]:]
print(json.dumps({"ok": len(new) > 0, "text": tok.decode(new, skip_special_tokens=True), "new_tokens": len(new),
                  "seconds": round(time.time() - t0, 2), "dtype": dtype, "torch": torch.__version__}))
"""


def post_install_test(model_dir: Path, python: str, tokens: int, trust_remote_code: bool,
                      dtype: str = "float32") -> dict:
    """Load the installed model on CPU in `dtype` with the install's own Python and generate a few tokens."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        res = subprocess.run([python, "-c", POST_TEST, str(model_dir), str(tokens), "1" if trust_remote_code else "0",
                              dtype], capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "timed out after 900 s"}
    if res.returncode != 0:
        tail = [line for line in res.stderr.strip().splitlines() if line.strip()][-3:]
        return {"ok": False, "error": " | ".join(tail) or f"exit code {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


START_SH = """#!/bin/sh
# Start the chat server for the installed model "{name}" (written by 06_install.py on {date}).
# Everything is found relative to this folder, so it keeps working when the Models at Home checkout is moved or
# deleted, or this models dir is moved. PYTHON=... overrides the interpreter; extra arguments go to 07_serve.py
# (e.g. ./start.sh --port 8000).
set -e
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ -z "$PYTHON" ]; then
  if [ -x "$HERE/venv/bin/python" ]; then PYTHON="$HERE/venv/bin/python"; else PYTHON="$HERE/{shared_python}"; fi
fi
if [ ! -x "$PYTHON" ]; then
  echo "start.sh: no Python environment at $PYTHON; reinstall the model with 06_install.py, or set PYTHON" >&2
  exit 1
fi
exec "$PYTHON" "$HERE/runtime/07_serve.py" --model "$HERE" --config "$HERE/config.yaml" "$@"
"""


def serve_config_yaml(name: str, context: int | None, serve: ServeConfig) -> str:
    s = to_dict(serve)
    if context:  # leave room for the prompt: at most half the context for one answer
        s["max_new_tokens"] = max(1, min(s["max_new_tokens"], context // 2))
    head = (f"# Serving defaults for {name} (edit freely). start.sh passes this file to 07_serve.py as --config;\n"
            "# it is an ordinary Models at Home config that only sets the serve: section.\n")
    return head + yaml.safe_dump({"serve": s}, sort_keys=False, allow_unicode=True)


