"""Names that become file or folder names (install names, export names, saved studio configs): one rule, one error.

A name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..': no path separators,
no hidden files, nothing a shell or a file system reads specially. A name the user types is checked (check_name:
refused with the rule, never silently changed); a name derived from a model reference is made to fit (name_from).
"""

from __future__ import annotations

import re

from lib.errors import UserError

MAX_LEN = 64
NAME_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_LEN - 1}}}$")
RULE = (f"expected 1-{MAX_LEN} letters, digits, '.', '_' or '-', starting with a letter or digit "
        "(no '/', no '..', no spaces)")


def is_valid_name(name) -> bool:
    return isinstance(name, str) and bool(NAME_RE.match(name)) and ".." not in name


def check_name(name, what: str) -> str:
    """`name` as given, or a UserError naming `what` it is for ('install name', 'export.name', ...) and the rule."""
    if not is_valid_name(name):
        raise UserError(f"{what} {name!r}: {RULE}; it becomes a file or folder name")
    return name


def name_from(text: str, fallback: str = "model") -> str:
    """A valid name derived from a model reference: 'owner/name' -> 'owner_name', other characters -> '-'."""
    text = str(text).strip().replace("/", "_").replace("\\", "_")
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    text = re.sub(r"\.{2,}", ".", text).strip(".-_")[:MAX_LEN].rstrip(".-_")
    return text if is_valid_name(text) else fallback


def run_model_name(export_name: str, config_stem: str, install_name: str | None = None) -> str:
    """What a pipeline run's model is called outside the pipeline (its install, and 07_serve's "model" for it):
    install.name, else export.name for the default config and export.name-<config file stem> for any other, so that
    the models of two configs never share a name by accident."""
    if install_name:
        return install_name
    return export_name if config_stem == "default" else name_from(f"{export_name}-{config_stem}")
