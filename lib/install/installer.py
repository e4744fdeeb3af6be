"""Installing a model as a portable, self-contained folder under the models dir, and managing installs.

    <models_dir>/<name>/
        model/              HF files: config, safetensors weights, tokenizer, chat template, generation config
        gguf/               GGUF files + Ollama Modelfile, when the source export has them
        model_info.json     the check report + install date, installer version, capabilities
        config.yaml         serving defaults: a pipeline config holding a `serve:` section (start.sh passes it)
        start.sh            starts runtime/07_serve.py --model <this folder>, all paths relative to itself
        runtime/            the serving code this model was installed with (lib/ + 07_serve.py)
        logs/               server logs
        install.log         what the installer did, with timestamps
        SHA256SUMS          sha256 of every file under model/ and gguf/ (`sha256sum -c SHA256SUMS` works too)
        venv/               with --venv only: an environment of its own (else <models_dir>/.runtime/<id>/, shared)
        .install_complete   written last; a folder without it is not an install

The folder does not depend on the checkout it was installed from (lib/runtime_env): moving or deleting the
checkout, or moving the whole models dir, leaves it working.

Nothing is lost: an existing install is replaced only when asked to (--force, or a yes at the prompt), or when
it is an update of the same model — the same pipeline config, installed again by the pipeline. An install from a
different source under the same name is refused with the way to do it on purpose. A replacement keeps the previous
install until the new one is complete.

An install is built in a hidden temporary folder beside its final place and renamed into place at the end,
so Ctrl+C, a crash or kill -9 never leaves a half-installed model that `list` would show. Only safetensors
weights are copied (pickle files never), and custom model code only when trust_remote_code is asked for.
Not here: serving (lib/serving), the model analysis itself (lib/check).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from lib.artifacts import git_commit, read_json, require_stage, stage_output
from lib.atomic import atomic_dir, atomic_write_json, atomic_write_text, current_umask
from lib.check import (
    REPORT_VERSION,
    SERVABLE_TASKS,
    check_model,
    default_report_dir,
    fmt_bytes,
    format_report,
    open_source,
)
from lib.cli import config_files
from lib.config import CheckConfig, Config, InstallConfig, ServeConfig, to_dict
from lib.errors import UserError
from lib.export.convert import gguf_to_hf
from lib.fingerprint import sha256_file
from lib.hub import endpoint, hub_call, hub_token
from lib.install.runtime_env import copy_code, own_environment, shared_environment
from lib.names import check_name, name_from
from lib.stages import stage_dir

INSTALLER_VERSION = "1.1"
MARKER = ".install_complete"
SUMS = "SHA256SUMS"
INFO = "model_info.json"
DEFAULT_MODELS_DIR = InstallConfig().models_dir

# What may be copied from a model folder: configs, safetensors, tokenizer files, chat templates, docs.
ALLOWED_SUFFIXES = {".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken", ".md", ".py"}
ALLOWED_NAMES = {"LICENSE", "LICENSE.txt", "NOTICE", "USE_POLICY.md", "README.md"}


# ---------------------------------------------------------------------------------------------------------
# Names and the models dir.


def default_name(report: dict) -> str:
    src = report["source"]
    if src["kind"] == "hub":
        return name_from(src["repo_id"])
    path = Path(src["path"])
    if src["kind"] == "gguf":
        return name_from(path.stem)
    # a generic folder name (model/, hf/) says nothing: take its parent's
    if path.name in ("model", "hf", "hf_model", "export") and path.parent.name:
        path = path.parent
    return name_from(path.name)


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
    return Path(_models_dir_and_origin(install_cfg, override)[0]).expanduser()


def _models_dir_and_origin(install_cfg: InstallConfig | None, override) -> tuple[str, str]:
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
        out.append({"name": d.name, "path": str(d), "task": info.get("task"), "size_bytes": info.get("size_bytes"),
                    "installed_at": info.get("installed_at"), "source": (info.get("source") or {}).get("ref"),
                    "params": info.get("params")})
    return out


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
    return sorted(str(p.relative_to(folder)) for sub in ("model", "gguf") if (folder / sub).is_dir()
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


def remove_installed(name: str, models_dir: str | Path) -> Path:
    """Delete an install, by name only (never by path). It is first renamed to a hidden name, so it vanishes
    from `list` at once."""
    folder = resolve_installed(check_name(name, "install name"), models_dir)
    trash = folder.parent / f".{folder.name}.removing-{os.getpid()}-{int(time.time())}"
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return folder


def _clean_stale(models_dir: Path) -> None:
    """Remove temp folders of installs that died (kill -9, power loss): their process no longer runs."""
    import psutil

    for d in models_dir.glob(".*.installing-*"):
        m = re.search(r"\.installing-(\d+)-", d.name)
        if m and not psutil.pid_exists(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
    for d in list(models_dir.glob(".*.removing-*")) + list(models_dir.glob(".*.old-*")):
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Installing.


class InstallLog:
    """install.log: one timestamped line per step, echoed to the console."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None = print):
        self.path, self.echo = path, echo
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with open(self.path, "a", encoding="utf-8") as f:
            for line in str(msg).splitlines() or [""]:
                f.write(f"{stamp} {line}\n")
        if self.echo:
            self.echo(msg)


def load_or_run_check(ref: str, check_cfg: CheckConfig, report_path: str | Path | None, disk_path: Path,
                      log: Callable[[str], None]) -> dict:
    """The saved check report if it is for this very model (same fingerprint, same report version), else a new check."""
    if report_path and Path(report_path).is_file():
        try:
            saved = read_json(report_path)
        except (OSError, json.JSONDecodeError):
            saved = None
        if saved and saved.get("report_version") == REPORT_VERSION:
            if saved["source"]["fingerprint"] == open_source(ref, check_cfg).fingerprint():
                log(f"check: using {report_path} (model unchanged since {saved.get('created')})")
                return saved
            log(f"check: {report_path} is stale (the model changed since); checking again")
    log(f"check: analysing {ref}")
    return check_model(ref, check_cfg, disk_path=disk_path)


def refusal(report: dict, trust_remote_code: bool) -> list[str]:
    """Why this model cannot be installed here (empty = installable)."""
    problems = []
    m, v = report["model"], report["verdict"]
    if m["task"] not in SERVABLE_TASKS:
        problems.append(f"its type is {m['task']} ({m['family']}); installs are for text-generation models "
                        "that 07_serve can chat with")
    for p in v["problems"]:
        if "auto_map" in p and trust_remote_code:
            continue
        problems.append(p)
    if report["files"]["weight_format"] not in ("safetensors", "gguf") and report["source"]["kind"] != "gguf":
        problems.append(f"no safetensors weights (found: {report['files']['weight_format'] or 'none'})")
    return list(dict.fromkeys(problems))


def _copy_model_files(src_dir: Path, dst: Path, trust_remote_code: bool, log) -> int:
    """Copy what a model needs; never pickle weights; .py (custom code) only when trusted."""
    n, skipped = 0, []
    for p in sorted(src_dir.rglob("*")):
        rel = p.relative_to(src_dir)
        if not p.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        ok = p.suffix in ALLOWED_SUFFIXES or p.name in ALLOWED_NAMES
        if p.suffix == ".py" and not trust_remote_code:
            ok = False
        if not ok:
            skipped.append(str(rel))
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst / rel)
        n += 1
    if skipped:
        more = " ..." if len(skipped) > 20 else ""
        log(f"model: not copied (not needed or not safe): {', '.join(skipped[:20])}{more}")
    return n


def _download_hub(report: dict, dst: Path, check_cfg: CheckConfig, trust_remote_code: bool, log) -> None:
    """Download a hub model's safetensors + config + tokenizer files (needs network)."""
    from huggingface_hub import snapshot_download

    src = report["source"]
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "LICENSE*", "README.md"]
    if trust_remote_code:
        patterns.append("*.py")
    log(f"download: {src['repo_id']}@{src['revision']} ({fmt_bytes(report['files']['total_bytes'])} in the repo; "
        "safetensors, configs and tokenizer files only)")
    hub_call(lambda: snapshot_download(src["repo_id"], revision=src["revision"], local_dir=str(dst),
                                        allow_patterns=patterns, token=hub_token(check_cfg),
                                        endpoint=endpoint(),
                                        etag_timeout=check_cfg.hub_timeout_s), src["repo_id"])
    shutil.rmtree(dst / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping, not part of the model


def _copy_extras(extras: list[str], dst: Path, log) -> list[str]:
    """GGUF files and the Ollama Modelfile of an export; FROM lines are made relative so the folder moves."""
    if not extras:
        return []
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for e in extras:
        p = Path(e)
        if p.is_file():
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    mf = dst / "Modelfile"
    if mf.is_file():
        ggufs = {Path(e).name for e in extras if e.endswith(".gguf")}
        lines = []
        for line in mf.read_text(encoding="utf-8").splitlines():
            m = re.match(r"^(\s*FROM\s+)(\S+)\s*$", line, flags=re.I)
            if m and Path(m.group(2)).name in ggufs:
                line = f"{m.group(1)}./{Path(m.group(2)).name}"
            lines.append(line)
        mf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log(f"gguf: copied {', '.join(copied)}")
    return copied


def _model_requirements(report: dict) -> tuple[list[str], list[str]]:
    """The model's own requirements (libraries + non-optional special packages): (installed here, missing)."""
    wanted = [r["name"] for r in report["requirements"]["libraries"]]
    wanted += [r["name"] for r in report["requirements"]["special"] if not r["optional"]]
    have, missing = [], []
    for n in dict.fromkeys(wanted):
        try:
            importlib.metadata.version(n)
            have.append(n)
        except importlib.metadata.PackageNotFoundError:
            missing.append(n)
    return have, missing


def _environment(tmp: Path, models_dir: Path, report: dict, own: bool, log) -> Path:
    """The Python the install runs with, outside the checkout (lib/runtime_env): shared in the models dir, or
    its own venv/ with --venv. Requirements missing here are pip-installed into an own venv (needs network)."""
    have, missing = _model_requirements(report)
    if missing and not own:
        raise UserError(f"the model needs {', '.join(missing)}, which is not installed here; install it with pip, "
                        "or install the model with --venv to give it an environment of its own")
    py = own_environment(tmp, have, log) if own else shared_environment(models_dir, have, log)
    if missing:
        log(f"venv: pip install {' '.join(missing)} (needs network)")
        res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", *missing],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise UserError(f"venv: pip could not install {' '.join(missing)} into {py.parent.parent}: "
                            f"{res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'no output'}")
    return py


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


def _serve_config_yaml(name: str, context: int | None, serve: ServeConfig) -> str:
    s = to_dict(serve)
    if context:  # leave room for the prompt: at most half the context for one answer
        s["max_new_tokens"] = max(1, min(s["max_new_tokens"], context // 2))
    head = (f"# Serving defaults for {name} (edit freely). start.sh passes this file to 07_serve.py as --config;\n"
            "# it is an ordinary Models at Home config that only sets the serve: section.\n")
    return head + yaml.safe_dump({"serve": s}, sort_keys=False)


def _normalise_modes(folder: Path) -> None:
    """Temp dirs and atomic writes are private (0700/0600); an install is an ordinary folder (umask applies)."""
    umask = current_umask()
    for p in [folder, *folder.rglob("*")]:
        if p.is_symlink():
            continue
        executable = p.is_dir() or bool(p.stat().st_mode & 0o100)
        os.chmod(p, (0o755 if executable else 0o644) & ~umask)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def install_model(ref: str, models_dir: str | Path, name: str | None = None, force: bool = False, venv: bool = False,
                  *, cfg: InstallConfig | None = None, check_cfg: CheckConfig | None = None,
                  serve_cfg: ServeConfig | None = None, report_path: str | Path | None = None,
                  ask: Callable[[str], bool] | None = None, echo: Callable[[str], None] | None = print,
                  origin: str | None = None, update: bool = False) -> Path:
    """Install `ref` (export dir, HF dir, .gguf file or hub id) as <models_dir>/<name>; return that folder.

    The check report is reused from report_path when it is for this very model, else the model is checked.
    An incompatible model is refused (UserError) after printing its report. An existing install is replaced
    with force=True, when `ask(question)` answers True, or — with update=True — when it has the same `origin`
    (what it was installed from, see origin_of): an update of the same model. Anything else is refused.
    """
    cfg = cfg or InstallConfig()
    check_cfg = check_cfg or CheckConfig()
    serve_cfg = serve_cfg or ServeConfig()
    models_dir = Path(models_dir).expanduser().resolve()
    if name is not None:
        check_name(name, "install name")
    models_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(models_dir)
    echo = echo or (lambda _msg: None)
    messages: list[str] = []  # lines logged before install.log exists

    def early(msg):
        messages.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {msg}")
        echo(msg)

    report = load_or_run_check(ref, check_cfg, report_path, models_dir, early)
    problems = refusal(report, cfg.trust_remote_code)
    if problems:
        echo(format_report(report))
        raise UserError(f"{ref}: cannot install this model here: {'; '.join(problems)}. The check report is above "
                        "(05_check.py prints it too).")
    name = name or default_name(report)
    check_name(name, "install name")
    final = models_dir / name
    origin = origin or origin_of(report)
    if final.exists():
        _may_replace(final, origin, force, update, ask)

    # replacing: the old install is moved aside first and removed once the new one is in place
    with atomic_dir(final, tag="installing", keep_old=True, mode=0o755) as tmp:
        log = InstallLog(tmp / "install.log", echo)
        with open(tmp / "install.log", "a", encoding="utf-8") as f:
            f.write("".join(m + "\n" for m in messages))
        log(f"install: {ref} -> {final} (installer {INSTALLER_VERSION}, python {sys.version.split()[0]})")
        model_dir = tmp / "model"
        src = report["source"]
        t0 = time.time()
        if src["kind"] == "gguf":
            log(f"model: converting GGUF {src['path']} to a plain HF folder (safetensors, fp32)")
            gguf_to_hf(src["path"], model_dir)
        elif src["kind"] == "hub":
            model_dir.mkdir()
            _download_hub(report, model_dir, check_cfg, cfg.trust_remote_code, log)
        else:
            model_dir.mkdir()
            n = _copy_model_files(Path(src["path"]), model_dir, cfg.trust_remote_code, log)
            log(f"model: copied {n} files from {src['path']}")
        if not any(model_dir.rglob("*.safetensors")):
            raise UserError(f"{ref}: no safetensors weights ended up in the install; refusing (pickle weights are "
                            "never installed)")
        # a GGUF source is kept as it came beside its HF conversion: 07_serve serves it with llama.cpp
        extras = _copy_extras([src["path"]] if src["kind"] == "gguf" else src.get("extras") or [], tmp / "gguf", log)
        (tmp / "logs").mkdir()
        n_files = write_sums(tmp)
        log(f"manifest: {SUMS} over {n_files} files ({time.time() - t0:.1f} s so far)")
        n_code = copy_code(tmp / "runtime", git_commit())
        log(f"runtime: {n_code} files of serving code copied to runtime/")
        py = _environment(tmp, models_dir, report, venv, log)
        python = str(py)

        result = None
        cpu_dtype = report["verdict"].get("cpu_torch_dtype")
        if cfg.post_test and cpu_dtype is None:
            log("post-install test: skipped: the model does not fit this machine's RAM (it needs the GPU)")
        elif cfg.post_test:
            log(f"post-install test: loading on CPU ({cpu_dtype}) and generating {cfg.post_test_tokens} tokens")
            result = post_install_test(model_dir, python, cfg.post_test_tokens, cfg.trust_remote_code, cpu_dtype)
            if not result.get("ok"):
                raise UserError(f"{ref}: the post-install test failed: the installed model does not load or generate "
                                f"({result.get('error')}). Nothing was installed.")
            log(f"post-install test: ok in {result['seconds']} s, {result['new_tokens']} tokens: {result['text']!r}")

        date = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        context = report["model"]["context_length"]
        info = {
            "name": name, "installed_at": date, "installer_version": INSTALLER_VERSION, "git_commit": git_commit(),
            "source": {**src, "ref": str(ref)}, "task": report["model"]["task"], "family": report["model"]["family"],
            "architecture": report["model"]["architecture"], "params": report["estimates"]["params"]["total"],
            "capabilities": {"chat_template": report["model"]["chat_template"], "streaming": True,
                             "context_length": context},
            "recommended": report["verdict"]["recommended"], "venv": venv,
            # the temp folder is renamed at the end: record where the venv's python will be
            "python": str(final / "venv" / "bin" / "python") if venv else python, "origin": origin,
            "gguf_files": [e for e in extras if e.endswith(".gguf")], "modelfile": "Modelfile" in extras,
            "post_test": result, "check": report,
        }
        atomic_write_text(tmp / "config.yaml", _serve_config_yaml(name, context, serve_cfg))
        shared = os.path.relpath(python, final) if not venv else "venv/bin/python"
        atomic_write_text(tmp / "start.sh", START_SH.format(name=name, date=date, shared_python=shared))
        os.chmod(tmp / "start.sh", 0o755)
        info["size_bytes"] = _dir_size(tmp)
        atomic_write_json(tmp / INFO, info)
        log(f"install: complete, {fmt_bytes(info['size_bytes'])}")
        atomic_write_text(tmp / MARKER, date + "\n")
        _normalise_modes(tmp)
    return final


def pipeline_origin(config_files: list[str]) -> str:
    """What a pipeline install comes from: the config file(s) that produced it (edits to them make updates)."""
    return "pipeline config " + " + ".join(str(Path(f).resolve()) for f in config_files)


def origin_of(report: dict) -> str:
    """What an install of a given model comes from: its path, or its hub id."""
    src = report["source"]
    return f"hub {src['repo_id']}" if src["kind"] == "hub" else f"{src['kind']} {Path(src['path']).resolve()}"


def _may_replace(final: Path, origin: str, force: bool, update: bool, ask) -> None:
    """Raise unless replacing the existing `final` was asked for, or is an update of the same model."""
    complete = (final / MARKER).is_file()
    previous = None
    if complete:
        try:
            previous = read_json(final / INFO).get("origin") or "an earlier installer (origin not recorded)"
        except (OSError, json.JSONDecodeError, AttributeError):
            previous = "unknown (unreadable model_info.json)"
    if force or (update and previous == origin):
        return
    what = f"is already installed (from {previous})" if complete else "exists but is not an install"
    if ask and ask(f"{final} {what}. Replace it?"):
        return
    if update and complete:
        raise UserError(f"{final}: an install named {final.name} already exists and came from {previous}, not from "
                        f"{origin}; nothing was replaced. To keep both, set install.name (or --name) to another name; "
                        f"to replace it on purpose: 06_install.py install --name {final.name} --force")
    raise UserError(f"{final}: {final.name} {what}; use --force to replace it, or --name to install under "
                    "another name")


# ---------------------------------------------------------------------------------------------------------
# The 06_install.py commands.


def pipeline_install_name(cfg: Config, config_file: str | Path) -> str:
    """install.name, else export.name for the default config and export.name-<config file stem> for any other, so
    that the installs of two configs never share a name by accident."""
    if cfg.install.name:
        return cfg.install.name
    stem = Path(config_file).stem
    return cfg.export.name if stem == "default" else name_from(f"{cfg.export.name}-{stem}")


def _pipeline_ref(cfg: Config) -> tuple[str, Path]:
    """The pipeline's export dir and where 05_check put its report."""
    export = require_stage(cfg, "04_export", "Run the export stage first (snakemake export), or name a model: "
                                             "06_install.py install PATH|FILE.gguf|owner/name")
    return str(export), stage_dir(cfg, "05_check") / "report.json"


def format_list(entries: list[dict], models_dir: Path) -> str:
    if not entries:
        return f"no models installed in {models_dir}"
    lines = [f"{'name':<32} {'size':>10} {'type':<16} {'installed':<25} source"]
    for e in entries:
        lines.append(f"{e['name']:<32} {fmt_bytes(e['size_bytes']):>10} {str(e['task']):<16} "
                     f"{str(e['installed_at']):<25} {e['source']}")
    return "\n".join(lines)


def format_info(folder: Path) -> str:
    info = read_json(folder / INFO)
    try:
        verified = f"ok ({verify_install(folder)['files']} files match {SUMS})"
    except UserError as e:
        verified = f"FAILED: {e}"
    caps = info.get("capabilities", {})
    pt = info.get("post_test") or {}
    lines = [f"name          {info['name']}", f"path          {folder}",
             f"source        {info['source'].get('ref')} ({info['source'].get('kind')})",
             f"type          {info['task']} ({info['family']}, {info['architecture']})",
             f"parameters    {info['params']:,}", f"size          {fmt_bytes(info['size_bytes'])}",
             f"installed     {info['installed_at']} (installer {info['installer_version']})",
             f"context       {caps.get('context_length')}; chat template: {caps.get('chat_template')}",
             f"recommended   {info.get('recommended')}",
             f"environment   {'venv ' + info['python'] if info.get('venv') else info.get('python')}",
             f"post-test     {('ok: ' + repr(pt.get('text'))) if pt.get('ok') else pt or 'skipped'}",
             f"gguf          {', '.join(info.get('gguf_files') or []) or 'none'}",
             f"verify        {verified}",
             f"start         {folder / 'start.sh'}"]
    return "\n".join(lines)


def run_command(cfg: Config, args) -> int:
    """Dispatch one 06_install.py command (install, list, info, remove, config)."""
    models_dir = models_dir_for(cfg.install, args.models_dir)
    if args.command == "config":
        if args.target:
            p = set_models_dir(args.target)
            print(f"models dir set to {p} (saved in {settings_path()})")
        else:
            where, origin = _models_dir_and_origin(cfg.install, args.models_dir)
            print(f"models dir: {Path(where).expanduser()} ({origin})\nsettings file: {settings_path()}")
        return 0
    if args.command == "list":
        print(format_list(list_installed(models_dir), models_dir))
        return 0
    if args.command in ("info", "remove"):
        if not args.target:
            raise UserError(f"06_install.py {args.command}: expected the name of an installed model")
        folder = resolve_installed(args.target, models_dir)
        if args.command == "info":
            print(format_info(folder))
            return 0
        if not (args.yes or args.force):
            if not sys.stdin.isatty():
                raise UserError(f"06_install.py remove {args.target}: would delete {folder}; confirm with --yes "
                                "(there is no terminal to ask on)")
            if input(f"remove {folder}? [y/N] ").strip().lower() not in ("y", "yes"):
                print("not removed")
                return 1
        remove_installed(args.target, models_dir)
        print(f"removed {folder}")
        return 0
    # install
    name = args.name or cfg.install.name
    origin = None
    if args.target:
        ref, report_path = args.target, default_report_dir(cfg.artifacts_dir, args.target) / "report.json"
    else:  # the pipeline's own export: named after the config, an update of what the same config installed
        ref, report_path = _pipeline_ref(cfg)
        name = name or pipeline_install_name(cfg, config_files(args)[-1])
        origin = pipeline_origin(config_files(args))
    icfg = InstallConfig(**{**to_dict(cfg.install), "force": args.force or cfg.install.force,
                            "venv": args.venv or cfg.install.venv,
                            "post_test": cfg.install.post_test and not args.no_test,
                            "trust_remote_code": args.trust_remote_code or cfg.install.trust_remote_code})

    def ask(question: str) -> bool:
        return sys.stdin.isatty() and input(f"{question} [y/N] ").strip().lower() in ("y", "yes")

    folder = install_model(ref, models_dir, name=name, force=icfg.force, venv=icfg.venv, cfg=icfg,
                           check_cfg=cfg.check, serve_cfg=cfg.serve, report_path=report_path, ask=ask,
                           origin=origin, update=origin is not None)
    if origin is not None:  # the pipeline's receipt (Snakemake's output): never a file inside the models dir
        with stage_output(cfg, "06_install") as (_out, extra):
            extra.update({"installed": str(folder), "name": folder.name, "origin": origin})
    print(f"\ninstalled: {folder}\nstart it:  {folder / 'start.sh'}")
    return 0
