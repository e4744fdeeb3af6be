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

from lib.artifacts import git_commit, read_json
from lib.atomic import atomic_dir, atomic_write_json, atomic_write_text, current_umask
from lib.check import (
    REPORT_VERSION,
    check_code,
    check_model,
    fmt_bytes,
    format_report,
    open_source,
    write_report,
)
from lib.config import CheckConfig, InstallConfig, ServeConfig
from lib.errors import UserError
from lib.export.convert import gguf_to_hf
from lib.export.gguf import write_gguf
from lib.export.llama_tools import hf_to_gguf
from lib.handlers import HANDLERS, is_hf_whisper, torch_engine
from lib.hub import endpoint, hub_call, hub_token
from lib.install.quantize import perplexity, quantize
from lib.install.runtime_env import copy_code, own_environment, shared_environment
from lib.install.scripts import START_SH, TRAIN_SH, post_install_test, serve_config_yaml
from lib.models_dir import (
    CODE,
    GGUF,
    INFO,
    LOGS,
    MARKER,
    MODEL,
    START,
    SUMS,
    TOKENIZER,
    TRAIN,
    VENV,
    check_log_dir,
    clean_stale,
    write_sums,
)
from lib.names import check_name, name_from
from lib.serving.loading import gguf_tokenizer

INSTALLER_VERSION = "1.1"
# What may be copied from a model folder: configs, safetensors, tokenizer files, chat templates, docs.
ALLOWED_SUFFIXES = {".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken", ".md", ".py"}
ALLOWED_NAMES = {"LICENSE", "LICENSE.txt", "NOTICE", "USE_POLICY.md", "README.md"}
# Weights an install takes: never pickle. CTranslate2's model.bin is its own flat format (faster-whisper's).
WEIGHT_FORMATS = {"safetensors": "*.safetensors", "gguf": "*.gguf", "ctranslate2": "model.bin"}


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
                      log: Callable[[str], None], serve_context: int | None = None) -> dict:
    """The saved check report if it is for this very model (same fingerprint, same report version), else a new check."""
    if report_path and Path(report_path).is_file():
        try:
            saved = read_json(report_path)
        except (OSError, json.JSONDecodeError):
            saved = None
        if saved and saved.get("report_version") == REPORT_VERSION and saved.get("code") == check_code():
            if saved["source"]["fingerprint"] == open_source(ref, check_cfg).fingerprint():
                log(f"check: using {report_path} (model unchanged since {saved.get('created')})")
                return saved
            log(f"check: {report_path} is stale (the model changed since); checking again")
    log(f"check: analysing {ref}")
    return check_model(ref, check_cfg, disk_path=disk_path, serve_context=serve_context)


def refusal(report: dict, trust_remote_code: bool) -> list[str]:
    """Why this model cannot be installed here (empty = installable)."""
    problems = []
    m, v = report["model"], report["verdict"]
    if not v["servable"]:
        problems.append(f"its type is {m['task']} ({m['family']}) and no handler serves that: installs are for "
                        f"{', '.join(HANDLERS)} models (lib/handlers.py)")
    for p in v["problems"]:
        if "auto_map" in p and trust_remote_code:
            continue
        problems.append(p)
    if report["files"]["weight_format"] not in WEIGHT_FORMATS and report["source"]["kind"] != "gguf":
        problems.append(f"no safetensors weights (found: {report['files']['weight_format'] or 'none'})")
    return list(dict.fromkeys(problems))


def _copy_model_files(src_dir: Path, dst: Path, trust_remote_code: bool, log, weight_format: str | None) -> int:
    """Copy what a model needs; never pickle weights; .py (custom code) only when trusted; CTranslate2's model.bin
    only for a model the check found to be in that format."""
    n, skipped = 0, []
    for p in sorted(src_dir.rglob("*")):
        rel = p.relative_to(src_dir)
        if not p.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        ok = p.suffix in ALLOWED_SUFFIXES or p.name in ALLOWED_NAMES
        if weight_format == "ctranslate2" and rel.as_posix() == "model.bin":
            ok = True
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
        (have if _installed(n) else missing).append(n)
    return have, missing


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _environment(tmp: Path, models_dir: Path, report: dict, own: bool, log) -> Path:
    """The Python the install runs with, outside the checkout (lib/runtime_env): shared in the models dir, or
    its own venv/ with --venv. Requirements missing here are pip-installed into an own venv (needs network)."""
    have, missing = _model_requirements(report)
    for dist in HANDLERS[report["verdict"]["kind"]].requires:  # what the server needs for this kind of model
        (have if _installed(dist) else missing).append(dist)
    have, missing = list(dict.fromkeys(have)), list(dict.fromkeys(missing))
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
    clean_stale(models_dir)
    echo = echo or (lambda _msg: None)
    messages: list[str] = []  # lines logged before install.log exists

    def early(msg):
        messages.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {msg}")
        echo(msg)

    report = load_or_run_check(ref, check_cfg, report_path, models_dir, early, serve_cfg.max_context)
    name = name or default_name(report)
    check_name(name, "install name")
    if name == LOGS:
        raise UserError(f"install name {name!r} is the models dir's log folder; pick another with --name")
    kept = write_report(report, check_log_dir(models_dir, name))
    problems = refusal(report, cfg.trust_remote_code)
    if problems:
        echo(format_report(report))
        raise UserError(f"{ref}: cannot install this model here: {'; '.join(problems)}. The check report is above "
                        f"and in {kept / 'report.txt'}.")
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
        model_dir = tmp / MODEL
        src = report["source"]
        t0 = time.time()
        if src["kind"] == "gguf":  # served as it came by llama.cpp: no HF copy (cfg.gguf_hf_copy asks for one)
            if cfg.gguf_hf_copy:
                log(f"model: converting GGUF {src['path']} to a plain HF folder (safetensors, fp32)")
                gguf_to_hf(src["path"], model_dir)
        elif src["kind"] == "hub":
            model_dir.mkdir()
            _download_hub(report, model_dir, check_cfg, cfg.trust_remote_code, log)
        else:
            model_dir.mkdir()
            n = _copy_model_files(Path(src["path"]), model_dir, cfg.trust_remote_code, log,
                                  report["files"]["weight_format"])
            log(f"model: copied {n} files from {src['path']}")
        weights = WEIGHT_FORMATS.get(report["files"]["weight_format"], "*.safetensors")
        if src["kind"] != "gguf" and not any(model_dir.rglob(weights)):
            raise UserError(f"{ref}: no {weights} weights ended up in the install; refusing (pickle weights are "
                            "never installed)")
        if is_hf_whisper({"model_type": report["model"]["model_type"]}, report["model"]["loader"]):
            _whisper_to_ctranslate2(model_dir, tmp, ref, log)
        quantization = None
        if cfg.quantize:  # the quantized GGUF alone goes to gguf/; model/ keeps the config and tokenizer
            quantization = _quantized(report, model_dir, tmp, name, cfg.quantize, log)
            extras = [quantization["file"]]
        else:  # a GGUF (the source itself, or one beside an export) goes to gguf/: 07_serve serves it with llama.cpp
            extras = _copy_extras([src["path"]] if src["kind"] == "gguf" else src.get("extras") or [], tmp / GGUF,
                                  log)
        if src["kind"] == "gguf" and not model_dir.is_dir() and report["verdict"]["kind"] == "chat":
            t1 = time.time()  # transformers rebuilds a GGUF's tokenizer slowly (15 s for Gemma 3's 262k tokens)
            gguf_tokenizer(Path(src["path"])).save_pretrained(tmp / GGUF / TOKENIZER)
            log(f"tokenizer: the GGUF's, saved as HF tokenizer files in {GGUF}/{TOKENIZER}/ for start.sh to load "
                f"({time.time() - t1:.1f} s)")
        (tmp / "logs").mkdir()
        n_files = write_sums(tmp)
        log(f"manifest: {SUMS} over {n_files} files ({time.time() - t0:.1f} s so far)")
        n_code = copy_code(tmp / CODE, git_commit())
        log(f"runtime: {n_code} files of serving code copied to runtime/")
        py = _environment(tmp, models_dir, report, venv, log)
        python = str(py)
        context = report["model"]["context_length"]
        atomic_write_text(tmp / "config.yaml", serve_config_yaml(name, context, serve_cfg))

        def write_start_sh(home: Path) -> None:  # start.sh finds the shared python relative to its folder
            shared = os.path.relpath(python, home) if not venv else "venv/bin/python"
            date = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            scripts = {START: START_SH}
            if HANDLERS[report["verdict"]["kind"]].finetune:
                scripts[TRAIN] = TRAIN_SH
            for script, text in scripts.items():
                atomic_write_text(tmp / script, text.format(name=name, date=date, shared_python=shared))
                os.chmod(tmp / script, 0o755)

        write_start_sh(tmp)  # the post-test runs it from here

        result = None
        kind = report["verdict"]["kind"]
        if cfg.post_test and report["verdict"].get("cpu_torch_dtype") is None:
            log("post-install test: skipped: the model does not fit this machine's RAM (it needs the GPU)")
        elif cfg.post_test:
            log(f"post-install test: ./start.sh --port PORT serving on the CPU, asked POST "
                f"{HANDLERS[kind].endpoints[0]}" + (f", {cfg.post_test_tokens} tokens at most" if kind == "chat" else "")
                + ", and its page")
            result = post_install_test(tmp, cfg.post_test_tokens, kind=kind)
            if not result.get("ok"):
                raise UserError(f"{ref}: the post-install test failed: the install's start.sh does not serve or answer "
                                f"with the installed model ({result.get('error')}). Nothing was installed.")
            log(f"post-install test: ok in {result['seconds']} s ({result['engine']}; peak RSS "
                f"{fmt_bytes(result['peak_rss_bytes'])}): {result['text'][:160]!r}")

        date = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        info = {
            "name": name, "installed_at": date, "installer_version": INSTALLER_VERSION, "git_commit": git_commit(),
            "source": {**src, "ref": str(ref)}, "task": report["model"]["task"], "family": report["model"]["family"],
            "architecture": report["model"]["architecture"], "params": report["estimates"]["params"]["total"],
            "kind": kind, "engine": report["verdict"]["engine"], "endpoints": report["verdict"]["endpoints"],
            "capabilities": {"chat_template": report["model"]["chat_template"], "streaming": kind == "chat",
                             "context_length": context},
            "recommended": report["verdict"]["recommended"], "venv": venv,
            # the temp folder is renamed at the end: record where the venv's python will be
            "python": str(final / VENV / "bin" / "python") if venv else python, "origin": origin,
            "gguf_files": [e for e in extras if e.endswith(".gguf")], "modelfile": "Modelfile" in extras,
            "quantization": quantization, "post_test": result, "check": report,
        }
        write_start_sh(final)
        info["size_bytes"] = _dir_size(tmp)
        atomic_write_json(tmp / INFO, info)
        log(f"install: complete, {fmt_bytes(info['size_bytes'])}")
        atomic_write_text(tmp / MARKER, date + "\n")
        _normalise_modes(tmp)
    return final


def _quantized(report: dict, model_dir: Path, tmp: Path, name: str, qtype: str, log) -> dict:
    """Make the install's GGUF of quantization `qtype` with llama.cpp's tools (lib.install.quantize) from the best
    source there is: an f16/f32 GGUF beside an export, the model's safetensors (converted to f16 first: our own
    GGUF writer for the Llama models HomeLLM serves, llama.cpp's converter for every other architecture), or the
    GGUF it came as (re-quantized). Returns what model_info.json records, perplexities included."""
    if report["verdict"]["kind"] != "chat":
        raise UserError(f"--quantize is for chat models (causal LMs, served by llama.cpp); this is a "
                        f"{report['verdict']['kind']} model: install it without --quantize")
    src = report["source"]
    ggufs = [Path(e) for e in src.get("extras") or [] if e.endswith(".gguf")]
    full = [g for g in ggufs if re.search(r"(?i)(^|[-_.])(f16|f32|bf16)$", g.stem)]
    work = tmp / ".quantize"
    work.mkdir()
    t0 = time.time()
    if src["kind"] == "gguf":
        source, what = Path(src["path"]), f"the GGUF it came as ({report['model']['gguf'].get('file_type')})"
        log(f"quantize: re-quantizing {source.name}: its full-precision weights are not there, so the result "
            "carries the error of both quantizations")
    elif full:
        source, what = full[0], f"the export's {full[0].name}"
    else:
        source = work / f"{name}-f16.gguf"
        if torch_engine(_read_config(model_dir)) == "torch":
            what = "its safetensors, written as f16 GGUF by our exporter"
            write_gguf(model_dir, source, "f16", name)
        else:
            what = "its safetensors, converted to f16 GGUF by llama.cpp's convert_hf_to_gguf.py"
            hf_to_gguf(model_dir, source, label=src.get("repo_id") or src["path"])
    log(f"quantize: {qtype} from {what}")
    (tmp / GGUF).mkdir()
    out = quantize(source, tmp / GGUF / f"{name}-{qtype.upper()}.gguf", qtype)
    ppl_src, ppl_q = perplexity(source), perplexity(out)
    info = {"type": qtype, "source": what, "file": str(out), "bytes": out.stat().st_size,
            "source_bytes": source.stat().st_size, "perplexity_source": round(ppl_src, 4),
            "perplexity_quantized": round(ppl_q, 4), "perplexity_change_pct": round(100 * (ppl_q / ppl_src - 1), 2),
            "seconds": round(time.time() - t0, 1)}
    shutil.rmtree(work)
    for w in model_dir.rglob("*.safetensors") if model_dir.is_dir() else []:
        w.unlink()  # llama.cpp serves the GGUF; model/ keeps the config and tokenizer it reads
    log(f"quantize: {out.name}, {fmt_bytes(info['bytes'])} (source {fmt_bytes(info['source_bytes'])}); perplexity "
        f"on the built-in text {ppl_src:.3f} -> {ppl_q:.3f} ({info['perplexity_change_pct']:+.2f}%)")
    info["file"] = out.name
    return info


def _whisper_to_ctranslate2(model_dir: Path, tmp: Path, ref: str, log) -> None:
    """Replace model/ (a Hugging Face Whisper) with its CTranslate2 conversion, what faster-whisper reads: the
    weights as they are (faster-whisper picks int8 or float at load), tokenizer and feature extractor alongside."""
    import ctranslate2.converters

    hf = tmp / ".whisper-hf"
    model_dir.rename(hf)
    keep = [f for f in ("tokenizer.json", "preprocessor_config.json") if (hf / f).is_file()]
    if "tokenizer.json" not in keep:
        raise UserError(f"{ref}: this Whisper has no tokenizer.json, which faster-whisper needs; save its processor "
                        "with a recent transformers (WhisperProcessor.save_pretrained writes it)")
    t0 = time.time()
    try:
        ctranslate2.converters.TransformersConverter(str(hf), copy_files=keep).convert(str(model_dir))
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise UserError(f"{ref}: CTranslate2 cannot convert this Whisper model ({type(e).__name__}: {e}); nothing "
                        "was installed") from None
    shutil.rmtree(hf)
    log(f"model: Whisper converted to CTranslate2 (faster-whisper's format) in {time.time() - t0:.1f} s; "
        "the Hugging Face weights are not kept")


def _read_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


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


