"""A GGUF file's header read without its tensors: architecture, hyper-parameters, tokenizer and tensor table."""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

from lib.errors import UserError

# ---------------------------------------------------------------------------------------------------------
# GGUF metadata.


# GGUF value types (the format's spec): scalar struct codes by type id; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAGIC = b"GGUF"


class _Header:
    """The key/value section and tensor table of a little-endian GGUF file, parsed straight from its bytes. Arrays of
    strings (the vocabulary, the merges: hundreds of thousands of entries) are skipped and only counted, which
    gguf-py's GGUFReader cannot do: it builds a numpy view per element (13 s for Gemma 3's 262k tokens on a 2-core
    CPU, against 0.2 s here)."""

    def __init__(self, path: Path):
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            self.buf = m
            if m[:4] != _MAGIC:
                raise ValueError("GGUF magic invalid")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (byte order or version not read here)")
            self.pos, self.fields, self.string_arrays = 24, {}, {}
            for _ in range(n_kv):
                key = self._string()
                (vtype,) = self._take("<I")
                self.fields[key] = self._value(vtype, key)
            self.tensors = []
            for _ in range(n_tensors):
                name = self._string()
                (n_dims,) = self._take("<I")
                dims = list(self._take(f"<{n_dims}Q"))
                ggml_type, _offset = self._take("<IQ")
                self.tensors.append((name, dims, ggml_type))
            self.buf = None

    def _take(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = self._take("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def _value(self, vtype: int, key: str):
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALARS:
            return self._take("<" + _SCALARS[vtype])[0]
        if vtype != _ARRAY:
            raise ValueError(f"{key}: unknown value type {vtype}")
        etype, count = self._take("<IQ")
        if etype == _STRING:  # skipped: only their number is kept
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", self.buf, self.pos)
                self.pos += 8 + n
            self.string_arrays[key] = count
            return None
        if etype not in _SCALARS:
            raise ValueError(f"{key}: arrays of type {etype} are not read here")
        return list(self._take(f"<{count}{_SCALARS[etype]}"))


def read_gguf(path: Path) -> dict:
    """Architecture, hyper-parameters, chat template and tensor table of a GGUF file (tensor data untouched)."""
    import gguf

    try:
        header = _Header(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    except struct.error as e:  # a file cut short inside its header
        raise UserError(f"{path}: not a readable GGUF file (its header ends early: {e})") from None

    def val(key, default=None):
        v = header.fields.get(key)
        return default if v is None else v

    arch = val("general.architecture", "unknown")
    tensors = []
    for name, dims, ggml_type in header.tensors:
        n_elements = math.prod(dims)
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        tensors.append((name, dims, gguf.GGMLQuantizationType(ggml_type).name, n_elements,
                        n_elements * type_size // block))
    try:
        file_type = gguf.LlamaFileType(val("general.file_type")).name.replace("MOSTLY_", "")
    except (ValueError, TypeError):
        file_type = None
    return {
        "architecture": arch, "name": val("general.name"), "file_type": file_type,
        "context_length": val(f"{arch}.context_length"), "hidden": val(f"{arch}.embedding_length"),
        "layers": val(f"{arch}.block_count"), "heads": val(f"{arch}.attention.head_count"),
        "kv_heads": val(f"{arch}.attention.head_count_kv"), "ffn": val(f"{arch}.feed_forward_length"),
        "vocab": val(f"{arch}.vocab_size") or header.string_arrays.get("tokenizer.ggml.tokens"),
        "experts": val(f"{arch}.expert_count"), "experts_used": val(f"{arch}.expert_used_count"),
        "ssm_inner": val(f"{arch}.ssm.inner_size"), "ssm_state": val(f"{arch}.ssm.state_size"),
        "ssm_conv": val(f"{arch}.ssm.conv_kernel"),
        "chat_template": val("tokenizer.chat_template"),
        "tensors": tensors,
    }
