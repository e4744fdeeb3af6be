"""What an installed model runs with, so that its folder does not depend on the checkout it was installed from.

An install gets two things that outlive the checkout:
- runtime/: a copy of the serving code (lib/ and 07_serve.py, ~1 MB), so start.sh runs the code it was installed
  with, even after the checkout is moved, updated or deleted;
- a Python environment outside the checkout: by default one shared by every install in the models dir
  (<models_dir>/.runtime/<id>/), or with --venv one of its own (<install>/venv/). Either is a venv of the base
  interpreter holding the distributions serving needs (and the model's own requirements) — the closure of their
  requirements, taken from the environment the installer runs in. Files are hard-linked where the filesystem
  allows (no extra disk, seconds) and copied otherwise; nothing is downloaded. <id> is a hash of the Python version,
  the platform and every name==version, so installs made with the same packages share one environment and a newer
  set gets a new one beside it.

Moving the models dir keeps everything working (start.sh finds both relative to its own folder). Another machine
with the same OS and the same Python (the venv points at the interpreter by path) can take the folder as is.
Not here: the install itself (lib/install), the server (lib/serving).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import psutil
from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement

from lib import ROOT
from lib.atomic import atomic_dir
from lib.errors import UserError
from lib.export.llama_tools import LLAMA_CPP_TOOLS  # an environment takes them along (start.sh --adapter)
from lib.models_dir import RUNTIME_DIR, VENV

COMPLETE = ".complete"
# What 07_serve.py imports (lib.serving, lib.config, lib.model.generate, the model and its loaders); their requirements
# follow from the packages' own metadata.
SERVE_DISTRIBUTIONS = ("torch", "numpy", "transformers", "tokenizers", "safetensors", "huggingface-hub", "pyyaml",
                       "gradio", "fastapi", "uvicorn", "pydantic", "starlette", "jinja2", "psutil",
                       "gguf", "tqdm", "packaging")
# Taken along when installed here: the llama.cpp engine (lib.serving.llamacpp; serving falls back to torch without).
OPTIONAL_DISTRIBUTIONS = ("llama-cpp-python",)
# 06_install.py runs train.sh's `train` command, which trains through 04_sft's stage (its script is fingerprinted)
CODE = ("04_sft.py", "06_install.py", "07_serve.py", "lib")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_closure(roots: list[str] | tuple[str, ...]) -> list[md.Distribution]:
    """The installed distributions `roots` (and OPTIONAL_DISTRIBUTIONS where installed) need, with everything they
    require (markers evaluated for this interpreter, extras not followed). A root that is not installed is an
    error: the install could not start."""
    installed = {_norm(d.metadata["Name"]): d for d in md.distributions() if d.metadata["Name"]}
    roots = [*roots, *(r for r in OPTIONAL_DISTRIBUTIONS if _norm(r) in installed)]
    env = default_environment()
    env["extra"] = ""
    seen: dict[str, md.Distribution] = {}
    todo = [_norm(r) for r in roots]
    missing = [r for r in todo if r not in installed]
    if missing:
        raise UserError(f"cannot build the install's environment: {', '.join(missing)} not installed in "
                        f"{sys.prefix}; run ./install.sh first")
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue  # an optional dependency that is not installed: the package runs without it
        dist = seen[name] = installed[name]
        for line in dist.requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate(env):
                todo.append(_norm(req.name))
    return sorted(seen.values(), key=lambda d: _norm(d.metadata["Name"]))


def environment_id(dists: list[md.Distribution]) -> str:
    pins = [f"{_norm(d.metadata['Name'])}=={d.version}" for d in dists]
    tools = sorted(p.name for p in LLAMA_CPP_TOOLS.glob("*.py"))
    blob = "\n".join([platform.python_version(), sysconfig.get_platform(), *pins, *tools])
    return f"py{sys.version_info.major}{sys.version_info.minor}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: copy
        shutil.copy2(src, dst)


def build_environment(dest: Path, dists: list[md.Distribution], log: Callable[[str], None]) -> Path:
    """A venv at `dest` (built beside it and renamed into place) holding `dists`; returns its python."""
    dest = Path(dest)
    with atomic_dir(dest, tag="building", mode=0o755) as tmp:  # an existing `dest` is an incomplete leftover
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", "--without-pip", str(tmp)], check=True, capture_output=True, text=True)
        site = Path(subprocess.run([str(tmp / "bin" / "python"), "-c",
                                    "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
        files = 0
        for dist in dists:
            if dist.files is None:
                raise UserError(f"{dist.metadata['Name']} {dist.version}: installed without a file list (RECORD), "
                                "so it cannot be copied into the install's environment; reinstall it with pip")
            origin = Path(dist.locate_file(""))
            for rel in dist.files:
                if rel.parts and rel.parts[0] == "..":  # console scripts in bin/: not needed to serve
                    continue
                src = origin / rel
                if src.is_file() and not (site / rel).exists():
                    _link_or_copy(src, site / rel)
                    files += 1
        for src in sorted(LLAMA_CPP_TOOLS.rglob("*")) if LLAMA_CPP_TOOLS.is_dir() else []:
            if src.is_file() and "__pycache__" not in src.parts:
                _link_or_copy(src, tmp / "share" / "llama.cpp" / src.relative_to(LLAMA_CPP_TOOLS))
                files += 1
        (tmp / COMPLETE).write_text("\n".join(f"{d.metadata['Name']}=={d.version}" for d in dists) + "\n")
    log(f"environment: {dest} ({len(dists)} distributions, {files} files linked or copied from {sys.prefix})")
    return dest / "bin" / "python"


def shared_environment(models_dir: Path, extra: list[str], log: Callable[[str], None]) -> Path:
    """The environment shared by the installs in models_dir for this exact package set (built on first use)."""
    dists = distribution_closure([*SERVE_DISTRIBUTIONS, *extra])
    dest = Path(models_dir) / RUNTIME_DIR / environment_id(dists)
    for stale in dest.parent.glob(".*.building-*"):  # left by a killed install whose process is gone
        m = re.search(r"\.building-(\d+)-", stale.name)
        if m and not psutil.pid_exists(int(m.group(1))):
            shutil.rmtree(stale, ignore_errors=True)
    if (dest / COMPLETE).is_file():
        log(f"environment: reusing {dest}")
        return dest / "bin" / "python"
    return build_environment(dest, dists, log)


def own_environment(folder: Path, extra: list[str], log: Callable[[str], None]) -> Path:
    """An environment inside the install folder (--venv): the folder alone is then all it needs."""
    return build_environment(Path(folder) / VENV, distribution_closure([*SERVE_DISTRIBUTIONS, *extra]), log)


def copy_code(dest: Path, commit: str | None) -> int:
    """The serving code into dest (runtime/): 07_serve.py and lib/ without caches; returns the file count."""
    n = 0
    for name in CODE:
        src = ROOT / name
        if src.is_file():
            _copy_file(src, dest / name)
            n += 1
            continue
        for p in sorted(src.rglob("*.py")):
            if "__pycache__" not in p.parts:
                _copy_file(p, dest / p.relative_to(ROOT))
                n += 1
    (dest / "VERSION").write_text(f"Models at Home runtime, copied from {ROOT} at commit {commit or 'unknown'}\n")
    return n


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
