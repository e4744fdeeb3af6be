"""The stage map: every pipeline stage declared once, and the stage hash that names its artifact directory.

Everything that needs to know the stages reads STAGES: the Snakefile builds one rule per entry, the report card,
the bundle, the studio and the model picker list them from here, and the stage hash below is computed from an
entry's declared config slice, its upstream stages, its code and its version.

    stage_dir(cfg, "02_tokenizer")     # artifacts/02_tokenizer/<hash>
    STAGE["03_pretrain"].reads(cfg)    # ["02_tokens", "02_tokenizer"]

Adding a stage = one Stage entry here + its numbered script + its lib module (the README's layout table says so).

The hash. hash(stage) = sha256(version, the stage's config slice, the hashes of the stages it reads, the code it
runs). Canonical JSON (sorted keys) makes key order and comments in the YAML irrelevant, and defaults are filled in,
so writing a default value explicitly changes nothing. Local files a stage reads count by their contents, never by
where they live; the code counts by its tokens, never by its comments (lib.fingerprint). Only the slice a stage
declares counts: editing `serve:` or a comment in the config code reruns nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lib.config import Config, to_dict
from lib.fingerprint import code_fingerprint, content_fingerprint

# ---------------------------------------------------------------------------------------------------------
# What each stage hashes: the config values its output depends on.


def _local(cfg: Config, p: str | None) -> str | None:
    """The local path `p` as a file system path (relative ones against the config file's directory), or None when it
    names no local file or folder (a hub id, a built-in name)."""
    if not p:
        return None
    q = Path(p).expanduser()
    q = q if q.is_absolute() else Path(cfg.base_dir) / q
    return str(q) if q.exists() or any(c in p for c in "*?[") else None


def _identity(cfg: Config, p: str | None) -> dict:
    """What a path contributes to a hash: the contents of the local files it names (not where they live, so moving
    the project or the corpus reruns nothing), or the name itself when it is no local path (a hub id)."""
    local = _local(cfg, p)
    if local is None:
        return {"path": p}
    return {"path": "<local>", "contents": content_fingerprint([local], cfg.artifacts_dir)}


def _data_config(cfg: Config) -> dict:
    c = to_dict(cfg)
    for src, s in zip(c["data"]["sources"], cfg.data.sources):
        src.update(_identity(cfg, s.path))
    return {"data": c["data"], "seed": cfg.seed}


def _tokenizer_config(cfg: Config) -> dict:
    if cfg.tokenizer.pretrained:  # a pretrained tokenizer does not depend on the corpus or the training knobs
        return {"pretrained": _identity(cfg, cfg.tokenizer.pretrained)}
    return {"tokenizer": {k: v for k, v in to_dict(cfg.tokenizer).items() if k != "encode_batch_docs"}}


def _pretrain_config(cfg: Config) -> dict:
    return {"model": to_dict(cfg.model), "pretrain": to_dict(cfg.pretrain), "seed": cfg.seed,
            "coursework": to_dict(cfg.coursework)}


def _sft_config(cfg: Config) -> dict:
    sft = to_dict(cfg.sft)
    sft["base_model"] = _identity(cfg, cfg.sft.base_model) if cfg.sft.base_model else None
    for d, s in zip(sft["data"], cfg.sft.data):
        d.update(_identity(cfg, s.path))
    return {"sft": sft, "seed": cfg.seed, "coursework": to_dict(cfg.coursework)}


def _prefs_config(cfg: Config) -> dict:
    prefs = to_dict(cfg.prefs)
    for d, s in zip(prefs["data"], cfg.prefs.data):
        d.update(_identity(cfg, s.path))
    if not any(s.type == "self_play" for s in cfg.prefs.data):
        prefs.pop("self_play")  # its knobs only count when it samples pairs
    # the SFT data and system prompt make the self-play prompts and the held-out replies
    return {"prefs": prefs, "sft_system_prompt": cfg.sft.system_prompt, "seed": cfg.seed}


def tuned_stage(cfg: Config) -> str:
    """The last tuning phase this config runs: what the export (and so check, install and serve) takes."""
    return "04_prefs" if cfg.prefs.enabled else "04_sft"


def _section(name: str) -> Callable[[Config], dict]:
    return lambda cfg: {name: to_dict(getattr(cfg, name))}


# ---------------------------------------------------------------------------------------------------------
# The map.


@dataclass(frozen=True)
class Stage:
    name: str  # its artifacts folder: <artifacts_dir>/<name>/<hash>/
    title: str  # what a user calls it
    kind: str  # data | training | export | check | install | report
    script: str  # the numbered script at the root that runs it (Snakemake calls the same one a user calls)
    module: str  # the lib module doing its work; it and every lib module it imports are the stage's code
    entry: str  # the function in `module` the script calls: run_<stage>(cfg, force=...)
    rule: str  # Snakemake's rule (its job name) and target (what a user types to stop after this stage)
    target: str
    hashes: Callable[[Config], dict]  # the config slice its output depends on
    reads: Callable[[Config], list[str]] = lambda cfg: []  # the stages whose artifacts it reads
    version: int = 1  # bump only for what the code fingerprint cannot see (a package shipping data changed)
    args: tuple[str, ...] = ()  # extra script arguments
    threads_env: tuple[str, ...] = ()  # environment variables set to the job's thread count (a job with none uses 1 core)
    identity: tuple[str, ...] = ()  # the files whose bytes are its result (a bundle's verify compares them)
    model: bool = False  # its folder holds a model that 07_serve can load
    runs: Callable[[Config], bool] = lambda cfg: True  # whether this config runs it (a switched-off phase: no)


STAGES: tuple[Stage, ...] = (
    Stage("01_data", "corpus", "data", "01_prepare_data.py", "lib.data.prepare", "run_data", "prepare_data", "data",
          hashes=_data_config, version=2, identity=("train-*.jsonl", "val-*.jsonl", "stats.json")),
    Stage("02_tokenizer", "tokenizer", "data", "02_train_tokenizer.py", "lib.data.tokenizer", "run_tokenizer",
          "train_tokenizer", "tokenizer", hashes=_tokenizer_config,
          reads=lambda cfg: [] if cfg.tokenizer.pretrained else ["01_data"],
          identity=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")),
    Stage("02_tokens", "encoded corpus", "data", "02_train_tokenizer.py", "lib.data.tokenizer", "run_tokens",
          "encode_corpus", "tokens", hashes=lambda cfg: {}, reads=lambda cfg: ["01_data", "02_tokenizer"],
          args=("--encode",), threads_env=("RAYON_NUM_THREADS",), identity=("train.bin", "val.bin", "meta.json")),
    Stage("03_pretrain", "phase 1 (pretrain)", "training", "03_pretrain.py", "lib.train.pretrain", "run_pretrain",
          "pretrain", "pretrained", hashes=_pretrain_config, reads=lambda cfg: ["02_tokens", "02_tokenizer"],
          threads_env=("OMP_NUM_THREADS",), model=True),
    Stage("04_sft", "phase 2 (SFT)", "training", "04_sft.py", "lib.train.sft", "run_sft", "sft", "sft_model",
          hashes=_sft_config, reads=lambda cfg: [] if cfg.sft.base_model else ["03_pretrain"],
          threads_env=("OMP_NUM_THREADS",), model=True),
    Stage("04_prefs", "phase 3 (preferences)", "training", "04_prefs.py", "lib.train.prefs", "run_prefs", "prefs",
          "prefs_model", hashes=_prefs_config, reads=lambda cfg: ["04_sft"], threads_env=("OMP_NUM_THREADS",),
          model=True, runs=lambda cfg: cfg.prefs.enabled),
    Stage("04_export", "export", "export", "04_sft.py", "lib.export.exporter", "run_export", "export", "exported",
          hashes=_section("export"), reads=lambda cfg: [tuned_stage(cfg)], args=("--export",),
          threads_env=("OMP_NUM_THREADS",), identity=("hf/model.safetensors", "*.gguf"), model=True),
    Stage("05_check", "compatibility check", "check", "05_check.py", "lib.check", "run_check", "check", "checked",
          hashes=_section("check"), reads=lambda cfg: ["04_export"], args=("--quiet-config",)),
    # The install lands in the models dir; its folder here is a receipt (Snakemake deletes a job's outputs before a
    # rerun, and nothing of an installed model may go before its replacement is complete).
    Stage("06_install", "install", "install", "06_install.py", "lib.install.commands", "run_install", "install",
          "installed", hashes=_section("install"), reads=lambda cfg: ["05_check"], args=("install", "--quiet-config")),
    Stage("08_report", "report card", "report", "08_report.py", "lib.report.card", "run_report", "report_card",
          "report", hashes=_section("report"), reads=lambda cfg: ["05_check"], args=("--quiet-config",),
          threads_env=("OMP_NUM_THREADS",)),
)
STAGE: dict[str, Stage] = {s.name: s for s in STAGES}


def stages_of(*kinds: str, cfg: Config | None = None) -> tuple[str, ...]:
    """The names of the stages of these kinds, in pipeline order; given a config, only those it runs."""
    return tuple(s.name for s in STAGES if s.kind in kinds and (cfg is None or s.runs(cfg)))


def model_stages() -> tuple[str, ...]:
    """The stages whose folder holds a servable model, the most finished first (export, SFT, pretrain)."""
    return tuple(s.name for s in reversed(STAGES) if s.model)


def stage(name: str) -> Stage:
    try:
        return STAGE[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGE)}") from None


# ---------------------------------------------------------------------------------------------------------
# The hash.


def _digest(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def stage_config(cfg: Config, name: str) -> dict:
    """The config values a stage's output depends on (local paths as the contents they name)."""
    return stage(name).hashes(cfg)


def upstream_stages(cfg: Config, name: str) -> list[str]:
    """The stages whose artifacts this stage reads (their hashes go into its hash)."""
    return stage(name).reads(cfg)


def upstream_hashes(cfg: Config, name: str) -> dict[str, str]:
    return {up: stage_hash(cfg, up) for up in upstream_stages(cfg, name)}


def stage_code(name: str) -> str:
    """Fingerprint of the code the stage runs (lib.fingerprint): editing it reruns the stage."""
    s = stage(name)
    return code_fingerprint(s.script, s.module)


def stage_hash(cfg: Config, name: str) -> str:
    return _digest({"version": stage(name).version, "config": stage_config(cfg, name),
                    "upstream": upstream_hashes(cfg, name), "code": stage_code(name)})


def stage_dir(cfg: Config, name: str) -> Path:
    return Path(cfg.artifacts_dir) / name / stage_hash(cfg, name)
