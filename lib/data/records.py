"""The one reader of local data files, for the corpus (stage 01) and the SFT data (stage 04): .txt .jsonl .json .csv
.parquet, each optionally .gz. Everything streams: no reader holds more than one record (or one parquet batch) in
memory, whatever the file size. Each yields (where, record) pieces; what a record means (a text field, a chat
format) is the caller's business.

    bad = BadRecords("error")                    # or "skip": count bad records instead of stopping
    for lineno, rec in jsonl_records(path, bad): ...
    for lineno, key, rec in json_records(path, bad): ...    # a top-level array (key None) or object
    for lineno, row in csv_rows(path, bad, required="text"): ...
    for row_no, row in parquet_rows(path, bad, text_column="text"): ...
    for lineno, doc in txt_documents(path, bad, "paragraph", max_chars): ...

A bad record (invalid UTF-8 or JSON, a broken CSV row, ...) goes to `bad`, which raises one paragraph naming
file:line or counts it; a broken file structure (JSON syntax, a missing column, a corrupt gzip) always raises.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import gzip
import json
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lib.errors import UserError

FILE_FORMATS = (".txt", ".jsonl", ".json", ".csv", ".parquet")
# yielded instead of a paragraph that grew far beyond data.max_chars (its text is not kept in memory)
OVERSIZED = object()
_SNIFF_BYTES = 8192  # NUL bytes in the first 8 KiB mark a binary file (as git and grep decide)
_MAX_JSON_RECORD_CHARS = 256 << 20  # a .json record this large means a broken file, not a record


class BadRecords:
    """What to do with a bad record: raise a UserError naming where it is ("error"), or count it ("skip").
    `option`: the config key that chooses skipping, named in the error (None: there is none, e.g. SFT data)."""

    def __init__(self, policy: str, option: str | None = "data.on_bad_record"):
        self.policy, self.option = policy, option
        self.count = 0

    def __call__(self, where: str, what: str) -> None:
        if self.policy == "skip":
            self.count += 1
            return
        hint = (f" Fix the input, or set {self.option}: skip to count such records in stats.json and leave them out."
                if self.option else " Fix the input.")
        raise UserError(f"{where}: {what}.{hint}")


# ---------------------------------------------------------------------------------------------------------
# Finding files.


def file_format(path: Path) -> str | None:
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
        files = sorted(f for f in p.rglob("*") if f.is_file() and file_format(f))
        if not files:
            raise UserError(f"{key}: the directory {p} holds no {supported} file")
    elif p.is_file():
        files = [p]
    else:
        raise UserError(f"{key}: no such file or directory: {p} (relative paths resolve against the config file's "
                        "directory)")
    unknown = [str(f) for f in files if not file_format(f)]
    if unknown:
        raise UserError(f"{key}: unsupported file type: {', '.join(unknown[:5])}; expected {supported}")
    return files


# ---------------------------------------------------------------------------------------------------------
# Opening files: gzip, empty and binary files.


@contextlib.contextmanager
def _io_errors(path: Path):
    """I/O errors while reading (a truncated gzip stream, a disk error) -> a UserError naming the file."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read the file ({e}); it may be truncated or corrupt") from None


def open_binary(path: Path, bad: BadRecords) -> IO[bytes] | None:
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
        problem = "empty file (nothing in it); expected at least one record"
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


def json_records(path: Path, bad: BadRecords) -> Iterator[tuple[int, str | None, object]]:
    """(line, key, value) for each element of a top-level JSON array (key None), or each item of a top-level object.

    Streams: the file is decoded in 1 MiB chunks and records are parsed one by one with `raw_decode`, so a
    large .json file does not have to fit in memory. A syntax error stops the file with the line where the
    parser found it, even with on_bad_record: skip (there is no way to resynchronise inside JSON).
    """
    f = open_binary(path, bad)
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
            key = None
            if opening == "{":
                skip_ws()
                key = value()
                if not isinstance(key, str):
                    raise UserError(f"{where(pos)}: invalid JSON: expected a string key")
                expect(":", "':'")
            skip_ws()
            lineno = line0 + buf.count("\n", 0, pos)
            yield lineno, key, value()
            if expect("," + closing, f"',' or '{closing}'") == closing:
                break
        if skip_ws():
            raise UserError(f"{where(pos)}: invalid JSON: extra data after the top-level value")


# ---------------------------------------------------------------------------------------------------------
# Record readers.


def txt_documents(path: Path, bad: BadRecords, mode: str = "paragraph", max_chars: int = 100_000
                  ) -> Iterator[tuple[int, Any]]:
    """(first line, text) per document: each non-blank line (mode "line") or each blank-line separated paragraph.
    A paragraph far beyond max_chars is yielded as OVERSIZED instead of being held in memory."""
    f = open_binary(path, bad)
    if f is None:
        return
    with f, _io_errors(path):
        if mode == "line":
            for lineno, line in _decoded_lines(path, f, bad):
                if not line.isspace():
                    yield lineno, line
            return
        cap = 4 * max_chars + 4096
        buf, size, start = [], 0, 1
        for lineno, line in _decoded_lines(path, f, bad):
            if line.isspace():
                if buf or size:
                    yield start, "".join(buf) if size <= cap else OVERSIZED
                buf, size = [], 0
                continue
            if not buf and not size:
                start = lineno
            size += len(line)
            if size <= cap:
                buf.append(line)
            else:
                buf = []
        if buf or size:
            yield start, "".join(buf) if size <= cap else OVERSIZED


_JSON = json.JSONDecoder()


def jsonl_records(path: Path, bad: BadRecords) -> Iterator[tuple[int, Any]]:
    """(line, record) for each line holding one JSON value; blank lines are allowed."""
    f = open_binary(path, bad)
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
                        yield lineno, rec
                        continue
                hint = " - the line looks truncated" if not raw.endswith(b"\n") else ""
                bad(f"{path}:{lineno}", f"invalid JSON: {e.msg} (column {e.colno}){hint}; expected one JSON value "
                    "(an object) per line")
                continue
            yield lineno, rec


def csv_rows(path: Path, bad: BadRecords, required: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line, {column: value}) per row of a CSV file with a header row; quoted fields may span lines. `required`:
    a column that must be in the header (a file-level error) and in every row (a bad record)."""
    f = open_binary(path, bad)
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
        if required is not None and required not in header:
            raise UserError(f"{path}:1: no column {required!r} in the CSV header (columns: "
                            f"{', '.join(header) or 'none'}); set text_field in the source config")
        col = header.index(required) if required is not None else -1
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
                bad(f"{path}:{reader.line_num}", f"the row has {len(row)} fields, no {required!r} column "
                    f"(the header has {len(header)})")
                continue
            yield reader.line_num, dict(zip(header, row))


def parquet_rows(path: Path, bad: BadRecords, text_column: str | None = None) -> Iterator[tuple[int, dict]]:
    """(row number, {column: value}) per row, streamed one batch at a time. `text_column`: only that column, which
    must exist and hold strings (a null is a bad record)."""
    import pyarrow as pa  # a large import that only parquet files need
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
        columns = None
        if text_column is not None:
            if text_column not in names:
                raise UserError(f"{path}: no column {text_column!r} (columns: {', '.join(names)}); set text_field in "
                                "the source config")
            tp = pf.schema_arrow.field(text_column).type
            if not (pa.types.is_string(tp) or pa.types.is_large_string(tp) or pa.types.is_string_view(tp)):
                raise UserError(f"{path}: the column {text_column!r} has type {tp}; expected a string column")
            columns = [text_column]
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=4096, columns=columns):
                for rec in batch.to_pylist():
                    row += 1
                    if text_column is not None and rec[text_column] is None:
                        bad(f"{path}: row {row}", f"the text field {text_column!r} is null; expected a string")
                        continue
                    yield row, rec
        except pa.ArrowException as e:
            raise UserError(f"{path}: row {row + 1}: cannot read the parquet data ({e})") from None
    finally:
        if tmp is not None:
            tmp.close()
