"""The models dir and the install folders in it: where installs live (~/LLM/models unless configured), the layout of
an install (declared here once: every module that reads or writes one uses these names), what makes a folder an
install, and the installs in it: listed, resolved by name, verified against their checksums, removed.

    <models_dir>/<name>/            an install, complete iff MARKER exists
        model/           MODEL      HF files: config, safetensors weights, tokenizer, chat template
        gguf/            GGUF       GGUF files + Ollama Modelfile (a GGUF install, an export that had them, --quantize)
        gguf/tokenizer/  TOKENIZER  a chat GGUF's tokenizer as HF files (rebuilding it from the GGUF takes seconds)
        adapters/NAME/   ADAPTERS   LoRA adapters trained by its train.sh
        model_info.json  INFO       the check report + install date, installer version, capabilities
        start.sh         START      starts runtime/07_serve.py --model <this folder>, paths relative to itself
        train.sh         TRAIN      (chat) fine-tunes it: lib/install/finetune.py
        runtime/         CODE       the serving code it was installed with
        venv/            VENV       with --venv only: an environment of its own
        SHA256SUMS       SUMS       sha256 of every file under model/ and gguf/
        .install_complete MARKER    written last
    <models_dir>/.runtime/<id>/     RUNTIME_DIR: the shared serving environments (lib/install/runtime_env.py)
    <models_dir>/logs/checks/<name>/ LOGS: what 05_check said of each model an install was tried for

Not here: making an install (lib/install), serving one (lib/serving).
"""


from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from lib.artifacts import read_json
from lib.atomic import atomic_write_json, atomic_write_text
from lib.config import InstallConfig
from lib.errors import UserError
from lib.fingerprint import sha256_file
from lib.names import check_name

MODEL = "model"
GGUF = "gguf"
TOKENIZER = "tokenizer"
ADAPTERS = "adapters"
INFO = "model_info.json"
START = "start.sh"
TRAIN = "train.sh"
CODE = "runtime"
VENV = "venv"
SUMS = "SHA256SUMS"
MARKER = ".install_complete"
RUNTIME_DIR = ".runtime"
LOGS = "logs"
DEFAULT_MODELS_DIR = InstallConfig().models_dir



def settings_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(base).expanduser() / "models-at-home" / "settings.json"


def set_models_dir(path: str | Path) -> Path:
    """Remember the models dir for later runs (`06_install.py config DIR`)."""
    p = Path(path).expanduser().resolve()
    settings = read_json(settings_path()) if settings_path().is_file() else {}
    settings["models_dir"] = str(p)
    atomic_write_json(settings_path(), settings)
    return p


def models_dir_for(install_cfg: InstallConfig | None = None, override: str | Path | None = None) -> Path:
    """--models-dir, else install.models_dir when changed from its default, else `config DIR`, else ~/LLM/models."""
    return Path(models_dir_and_origin(install_cfg, override)[0]).expanduser()


def models_dir_and_origin(install_cfg: InstallConfig | None, override) -> tuple[str, str]:
    if override:
        return str(override), "--models-dir"
    if install_cfg is not None and install_cfg.models_dir != DEFAULT_MODELS_DIR:
        return install_cfg.models_dir, "install.models_dir in the config"
    if settings_path().is_file():
        try:
            saved = read_json(settings_path()).get("models_dir")
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{settings_path()}: invalid JSON; fix it or set the models dir again with "
                            "`06_install.py config DIR`") from None
        if saved:
            return saved, f"set with `06_install.py config` ({settings_path()})"
    return DEFAULT_MODELS_DIR, "default"


# ---------------------------------------------------------------------------------------------------------
# Listing, resolving, verifying, removing.


def _is_install(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / MARKER).is_file()




def check_log_dir(models_dir: str | Path, name: str) -> Path:
    """Where an install (or a refusal) of `name` keeps the check report it acted on: report.txt and report.json."""
    return Path(models_dir) / LOGS / "checks" / name


def list_installed(models_dir: str | Path) -> list[dict]:
    """Complete installs under models_dir: name, path, task, size, install date, source, parameters."""
    models_dir = Path(models_dir).expanduser()
    if not models_dir.is_dir():
        return []
    out = []
    for d in sorted(models_dir.iterdir()):
        if not _is_install(d):
            continue
        try:
            info = read_json(d / INFO)
        except (OSError, json.JSONDecodeError):
            info = {}
        verdict = (info.get("check") or {}).get("verdict") or {}
        out.append({"name": d.name, "path": str(d), "task": info.get("task"), "size_bytes": info.get("size_bytes"),
                    "kind": info.get("kind") or verdict.get("kind") or ("chat" if info.get("task") ==
                                                                         "text-generation" else None),
                    "installed_at": info.get("installed_at"), "source": (info.get("source") or {}).get("ref"),
                    "origin": info.get("origin"), "params": info.get("params"),
                    "engine": verdict.get("engine"), "adapters": adapters_of(d),
                    "weights": _weights_label(info)})
    return out


def _weights_label(info: dict) -> str | None:
    """What the install serves, as a user says it: a GGUF's quantization (Q4_K_M ...), else the stored dtype."""
    model = (info.get("check") or {}).get("model") or {}
    if (model.get("gguf") or {}).get("file_type"):
        return f"gguf {model['gguf']['file_type']}"
    if info.get("gguf_files"):
        return "gguf " + ", ".join(Path(f).stem.rsplit("-", 1)[-1] for f in info["gguf_files"])
    return model.get("config_dtype")


def resolve_installed(name_or_path: str | Path, models_dir: str | Path) -> Path:
    """The folder of an installed model, by name (under models_dir) or by path; UserError listing what exists."""
    p = Path(str(name_or_path)).expanduser()
    if (p.is_absolute() or str(name_or_path).startswith(".")) and p.is_dir():
        if not (p / MARKER).is_file():
            raise UserError(f"{p}: not a complete install (no {MARKER}); install the model with 06_install.py")
        return p.resolve()
    name = check_name(str(name_or_path), "install name")
    folder = Path(models_dir).expanduser() / name
    if not _is_install(folder):
        names = ", ".join(e["name"] for e in list_installed(models_dir)) or "none"
        raise UserError(f"{name}: no installed model of that name in {Path(models_dir).expanduser()} "
                        f"(installed: {names})")
    return folder.resolve()


def _manifest_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for sub in (MODEL, GGUF) if (folder / sub).is_dir()
                  for p in (folder / sub).rglob("*") if p.is_file())


def write_sums(folder: Path) -> int:
    files = _manifest_files(folder)
    atomic_write_text(folder / SUMS, "".join(f"{sha256_file(folder / rel)}  {rel}\n" for rel in files))
    return len(files)


def read_sums(folder: Path) -> dict[str, str]:
    sums = {}
    for i, line in enumerate((folder / SUMS).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not rel or rel.startswith("/") or ".." in Path(rel).parts:
            raise UserError(f"{folder / SUMS}:{i}: expected '<sha256>  <relative path>', got {line[:80]!r}")
        sums[rel] = digest
    return sums


def verify_install(path: str | Path, quick: bool = False) -> dict:
    """Check an install against its SHA256SUMS; UserError naming every missing, changed or unexpected file.

    quick=True checks that exactly the listed files are present without hashing them (for listings).
    """
    folder = Path(path).expanduser()
    if not (folder / MARKER).is_file():
        raise UserError(f"{folder}: not a complete install (no {MARKER}): the install was interrupted or the "
                        "folder is not an install; reinstall it with 06_install.py")
    if not (folder / SUMS).is_file():
        raise UserError(f"{folder}: {SUMS} is missing, so the weights cannot be verified; reinstall the model")
    expected = read_sums(folder)
    present = set(_manifest_files(folder))
    missing = sorted(set(expected) - present)
    extra = sorted(f for f in present - set(expected))
    changed = [] if quick else sorted(rel for rel in set(expected) & present if sha256_file(folder / rel) != expected[rel])
    if missing or extra or changed:
        parts = []
        if changed:
            parts.append(f"changed (sha256 differs): {', '.join(changed)}")
        if missing:
            parts.append(f"missing: {', '.join(missing)}")
        if extra:
            parts.append(f"not in {SUMS}: {', '.join(extra)}")
        raise UserError(f"{folder}: the installed files do not match {SUMS} ({'; '.join(parts)}). The model may "
                        "have been modified or damaged: reinstall it with 06_install.py install ... --force")
    return {"path": str(folder), "files": len(expected), "hashed": not quick}


def adapters_of(install: Path) -> list[str]:
    """The LoRA adapters trained for an install by its train.sh (adapters/NAME/adapter/): what `info`, the UI and
    start.sh --adapter offer."""
    root = Path(install) / ADAPTERS
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "adapter" / "adapter_config.json").is_file())


def remove_installed(name: str, models_dir: str | Path) -> dict:
    """Delete an install, by name only (never by path), then the shared environments (<models_dir>/.runtime/<id>/)
    that no install uses any more. The install is first renamed to a hidden name, so it vanishes from `list` (and
    from a running server's model picker) at once. Returns {"folder", "freed_bytes", "environments": [removed]}."""
    folder = resolve_installed(check_name(name, "install name"), models_dir)
    freed = _tree_bytes(folder)
    trash = folder.parent / f".{folder.name}.removing-{os.getpid()}-{int(time.time())}"
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
    envs = []
    for env in unused_environments(folder.parent):
        freed += _tree_bytes(env, unique=True)
        shutil.rmtree(env, ignore_errors=True)
        envs.append(env)
    return {"folder": folder, "freed_bytes": freed, "environments": envs}


def environment_of(install: Path) -> Path | None:
    """The shared environment an install's start.sh runs with (None: its own venv/ or unreadable)."""
    try:
        text = (install / START).read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r'PYTHON="\$HERE/([^"]+)/bin/python"; fi', text)
    return (install / m.group(1)).resolve() if m else None


def unused_environments(models_dir: Path) -> list[Path]:
    """Shared environments under models_dir/.runtime that no complete install's start.sh points at."""
    runtime = Path(models_dir) / RUNTIME_DIR
    if not runtime.is_dir():
        return []
    used = {environment_of(d) for d in Path(models_dir).iterdir() if _is_install(d)}
    return [e for e in sorted(runtime.iterdir()) if e.is_dir() and not e.name.startswith(".") and e.resolve()
            not in used]


def _tree_bytes(path: Path, unique: bool = False) -> int:
    """Bytes of the files under path; unique: only files with no other hard link (an environment's files are linked
    from the installer's own, so deleting it frees only what was copied)."""
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            if not unique or st.st_nlink == 1:
                total += st.st_size
    return total


def clean_stale(models_dir: Path) -> None:
    """Remove temp folders of installs that died (kill -9, power loss): their process no longer runs."""
    import psutil

    for d in models_dir.glob(".*.installing-*"):
        m = re.search(r"\.installing-(\d+)-", d.name)
        if m and not psutil.pid_exists(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
    for d in list(models_dir.glob(".*.removing-*")) + list(models_dir.glob(".*.old-*")):
        shutil.rmtree(d, ignore_errors=True)


