"""Atomic writes: a file or a whole folder is built under a temp name beside its place and renamed into it, so a
reader (or a rerun after a crash, Ctrl+C or kill -9) sees the old version or the new one, never half of one. The
one temp-file-and-rename of the project: JSON, safetensors, GGUF, plots, bundles, the fingerprint cache; and the one
folder publish: stage outputs, checkpoints, installs, runtime environments, converted models.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """A temp path beside `path` for any writer that wants a file name (safetensors, GGUF, matplotlib, tar). When
    the block ends without an error it is fsync'd, given the mode an ordinary open() would give it (0666 less the
    umask, not mkstemp's private 0600) and renamed over `path`; otherwise it is removed. Readers never see a
    half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | Path, tag: str = "tmp", keep_old: bool = False, mode: int = 0o777):
    """A temp directory beside `final` to build a whole folder in; when the block ends without an error the folder
    gets an ordinary mode (`mode` less the umask, not mkdtemp's 0700) and is renamed into place, so readers see the
    whole folder or none of it; otherwise it is removed. What sits at `final` already is removed first (an incomplete
    leftover), or with keep_old moved aside and removed only once the new folder is in place, so a failure between
    the two renames cannot lose both. Yields the temp path. The one way a folder is published: stage outputs,
    checkpoints, installs, runtime environments and converted models."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{tag}-{os.getpid()}-"))
    try:
        yield tmp
        os.chmod(tmp, mode & ~current_umask())
        old = None
        if final.exists() or final.is_symlink():
            if keep_old:
                old = final.parent / f".{final.name}.old-{os.getpid()}-{int(time.time())}"
                os.replace(final, old)
            else:
                shutil.rmtree(final)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
