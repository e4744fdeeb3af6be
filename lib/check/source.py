"""What a model reference points at, read without its weights: a local directory, a .gguf file or a hub repository
(metadata only through the real huggingface_hub client: the file list with sizes, small config files, safetensors
headers), behind one `Source` interface the detectors read."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lib.config import CheckConfig
from lib.errors import UserError
from lib.hub import endpoint, hub_call, hub_token, offline_reason

# a safetensors header longer than this is not one (real ones are kilobytes to a few megabytes)
MAX_HEADER_BYTES = 100 * 2**20
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---------------------------------------------------------------------------------------------------------
# Sources: one interface over a local directory, a GGUF file and a hub repository.


@dataclass
class Source:
    """Where a model lives and how to read its small files. Weights are never read, only headers."""

    ref: str
    kind: str  # "local" | "gguf" | "hub"
    files: dict[str, int]  # relative path -> size in bytes
    root: Path | None = None  # local: the model directory
    gguf_file: Path | None = None  # gguf: the file
    repo_id: str | None = None
    revision: str | None = None  # hub: the commit sha the metadata came from
    # export dirs: GGUF files and an Ollama Modelfile beside the HF model (absolute paths)
    extras: list[str] = field(default_factory=list)
    _api: object | None = None
    _timeout: float = 10.0
    _json: dict = field(default_factory=dict)

    def read_json(self, rel: str) -> dict | None:
        """A small JSON file of the model (None if absent); invalid JSON is a UserError naming the file."""
        if rel not in self.files:
            return None
        if rel not in self._json:
            text = self._read_text(rel)
            try:
                self._json[rel] = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{self.describe(rel)}:{e.lineno}: invalid JSON ({e.msg})") from None
        return self._json[rel]

    def _read_text(self, rel: str) -> str:
        if self.kind == "hub":
            path = hub_call(lambda: self._api.hf_hub_download(self.repo_id, rel, revision=self.revision,
                                                                etag_timeout=self._timeout), self.repo_id)
            return Path(path).read_text(encoding="utf-8")
        return (self.root / rel).read_text(encoding="utf-8")

    def describe(self, rel: str = "") -> str:
        if self.kind == "hub":
            return f"{self.repo_id}@{(self.revision or 'main')[:12]}/{rel}".rstrip("/")
        base = self.gguf_file if self.kind == "gguf" else self.root
        return str(base / rel) if rel else str(base)

    def safetensors_headers(self) -> dict[str, dict[str, tuple[str, list[int]]]]:
        """{file: {tensor: (dtype, shape)}} for every .safetensors file, from headers only."""
        names = sorted(f for f in self.files if f.endswith(".safetensors"))
        if not names:
            return {}
        if self.kind == "hub":
            return _hub_safetensors(self, names)
        return {n: read_safetensors_header(self.root / n) for n in names}

    def fingerprint(self) -> str:
        """Changes when the model changes (used by install to decide whether a saved check is stale)."""
        if self.kind == "hub":
            return f"hub:{self.repo_id}@{self.revision}"
        h = hashlib.sha256()
        base = self.gguf_file if self.kind == "gguf" else self.root
        for rel in sorted(self.files):
            st = (base if self.kind == "gguf" else base / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return f"{self.kind}:{h.hexdigest()[:16]}"


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """The tensor table of a .safetensors file: an 8-byte little-endian length, then that much JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return {k: (v["dtype"], list(v["shape"])) for k, v in header.items()}


def _list_local(root: Path) -> dict[str, int]:
    """Files under a model dir (hidden files/dirs such as .git and .cache are skipped), at most 3 levels deep."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__" and depth < 3)
        for name in filenames:
            if not name.startswith("."):
                p = Path(dirpath) / name
                out[str(p.relative_to(root))] = p.stat().st_size
    return out


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


MODEL_MARKERS = ("config.json", "model_index.json", "params.json", "model_config.yaml", "adapter_config.json")


def find_model_root(path: Path) -> tuple[Path | None, Path | None, list[str]]:
    """(HF model dir, GGUF file, extras) inside a directory.

    A model directory has a config file at its top. An export directory may instead hold the HF model in
    one sub-directory, with GGUF files and an Ollama Modelfile beside it: those become `extras`.
    """
    extras = sorted(str(p) for p in path.iterdir() if p.is_file() and (p.suffix == ".gguf" or p.name == "Modelfile"))
    if any((path / m).is_file() for m in MODEL_MARKERS):
        return path, None, extras
    subdirs = [d for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")
               and any((d / m).is_file() for m in ("config.json", "model_index.json"))]
    if len(subdirs) > 1:  # several candidates: prefer the conventional names
        subdirs = [d for d in subdirs if d.name in ("hf", "model", "hf_model")] or subdirs
    if len(subdirs) == 1:
        return subdirs[0], None, extras
    ggufs = [Path(e) for e in extras if e.endswith(".gguf")]
    if len(ggufs) >= 1:  # a folder holding only GGUF files: the largest is the model (others are often mmproj)
        return None, max(ggufs, key=lambda p: p.stat().st_size), extras
    return None, None, extras


def open_source(ref: str, cfg: CheckConfig | None = None) -> Source:
    """Resolve a model reference to a Source, or a UserError saying what was expected."""
    cfg = cfg or CheckConfig()
    path = Path(str(ref)).expanduser()
    if path.is_file():
        if not _is_gguf(path):
            raise UserError(f"{path}: a model is a directory (Hugging Face format) or a .gguf file; this file is "
                            "neither (no 'GGUF' magic bytes)")
        path = path.resolve()
        return Source(ref=str(ref), kind="gguf", files={path.name: path.stat().st_size}, gguf_file=path)
    if path.is_dir():
        path = path.resolve()
        root, gguf_file, extras = find_model_root(path)
        if root is not None:
            return Source(ref=str(ref), kind="local", files=_list_local(root), root=root, extras=extras)
        if gguf_file is not None:
            return Source(ref=str(ref), kind="gguf", files={gguf_file.name: gguf_file.stat().st_size},
                          gguf_file=gguf_file, extras=[e for e in extras if e != str(gguf_file)])
        present = sorted(p.name for p in path.iterdir())[:12]
        raise UserError(f"{path}: no config files: expected config.json (transformers), model_index.json "
                        f"(diffusers) or a .gguf file; the directory holds: {', '.join(present) or 'nothing'}")
    if HUB_ID.match(str(ref)) and not str(ref).startswith((".", "/", "~")):
        return open_hub(str(ref), cfg)
    raise UserError(f"{ref}: model not found: no such file or directory, and not a Hugging Face hub id "
                    "(expected a local model directory, a .gguf file or owner/name)")


# ---------------------------------------------------------------------------------------------------------
# The hub: metadata only. The real huggingface_hub client; HF_ENDPOINT (read at call time) may point it at a
# mirror, which is also how the tests serve recorded responses from a local server.


def open_hub(repo_id: str, cfg: CheckConfig) -> Source:
    if offline_reason():
        raise UserError(f"{repo_id}: the hub is in offline mode (HF_HUB_OFFLINE=1): unset it to check a hub id, "
                        "or check a local copy of the model instead")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint(), token=hub_token(cfg))
    info = hub_call(lambda: api.model_info(repo_id, revision=cfg.revision, files_metadata=True,
                                            timeout=cfg.hub_timeout_s), repo_id)
    files = {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}
    return Source(ref=repo_id, kind="hub", files=files, repo_id=repo_id, revision=info.sha or cfg.revision,
                  _api=api, _timeout=cfg.hub_timeout_s)


def _hub_safetensors(src: Source, names: list[str]) -> dict:
    api = src._api
    out = {}
    root_names = [n for n in names if "/" not in n]
    if root_names and ("model.safetensors" in src.files or "model.safetensors.index.json" in src.files):
        meta = hub_call(lambda: api.get_safetensors_metadata(src.repo_id, revision=src.revision,
                                                              timeout=src._timeout), src.repo_id)
        for fname, fm in meta.files_metadata.items():
            out[fname] = {k: (t.dtype, list(t.shape)) for k, t in fm.tensors.items()}
    for n in names:  # other files (diffusers components in sub-folders, unusual names): header by header
        if n not in out:
            fm = hub_call(lambda n=n: api.parse_safetensors_file_metadata(src.repo_id, n, revision=src.revision,
                                                                       timeout=src._timeout), src.repo_id)
            out[n] = {k: (t.dtype, list(t.shape)) for k, t in fm.tensors.items()}
    return out
