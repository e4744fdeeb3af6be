"""Validation: a plain dict (as read from YAML) built into the schema's dataclasses, with every problem collected
and raised as one `UserError` listing them all: wrong types, values out of range, unknown keys (with the closest
valid key suggested), missing required keys, and the rules that involve more than one field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from lib.config.schema import Config
from lib.errors import UserError


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
        for arg in non_none:  # the first that takes it (str | float: "5m" or 300)
            tried: list[str] = []
            converted = _convert(value, arg, key, tried)
            if not tried:
                return converted
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
    for name, t in (("pretrain", cfg.pretrain), ("sft.train", cfg.sft.train), ("prefs.train", cfg.prefs.train)):
        if t.max_steps is None and t.max_tokens is None and t.max_epochs is None and t.time_budget_min is None:
            problems.append(f"{name}: set at least one stop condition (max_steps, max_tokens, max_epochs, time_budget_min)")
        if t.min_lr > t.lr:
            problems.append(f"{name}.min_lr: expected <= {name}.lr ({t.lr}), got {t.min_lr}")
    for i, d in enumerate(cfg.sft.data):
        if d.type == "files" and not d.path:
            problems.append(f"sft.data[{i}].path: required for type 'files'")
        if d.type == "hf" and not d.name:
            problems.append(f"sft.data[{i}].name: required for type 'hf'")
    for i, d in enumerate(cfg.prefs.data):
        if d.type == "files" and not d.path:
            problems.append(f"prefs.data[{i}].path: required for type 'files'")
        if d.type == "hf" and not d.name:
            problems.append(f"prefs.data[{i}].name: required for type 'hf'")
    if cfg.prefs.enabled and not cfg.prefs.data:
        problems.append("prefs.data: expected at least one source (or prefs.enabled: false)")
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


