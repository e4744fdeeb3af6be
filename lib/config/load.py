"""Loading: YAML files read (a syntax error names file:line), several merged in order as Snakemake merges
--configfile, dotted `--set key=value` overrides and Snakemake's `--config` values applied, then validated.

    cfg = load_config("config/default.yaml", ["tokenizer.vocab_size=4096"])
    cfg.tokenizer.vocab_size           # 4096
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lib.config.schema import Config
from lib.config.validate import from_dict, to_dict
from lib.errors import UserError


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


def map_paths(data: dict, fix) -> dict:
    """A copy of raw config data with fix(value) applied to every value that may be a local path: data sources'
    SFT and preference data's `path`, `sft.base_model`, `tokenizer.pretrained`."""
    data = json.loads(json.dumps(data))
    sft = data.get("sft") or {}
    prefs = data.get("prefs") or {}
    for src in [*((data.get("data") or {}).get("sources") or []), *(sft.get("data") or []),
                *((prefs.get("data") or []) if isinstance(prefs, dict) else [])]:
        if isinstance(src, dict) and "path" in src:
            src["path"] = fix(src["path"])
    if isinstance(sft, dict) and "base_model" in sft:
        sft["base_model"] = fix(sft["base_model"])
    tok = data.get("tokenizer") or {}
    if isinstance(tok, dict) and "pretrained" in tok:
        tok["pretrained"] = fix(tok["pretrained"])
    return data


def absolute_paths(data: dict, base: Path) -> dict:
    """The local paths of raw config data made absolute against `base` (a config file's own directory, before it is
    merged with others: each file's relative paths mean what they meant on their own)."""
    def fix(p):
        if not isinstance(p, str) or not p or Path(p).expanduser().is_absolute():
            return p
        if (base / p).exists() or any(c in p for c in "*?["):  # a local file, folder or glob
            return str(base / p)
        return p  # a hub id or a name, not a local path

    return map_paths(data, fix)


def read_config_data(path: str | Path) -> dict:
    """One config file's raw data with its local paths made absolute (to merge with others or save elsewhere)."""
    path = Path(path)
    return absolute_paths(read_yaml(path), path.resolve().parent)


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
        cfg = from_dict(apply_overrides(data, overrides or []), base_dir=base_dir)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    cfg.files = [str(p) for p in paths]
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=110, allow_unicode=True)


