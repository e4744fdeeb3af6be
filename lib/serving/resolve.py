"""Which model to serve: an installed model name, a model directory, or the latest model the pipeline produced.

    ref = resolve_model(None, cfg)              # the furthest complete stage of this config, else the newest one
    ref = resolve_model("mymodel", cfg)         # <install.models_dir>/mymodel/model after verify_install
    ref = resolve_model("artifacts/04_sft/ab12", cfg)
    ref = resolve_model("~/Downloads/model.Q4_K_M.gguf", cfg)   # a GGUF file, or a folder holding one
    refs = available_models(cfg)                # what the UI's model picker lists

Every answer is a `ModelRef` with an HF-format directory (`path`: config.json + safetensors + tokenizer), a GGUF
file (`gguf`), or both: exports and installs keep their GGUF files beside the HF folder, and the engine serves
the GGUF with llama.cpp where it can (lib.serving.loading picks).
Not here: loading the weights (lib.serving.loading).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from lib.artifacts import MANIFEST, is_complete, read_json
from lib.config import Config, ExportConfig
from lib.errors import UserError
from lib.models_dir import (
    GGUF,
    INFO,
    MARKER,
    MODEL,
    adapters_of,
    list_installed,
    models_dir_for,
    resolve_installed,
    verify_install,
)
from lib.names import name_from, run_model_name
from lib.stages import STAGE, model_stages, stage_dir, stages_of

# Stages whose output is a servable HF model directory, furthest first.
MODEL_STAGES = model_stages()
# Where the HF directory may sit inside a stage or install folder (the folder itself first).
_HF_SUBDIRS = (".", MODEL, "hf")  # a folder itself, an install, a pipeline export


# Which GGUF to serve when a folder has several: 8-bit first (llama.cpp's fastest at full quality on a CPU), then
# 16-bit, then whatever else is there.
GGUF_PREFERENCE = ("q8_0", "f16", "bf16")


@dataclass(frozen=True)
class ModelRef:
    id: str  # what the picker keys it by and --model accepts: an install name, a stage id, a folder name
    path: Path | None  # an HF-format model directory (None for a GGUF file alone)
    source: str  # "installed", "pipeline" or "path"
    info: dict = field(default_factory=dict, compare=False)  # model_info.json or the stage manifest's summary
    install_dir: Path | None = None  # the install folder, for installed models (verified again before loading)
    gguf: Path | None = None  # the same model as a GGUF file, when there is one
    adapter: str | None = None  # an install's LoRA adapter (train.sh) to serve with it (lib.serving.loading)
    lora: Path | None = None  # that adapter as a llama.cpp LoRA GGUF, applied over `gguf` by the llama.cpp engine
    name: str | None = None  # what clients send as "model" when it is not `id`: a pipeline model's run name

    @property
    def served_name(self) -> str:
        """The model's name on the API (/v1/models, "model" in requests and answers): an install's name, a pipeline
        model's install/export name (lib.names.run_model_name), never a stage hash."""
        return self.name or self.id

    @property
    def label(self) -> str:
        """What the model picker shows: a pipeline model by its run (config name), what it is and when it was made,
        the stage folder as a detail; an installed one by its install name."""
        if self.source == "pipeline" and self.info.get("stage") in STAGE:
            when = str(self.info.get("created") or "")[:16].replace("T", " ")
            run = self.info.get("config_name") or "pipeline"
            return f"{run} · {STAGE[self.info['stage']].title} · {when} ({self.id[:len(self.info['stage']) + 7]})"
        if self.source == "installed" and self.adapter:
            return f"{self.install_dir.name} + LoRA {self.adapter} (installed)"
        if self.source == "installed":
            return f"{self.id} (installed)"
        return f"{self.id} ({self.source})"


def find_hf_dir(folder: Path) -> Path | None:
    """The HF model directory at or directly under `folder` (a stage dir may keep it in a subfolder)."""
    for sub in _HF_SUBDIRS:
        cand = (folder / sub).resolve()
        if (cand / "config.json").is_file():
            return cand
    return None


def find_gguf(folder: Path) -> Path | None:
    """The GGUF file to serve from `folder` or its gguf/ subfolder (see GGUF_PREFERENCE), None when there is none."""
    found = [p for sub in (".", GGUF) if (folder / sub).is_dir() for p in (folder / sub).glob("*.gguf") if p.is_file()]

    def rank(p: Path) -> tuple[int, str]:
        name = p.stem.lower()
        hits = [i for i, q in enumerate(GGUF_PREFERENCE) if re.search(rf"(^|[-_.]){q}($|[-_.])", name)]
        return (hits[0] if hits else len(GGUF_PREFERENCE), p.name)

    return min(found, key=rank).resolve() if found else None


def _safe_id(text: str) -> str:
    """A model id clients can type: printable, no whitespace or path tricks."""
    return re.sub(r"[^A-Za-z0-9._/-]+", "-", text).strip("-/.") or "model"


def _stage_ref(stage_path: Path, cfg: Config | None = None) -> ModelRef | None:
    hf = find_hf_dir(stage_path) if is_complete(stage_path) else None
    if hf is None:
        return None
    manifest = read_json(stage_path / MANIFEST)
    info = {k: manifest[k] for k in ("stage", "hash", "created", "parameters", "best_val_loss", "config_name")
            if k in manifest}
    return ModelRef(id=f"{stage_path.parent.name}/{stage_path.name}", path=hf, source="pipeline", info=info,
                    gguf=find_gguf(stage_path), name=_run_model_name(manifest, cfg))


def _run_model_name(manifest: dict, cfg: Config | None) -> str:
    """A pipeline model's API name: the name its install gets (export.name, -<config> for a config other than the
    default, install.name where set), with the stage's for a model before the export ("homellm-sft")."""
    exported = (manifest.get("config") or {}).get("export") or {}
    export_name = exported.get("name") or (cfg.export.name if cfg is not None else ExportConfig().name)
    name = run_model_name(export_name, manifest.get("config_name") or "default",
                          cfg.install.name if cfg is not None else None)
    stage = STAGE.get(manifest.get("stage"))
    return name if stage is None or stage.kind == "export" else name_from(f"{name}-{stage.rule}")


def pipeline_models(artifacts_dir: str | Path) -> list[ModelRef]:
    """Every complete model stage directory under `artifacts_dir`, newest first."""
    refs = []
    for stage in MODEL_STAGES:
        root = Path(artifacts_dir) / stage
        if root.is_dir():
            refs += [r for p in root.iterdir() if not p.name.startswith(".") and (r := _stage_ref(p))]
    # The manifest is written last, so its mtime is when the stage finished.
    return sorted(refs, key=lambda r: _finished_at(r), reverse=True)


def _finished_at(ref: ModelRef) -> float:
    for parent in (ref.path, *ref.path.parents[:2]):
        if (parent / MANIFEST).is_file():
            return (parent / MANIFEST).stat().st_mtime
    return 0.0


def latest_pipeline_model(cfg: Config) -> ModelRef | None:
    """The furthest complete stage of this config; else the newest chat model (SFT or export) under artifacts/,
    else the newest pretrained one: a pretrain-only model is never picked over a chat model."""
    for stage in MODEL_STAGES:
        ref = _stage_ref(stage_dir(cfg, stage), cfg)
        if ref is not None:
            return ref
    newest = pipeline_models(cfg.artifacts_dir)
    chat = [r for r in newest if is_chat_model(r)]
    return (chat or newest or [None])[0]


def is_chat_model(ref: ModelRef) -> bool:
    """False for a pipeline's phase-1 (pretrain-only) model; every later stage's model was tuned to chat."""
    return ref.info.get("stage") != stages_of("training")[0]


# ---------------------------------------------------------------------------------------------------------
# Installed models (lib.models_dir owns the folder layout: <models_dir>/<name>/{model/, model_info.json, SHA256SUMS}).


def models_dir_of(cfg: Config, override: str | Path | None = None) -> Path:
    """--models-dir, else the models dir 06_install.py uses for this config."""
    return models_dir_for(cfg.install, override)


def installed_ref(folder: Path, quick: bool = False) -> ModelRef:
    """A verified install as a ModelRef. quick: only check the file list (listings); loading hashes every file."""
    verify_install(folder, quick=quick)  # UserError naming missing or changed files
    hf, gguf = find_hf_dir(folder), find_gguf(folder)
    if hf is None and gguf is None:
        raise UserError(f"{folder}: an installed model folder should hold model/config.json or a GGUF file in gguf/; "
                        f"it has neither. Reinstall it with `python 06_install.py`.")
    info = read_json(folder / INFO) if (folder / INFO).is_file() else {}
    return ModelRef(id=folder.name, path=hf, source="installed", info=info, install_dir=folder, gguf=gguf)


def installed_models(models_dir: str | Path) -> list[ModelRef]:
    """Installed models whose file list is intact, each followed by its LoRA adapters (train.sh); broken ones are
    left out of the picker."""
    refs = []
    for entry in list_installed(models_dir):
        try:
            ref = installed_ref(Path(entry["path"]), quick=True)
        except UserError:
            continue
        refs.append(ref)
        refs += [replace(ref, id=f"{ref.id}+{a}", adapter=a) for a in adapters_of(ref.install_dir)]
    return refs


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or "\\" in spec or Path(spec).expanduser().exists()


def resolve_model(spec: str | None, cfg: Config, models_dir: str | Path | None = None) -> ModelRef:
    """`--model` resolved: None = the latest pipeline model; an existing path; a pipeline id; an installed name."""
    if spec is None:
        ref = latest_pipeline_model(cfg)
        if ref is None:
            raise UserError(f"{Path(cfg.artifacts_dir) / MODEL_STAGES[-1]}: no finished model to serve (no complete "
                            f"{', '.join(MODEL_STAGES)} directory under {cfg.artifacts_dir}/). Run the pipeline "
                            f"(`snakemake -c1` or 03_pretrain.py) or pass --model NAME|PATH "
                            f"(installed: {_installed_names(cfg, models_dir)})")
        return ref
    if _looks_like_path(spec):
        return _path_ref(Path(spec).expanduser())
    stage = spec.split("/", 1)[0]
    if stage in MODEL_STAGES:  # an id shown by the picker, e.g. "04_sft/ab12cd34ef56"
        ref = _stage_ref(Path(cfg.artifacts_dir) / spec, cfg)
        if ref is None:
            raise UserError(f"--model {spec}: {Path(cfg.artifacts_dir) / spec} is not a complete stage directory")
        return ref
    return _installed_by_name(spec, models_dir_of(cfg, models_dir))


def _path_ref(path: Path) -> ModelRef:
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelRef(id=_safe_id(path.stem), path=None, source="path", gguf=path.resolve())
    if not path.is_dir():
        what = "is a file (not .gguf)" if path.exists() else "does not exist"
        raise UserError(f"--model {path}: expected a model directory or a .gguf file, but it {what}")
    if (path / MARKER).is_file() or (path / INFO).is_file():  # an install folder
        return installed_ref(path.resolve(), quick=True)
    hf = find_hf_dir(path)
    gguf = find_gguf(path)
    if hf is None and gguf is None:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
        raise UserError(f"--model {path}: no config.json there (nor in model/ or hf/) and no .gguf file; expected an "
                        f"HF-format model directory, a folder with a GGUF file, an install folder or a stage "
                        f"directory. Found: {found}")
    if hf is not None:
        parent = hf.parent if hf != path.resolve() else hf
        if is_complete(parent) and parent.parent.name in MODEL_STAGES:
            return _stage_ref(parent)
    return ModelRef(id=_safe_id(path.resolve().name), path=hf, source="path", gguf=gguf)


def _installed_by_name(name: str, models_dir: Path) -> ModelRef:
    folder = resolve_installed(name, models_dir)  # UserError listing the installed names when unknown
    return installed_ref(Path(folder), quick=True)


def _installed_names(cfg: Config, models_dir: str | Path | None) -> str:
    try:
        names = [r.id for r in installed_models(models_dir_of(cfg, models_dir))]
    except (UserError, OSError):
        names = []
    return ", ".join(names) or "none"


def available_models(cfg: Config, models_dir: str | Path | None = None) -> list[ModelRef]:
    """The model picker's list: installed models, then pipeline outputs (newest first)."""
    try:
        refs = installed_models(models_dir_of(cfg, models_dir))
    except UserError:  # an unreadable models-dir setting: the pipeline outputs are still worth listing
        refs = []
    return refs + pipeline_models(cfg.artifacts_dir)
