"""Shared test fixtures. Tests run real parts: real files, real Snakemake, real transformers loads."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here; hub paths are tested at the HTTP boundary
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pkg_dir(module: str) -> Path:
    """A package's directory without importing it (some data packages fail on import)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"package {module} is not installed: run the README's test command (it installs requirements-dev.txt)"
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
