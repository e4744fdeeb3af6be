"""Fingerprints for the stage hash: the contents of the local files a stage reads, and the code it runs.

The cache must never lie: a stage's hash (lib.stages.stage_hash) changes whenever something that changes its output
changes. Its config section and upstream hashes are not enough for that:
- a corpus file edited in place keeps its path, so the *contents* of the local files a stage reads are hashed
  (sha256; remembered by path, size and mtime in <artifacts_dir>/.cache/fingerprints.json, so a 1 GB corpus is
  read once, not on every dry run);
- an edited lib module changes what a stage computes, so the code of the stage's script and of every lib module it
  imports (found by reading the imports, function-level ones included) is hashed too: its syntax tree, so a comment,
  a docstring or a reformatting changes nothing. The config package and the stage map are left out: what they give a
  stage is config values, and the stage hash covers exactly the values the stage reads, so a new `serve:` default or
  a new stage in the map reruns nothing that does not read it.

Not here: which files a stage reads and the hash itself (lib.stages).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import glob
import hashlib
import json
from pathlib import Path

from lib import ROOT
from lib.atomic import atomic_file

CACHE = Path(".cache") / "fingerprints.json"


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Cache:
    """sha256 of files by (path, size, mtime_ns), kept in one JSON file; unreadable or missing means empty."""

    def __init__(self, path: Path):
        self.path, self.changed = path, False
        try:
            self.entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.entries = {}

    def digest(self, file: Path) -> str:
        st = file.stat()
        key = str(file.resolve())
        entry = self.entries.get(key)
        if entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            return entry[2]
        digest = sha256_file(file)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        with contextlib.suppress(OSError):  # a read-only artifacts dir only costs speed
            with atomic_file(self.path) as tmp:
                tmp.write_text(json.dumps(self.entries), encoding="utf-8")


def files_of(pattern: str) -> list[Path]:
    """The files a local path names: a file, every file under a directory, or the matches of a glob."""
    p = Path(pattern).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and not any(s.startswith(".") for s in q.parts[-2:]))
    return sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())


def content_fingerprint(patterns: list[str], artifacts_dir: str | Path) -> str | None:
    """One digest of the contents (and relative names) of every file the patterns name; None when they name no
    local file (a hub id, a glob matching nothing: the stage itself reports that)."""
    cache = _Cache(Path(artifacts_dir) / CACHE)
    h = hashlib.sha256()
    found = False
    for pattern in patterns:
        base = Path(pattern).expanduser()
        for f in files_of(pattern):
            found = True
            name = f.relative_to(base) if base.is_dir() else Path(f.name)
            h.update(f"{name}\0{cache.digest(f)}\n".encode())
    cache.save()
    return h.hexdigest()[:16] if found else None


# ---------------------------------------------------------------------------------------------------------
# Code.


def _lib_imports(tree: ast.Module) -> set[str]:
    """The lib modules a source file imports anywhere in it: lib.x for `import lib.x`, `from lib.x import y`,
    `from lib import x` (and lib.x.y for `from lib.x import y` when y is a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "lib" or a.name.startswith("lib."))
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module == "lib"
                                                                    or node.module.startswith("lib.")):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for cand in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None  # a name imported from a module (a function), not a module itself


def _closure(module: str) -> list[Path]:
    """The file of lib `module` and of every lib module it imports, directly or through other lib modules."""
    todo, files = [_module_file(module)], set()
    while todo:
        f = todo.pop()
        if f in files:
            continue
        files.add(f)
        for name in _source_facts(f)[0]:
            if name.startswith(NOT_CODE):
                continue
            parts = name.split(".")  # a package's __init__ runs too
            todo += [m for i in range(1, len(parts) + 1) if (m := _module_file(".".join(parts[:i])))]
    return sorted(files)


# Modules whose contribution to a stage is config values (hashed as values), not computation.
NOT_CODE = ("lib.config", "lib.stages")


@functools.cache
def _source_facts(path: Path) -> tuple[frozenset[str], str]:
    """(the lib modules a file imports, the digest of its code), each file parsed once per process."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imports = frozenset(_lib_imports(tree))
    return imports, hashlib.sha256(code_text(tree).encode()).hexdigest()


def code_text(tree: ast.Module) -> str:
    """What of a source file counts as code: its syntax tree without docstrings (comments and layout never reach
    it). Strips the docstrings of `tree` in place."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


@functools.cache
def code_fingerprint(script: str, module: str) -> str:
    """Digest of the code a stage runs: its `script` (a file at the repo root; its own text only, since a script
    may serve two stages) and the lib `module` that does the work with every lib module it imports."""
    h = hashlib.sha256()
    for f in code_files(script, module):
        h.update(f"{f}\0{_source_facts(ROOT / f)[1]}\n".encode())
    return h.hexdigest()[:16]


def code_files(script: str, module: str) -> list[str]:
    """The files code_fingerprint covers, relative to the repo (for tests and curious users)."""
    return sorted({script, *(str(f.relative_to(ROOT)) for f in _closure(module))})
