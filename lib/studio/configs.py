"""The studio's config form: which configs there are, the common knobs as overrides, what a model would cost, and
saving the edited config as a YAML file the user keeps.

    names = list_configs(".")                                      # config/default.yaml, config/recipes/..., ...
    base = load_config(names[0])
    values = form_values(base)                                     # {"model.dim": 256, "pretrain.lr": 0.001, ...}
    overrides = form_overrides(base, {**values, "pretrain.lr": 3e-4})   # ["pretrain.lr=0.0003"]
    estimate(load_config(names[0], overrides))                     # parameters and memory (05_check's formulas)
    save_config(".", "my-run", names[0], overrides)                # config/studio/my-run.yaml, validated

Overrides are `--set` strings and go through lib.config's validation, so the form accepts exactly what the
command line accepts; a bad value is the same one-paragraph error.
"""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path

import yaml

from lib.atomic import atomic_write_text
from lib.check import check_model, estimate_inference, estimate_training
from lib.config import (
    CheckConfig,
    Config,
    SftDataConfig,
    SourceConfig,
    absolute_paths,
    apply_overrides,
    from_dict,
    map_paths,
    read_config_data,
    to_dict,
)
from lib.errors import UserError
from lib.hardware import activation_dtype, probe_hardware, training_precision
from lib.model.dims import Dims
from lib.model.homellm import PRESETS, HomeLLM, model_args
from lib.names import check_name
from lib.train.base_model import lora_defaults

SAVE_DIR = Path("config") / "studio"
CUSTOM = "custom"
# The form's knobs: (dotted key, label). Model dims are shown resolved (the preset's values unless set).
FIELDS = [
    ("model.preset", "Model preset"),
    ("model.dim", "Width (dim)"),
    ("model.n_layers", "Layers"),
    ("model.n_heads", "Attention heads"),
    ("tokenizer.vocab_size", "Vocabulary size"),
    ("pretrain.seq_len", "Sequence length"),
    ("pretrain.batch_size", "Batch size"),
    ("pretrain.lr", "Learning rate"),
    ("pretrain.max_steps", "Max steps (0 = no step limit)"),
    ("pretrain.time_budget_min", "Time budget, minutes (0 = none)"),
    ("data.sources", "Data sources (YAML list)"),
    # phase 2
    ("sft.base_model", "Phase 2 tunes"),
    ("sft.train.max_epochs", "SFT epochs (0 = by steps)"),
    ("sft.train.lr", "SFT learning rate"),
    ("sft.lora.enabled", "LoRA (train small adapters instead of every weight)"),
    ("sft.lora.rank", "LoRA rank (0 = by model size)"),
    ("sft.data", "SFT data (YAML list)"),
    # phase 3
    ("prefs.enabled", "Phase 3: preference tuning"),
    ("prefs.method", "Method"),
    ("prefs.beta", "β (pull towards the phase-2 model)"),
    ("prefs.train.max_steps", "Phase 3 max steps"),
]
# the source types the data-source form offers: the schema's own list
SOURCE_TYPES = typing.get_args(typing.get_type_hints(SourceConfig)["type"])
FROM_PHASE1 = "phase 1 of this run"  # the form's word for sft.base_model: null
DIMS = ("dim", "n_layers", "n_heads")


def list_configs(project_dir: str | Path) -> list[str]:
    """Config files under <project>/config (recipes and saved studio configs included), relative paths."""
    root = Path(project_dir)
    found = sorted((root / "config").rglob("*.yaml")) if (root / "config").is_dir() else []
    out = [str(p.relative_to(root)) for p in found if "accelerate" not in p.relative_to(root).parts]
    first = [c for c in ("config/default.yaml", "config/smoke.yaml") if c in out]
    return first + [c for c in out if c not in first]


def _resolved_dims(cfg: Config) -> dict:
    try:
        a = model_args(cfg.model, cfg.tokenizer.vocab_size)
    except UserError:
        return {k: getattr(cfg.model, k) for k in DIMS}
    return {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads}


def form_values(cfg: Config) -> dict:
    """The form's fields filled from a config."""
    dims = _resolved_dims(cfg)
    t = cfg.pretrain
    return {"model.preset": cfg.model.preset or CUSTOM, **{f"model.{k}": v for k, v in dims.items()},
            "tokenizer.vocab_size": cfg.tokenizer.vocab_size, "pretrain.seq_len": t.seq_len,
            "pretrain.batch_size": t.batch_size, "pretrain.lr": t.lr, "pretrain.max_steps": t.max_steps or 0,
            "pretrain.time_budget_min": t.time_budget_min or 0,
            "data.sources": _yaml_list([_source_dict(s, SourceConfig) for s in cfg.data.sources]),
            "sft.base_model": cfg.sft.base_model or FROM_PHASE1,
            "sft.train.max_epochs": cfg.sft.train.max_epochs or 0, "sft.train.lr": cfg.sft.train.lr,
            "sft.lora.enabled": cfg.sft.lora.enabled, "sft.lora.rank": cfg.sft.lora.rank or 0,
            "sft.data": _yaml_list([_source_dict(s, SftDataConfig) for s in cfg.sft.data]),
            "prefs.enabled": cfg.prefs.enabled, "prefs.method": cfg.prefs.method, "prefs.beta": cfg.prefs.beta,
            "prefs.train.max_steps": cfg.prefs.train.max_steps or 0}


def _yaml_list(items: list[dict]) -> str:
    return yaml.safe_dump(json.loads(json.dumps(items)), sort_keys=False, allow_unicode=True)


def _source_dict(src, kind) -> dict:
    """A data source as the user would write it: only the fields that differ from the defaults."""
    default = to_dict(kind(type=src.type))
    return {k: v for k, v in to_dict(src).items() if k == "type" or v != default.get(k)}


def preset_dims(preset: str) -> dict:
    return {k: PRESETS[preset][k] for k in DIMS} if preset in PRESETS else {}


def form_overrides(base: Config, values: dict) -> list[str]:
    """`--set` strings for the fields that differ from `base`."""
    old = form_values(base)
    out: list[str] = []

    def put(key, value):
        out.append(f"{key}={json.dumps(value)}")

    preset = values.get("model.preset") or CUSTOM
    if preset != old["model.preset"]:
        put("model.preset", None if preset == CUSTOM else preset)
    reference = preset_dims(preset) if preset != CUSTOM else {}
    for k in DIMS:
        v = _int(values.get(f"model.{k}"), f"model.{k}")
        if v is not None and v != reference.get(k, old[f"model.{k}"] if preset == old["model.preset"] else None):
            put(f"model.{k}", v)
    if any(o.startswith("model.n_heads=") for o in out):
        heads = _int(values["model.n_heads"], "model.n_heads")
        kv = base.model.n_kv_heads or PRESETS.get(preset, {}).get("n_kv_heads") or heads
        if heads % kv:  # the preset's grouped-query heads no longer divide: one kv head per head
            put("model.n_kv_heads", heads)
    if preset == CUSTOM:
        seq = _int(values.get("pretrain.seq_len"), "pretrain.seq_len") or base.pretrain.seq_len
        if base.model.max_seq_len is None or base.model.max_seq_len < seq:
            put("model.max_seq_len", max(seq, PRESETS.get(old["model.preset"], {}).get("max_seq_len", seq)))
    for key, cast in (("tokenizer.vocab_size", _int), ("pretrain.seq_len", _int), ("pretrain.batch_size", _int),
                      ("pretrain.lr", _float)):
        v = cast(values.get(key), key)
        if v is not None and v != old[key]:
            put(key, v)
    for key in ("pretrain.max_steps", "pretrain.time_budget_min"):
        v = _float(values.get(key), key)
        v = None if not v else (int(v) if key.endswith("max_steps") else v)
        if v != (old[key] or None):
            put(key, v)
    for key in ("data.sources", "sft.data"):
        text = values.get(key)
        if text is not None and text.strip() != old[key].strip():
            put(key, _yaml_sources(text, key))
    # phase 2
    base = values.get("sft.base_model")
    if base is not None and base != old["sft.base_model"]:
        put("sft.base_model", None if base in ("", FROM_PHASE1) else base)
    lr = _float(values.get("sft.train.lr"), "sft.train.lr")
    if lr is not None and lr != old["sft.train.lr"]:
        put("sft.train.lr", lr)
    for key, cast in (("sft.train.max_epochs", _float), ("sft.lora.rank", _int)):  # 0: none / by model size
        v = cast(values.get(key), key) or None
        if key in values and v != (old[key] or None):
            put(key, v)
    lora = values.get("sft.lora.enabled")
    if lora is not None and bool(lora) != old["sft.lora.enabled"]:
        put("sft.lora.enabled", bool(lora))
    # phase 3
    on = values.get("prefs.enabled")
    if on is not None and bool(on) != old["prefs.enabled"]:
        put("prefs.enabled", bool(on))
    method = values.get("prefs.method")
    if method and method != old["prefs.method"]:
        put("prefs.method", method)
    beta = _float(values.get("prefs.beta"), "prefs.beta")
    if beta is not None and beta != old["prefs.beta"]:
        put("prefs.beta", beta)
    steps = _int(values.get("prefs.train.max_steps"), "prefs.train.max_steps")
    if "prefs.train.max_steps" in values and (steps or None) != (old["prefs.train.max_steps"] or None):
        put("prefs.train.max_steps", steps or None)
    return out


def _yaml_sources(text: str, key: str) -> list:
    try:
        sources = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{key}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(sources, list) or not sources:
        raise UserError(f"{key}: expected a YAML list of sources, e.g. '- type: bible'")
    return sources


def _int(v, key):
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise UserError(f"{key}: expected a whole number, got {v!r}") from None
    if f != int(f):
        raise UserError(f"{key}: expected a whole number, got {v!r}")
    return int(f)


def _float(v, key):
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UserError(f"{key}: expected a number, got {v!r}") from None


def config_data(base_file: str | Path, overrides: list[str], project_dir: str | Path | None = None) -> dict:
    """The base file's data (its local paths absolute) with the form's overrides on top; paths the form gives are
    relative to the project (where the file browser and uploads put them)."""
    root = Path(project_dir) if project_dir is not None else Path(base_file).resolve().parent
    return absolute_paths(apply_overrides(read_config_data(base_file), overrides), root)


def validated(base_file: str | Path, overrides: list[str], project_dir: str | Path | None = None) -> Config:
    """The config the form describes, validated as `--config base_file --set ...` would be, and the model it
    describes checked as 03_pretrain will check it."""
    try:
        cfg = from_dict(config_data(base_file, overrides, project_dir), base_dir=str(Path(base_file).resolve().parent))
        model_args(cfg.model, cfg.tokenizer.vocab_size)  # the model's own rules (heads divide dim, ...), before a launch
        return cfg
    except UserError as e:
        raise UserError(f"{base_file} + the form: {e}") from None


def config_name(name: str) -> str:
    """The file name a saved config gets: what the user typed (a trailing .yaml dropped), checked by the one name
    rule (lib.names): refused with the rule, never silently changed."""
    text = (name or "").strip()
    return check_name(text[:-5] if text.lower().endswith(".yaml") else text, "config name")


def save_config(project_dir: str | Path, name: str, base_file: str | Path, overrides: list[str]) -> Path:
    """Write config/studio/<name>.yaml: the base file with the overrides applied, after validating it. Returns the
    path relative to the project dir."""
    validated(base_file, overrides, project_dir)
    rel = SAVE_DIR / f"{config_name(name)}.yaml"
    here = (Path(project_dir) / rel).resolve().parent

    def relative(p):  # local paths inside the project are written relative to the saved file: it moves with it
        q = Path(p) if isinstance(p, str) and p else None
        if q is None or not q.is_absolute() or not q.resolve().is_relative_to(Path(project_dir).resolve()):
            return p
        return os.path.relpath(q.resolve(), here)

    data = map_paths(config_data(base_file, overrides, project_dir), relative)
    header = (f"# Saved by the studio from {base_file}" + (f" with {', '.join(overrides)}" if overrides else "")
              + f".\n# Run it: snakemake --cores all --configfile {rel}\n")
    atomic_write_text(Path(project_dir) / rel, header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return rel


def estimate(cfg: Config, hardware: dict | None = None) -> dict:
    """Parameters of the model the config describes (exact: built on the meta device) and memory to pretrain and
    to serve it, by 05_check's formulas at the config's batch and sequence length."""
    import torch


    args = model_args(cfg.model, cfg.tokenizer.vocab_size)
    with torch.device("meta"):
        model = HomeLLM(args)
    P = model.num_params()
    d = args.dims()
    hw = hardware or probe_hardware()
    t = cfg.pretrain
    act = activation_dtype(training_precision(t.precision, "cuda" if hw["gpus"] else "cpu", hw)[0])
    train = estimate_training(P, d, CheckConfig(train_batch_size=t.batch_size, train_seq_len=t.seq_len), act,
                              "fp32")["full"]
    infer = estimate_inference(P, d, "fp32", args.max_seq_len, 1, "fp32")
    need = train["total_with_grad_checkpointing" if t.grad_checkpointing else "total"]
    ram = hw["ram"]["total_bytes"]
    return {"parameters": P, "body_parameters": model.num_params(body_only=True), "train_bytes": need,
            "infer_bytes": infer["total"], "activation_dtype": act, "ram_bytes": ram, "fits": need <= ram,
            "flops_per_token": model.estimate_flops_per_token(t.seq_len), **sft_estimate(cfg, P, d, hw)}


def sft_estimate(cfg: Config, P: int, d, hw: dict) -> dict:
    """Memory to instruction-tune (full or LoRA) at sft.train's batch and sequence length: of the phase-1 model
    (P parameters, dims d) or of the model sft.base_model names (05_check reads its config, no weights)."""
    s, lora = cfg.sft.train, cfg.sft.lora
    mode = "lora" if lora.enabled or lora.qlora else "full"
    act = activation_dtype(training_precision(s.precision, "cuda" if hw["gpus"] else "cpu", hw)[0])
    if cfg.sft.base_model is not None:
        report = check_model(cfg.sft.base_model, CheckConfig(train_batch_size=s.batch_size, train_seq_len=s.seq_len),
                             hardware=hw)
        P = report["estimates"]["params"]["total"] or 0
        d = Dims.from_dict(report["estimates"]["dims"])
    rank = lora.rank or lora_defaults(P)[0]
    need = estimate_training(P, d, CheckConfig(train_batch_size=s.batch_size, train_seq_len=s.seq_len,
                                               lora_rank=rank), act, "fp32")[mode]
    # phase 3 trains on pairs (2 rows each) and holds the frozen phase-2 model beside the policy (not under LoRA:
    # there the adapters switched off are the reference)
    p, plora = cfg.prefs.train, cfg.prefs.lora
    pmode = "lora" if plora.enabled else "full"
    pneed = estimate_training(P, d, CheckConfig(train_batch_size=2 * p.batch_size, train_seq_len=p.seq_len,
                                                lora_rank=plora.rank or lora_defaults(P)[0]), act, "fp32")[pmode]
    return {"sft_bytes": need["total_with_grad_checkpointing" if s.grad_checkpointing else "total"],
            "sft_mode": f"LoRA rank {rank}" if mode == "lora" else "full fine-tuning", "sft_params": P,
            "prefs_bytes": pneed["total_with_grad_checkpointing" if p.grad_checkpointing else "total"]
                           + (0 if plora.enabled else 4 * P)}
