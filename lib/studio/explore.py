"""The studio's data explorer: what a corpus artifact holds and what the SFT stage trains on.

    corpus_overview(Path("artifacts/01_data/ab12cd34ef56"))   # per source, removed by reason, lengths, bytes/token
    random_documents(Path("artifacts/01_data/ab12cd34ef56"), "val", k=3, seed=0)
    sft_preview(cfg, k=3, seed=0)   # format per source; examples rendered with the chat template, trained tokens marked

Reads only: stats.json and the shards of a 01_data directory, the meta.json of the 02_tokens directories built from
it, and for SFT the config's data sources through the SFT stage's own loader and encoder (lib.data.sft_data, lib.train.sft),
so what is highlighted is exactly what the loss mask trains.
"""

from __future__ import annotations

import html
import itertools
import json
import random
import shutil
from pathlib import Path

import numpy as np

from lib.artifacts import MANIFEST, is_complete, read_json
from lib.atomic import atomic_file
from lib.chat import prepare_tokenizer
from lib.config import Config
from lib.data.loaders import packaged_file
from lib.data.records import FILE_FORMATS, file_format, resolve_files
from lib.data.sft_data import detect_format, load_sft_examples, read_file_records
from lib.data.tokenizer import load_tokenizer
from lib.errors import UserError
from lib.fingerprint import sha256_file
from lib.names import name_from
from lib.stages import stage_dir
from lib.train.sft_batches import encode_conversations, encode_text, fit_length


def corpus_overview(data_dir: Path) -> dict:
    """Documents and characters per source, removed by reason, the length histogram and the tokenizers' bytes per
    token (from every 02_tokens directory encoded from this corpus)."""
    if not is_complete(data_dir):
        raise UserError(f"{data_dir}: not a complete 01_data directory (no {MANIFEST})")
    stats = read_json(data_dir / "stats.json")
    sources = [{"source": s["label"], "read": s["read"], "kept": s["kept"], "chars": s.get("kept_chars"),
                **{k: s.get(k, 0) for k in ("exact_dup", "near_dup", "empty", "too_short", "too_long",
                                             "skipped_bad_records")}} for s in stats.get("sources", [])]
    tokens = []
    root = data_dir.parent.parent / "02_tokens"
    for meta_file in sorted(root.glob("*/meta.json")) if root.is_dir() else []:
        meta = read_json(meta_file)
        if meta.get("data_hash") == data_dir.name and is_complete(meta_file.parent):
            tokens.append({"tokens_dir": meta_file.parent.name, "tokenizer": meta.get("tokenizer_hash"),
                           "vocab_size": meta.get("vocab_size"), "val_bytes_per_token": meta.get("val_bytes_per_token"),
                           "train_tokens": meta.get("splits", {}).get("train", {}).get("n_tokens")})
    return {"documents": stats.get("documents"), "chars": stats.get("chars"), "splits": stats.get("splits", {}),
            "sources": sources, "removed": stats.get("removed", {}),
            "histogram": stats.get("length_histogram_chars", {}), "tokenizers": tokens}


def random_documents(data_dir: Path, split: str, k: int = 3, seed: int | None = None, max_chars: int = 1200) -> list[str]:
    """k documents picked at random from a split's shards (seeking to random offsets: shards can be large)."""
    shards = sorted(data_dir.glob(f"{split}-*.jsonl"))
    sizes = [p.stat().st_size for p in shards]
    if not shards or not sum(sizes):
        return []
    rng = random.Random(seed)
    out = []
    for _ in range(k * 3):
        if len(out) >= k:
            break
        shard = rng.choices(shards, weights=sizes)[0]
        with open(shard, "rb") as f:
            f.seek(rng.randrange(shard.stat().st_size))
            f.readline()  # the rest of the line we landed in
            line = f.readline() or (f.seek(0) or f.readline())
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError):
            continue
        out.append(text if len(text) <= max_chars else text[:max_chars] + " …")
    return out


def _tokenizer_for(cfg: Config, project: Path):
    d = project / stage_dir(cfg, "02_tokenizer")
    if is_complete(d):
        return load_tokenizer(d)
    if cfg.sft.base_model:
        return load_tokenizer(Path(cfg.sft.base_model)) if Path(cfg.sft.base_model).is_dir() else None
    return None


def loss_mask(mask) -> np.ndarray:
    """Which tokens of a row the loss is computed on: the row's mask, except its first token, which is only ever
    an input (the targets are the row shifted by one, as SftBatches and encode_examples count them)."""
    out = np.asarray(mask, dtype=bool).copy()
    out[:1] = False
    return out


def highlight(tokenizer, ids, mask) -> str:
    """HTML of the tokens, the trained ones (mask) marked: <mark> around each run of trained tokens."""
    pieces, run, trained = [], [], None
    decode = tokenizer.decode

    def flush():
        if run:
            text = html.escape(decode(run, skip_special_tokens=False))
            pieces.append(f'<mark class="trained">{text}</mark>' if trained else f"<span>{text}</span>")

    for tid, m in zip(list(map(int, ids)), list(map(bool, mask))):
        if m != trained:
            flush()
            run, trained = [], m
        run.append(tid)
    flush()
    return "".join(pieces)


def sft_preview(cfg: Config, k: int = 3, seed: int | None = 0, project_dir: str | Path = ".") -> dict:
    """The SFT data as the SFT stage sees it: each source's detected format and record counts, and k examples
    rendered with the chat template with the trained (assistant) tokens marked, cut to sft.train.seq_len as in
    training."""
    examples, sources = load_sft_examples(cfg.sft, cfg.base_dir)
    tokenizer = _tokenizer_for(cfg, Path(project_dir))
    if tokenizer is None:
        raise UserError(f"{stage_dir(cfg, '02_tokenizer')}: no tokenizer yet for this config; run the pipeline up to "
                        f"the tokenizer (snakemake tokenizer) to see the examples tokenized")
    prepare_tokenizer(tokenizer, "the studio's SFT preview")
    picked = random.Random(seed).sample(examples, min(k, len(examples)))
    max_len = cfg.sft.train.seq_len + 1
    rendered = []
    for ex in picked:
        enc = (encode_conversations(tokenizer, [ex.messages], max_len)[0] if ex.messages is not None
               else encode_text(tokenizer, [ex.text], max_len)[0])
        fitted, cut = fit_length(enc, max_len) if ex.messages is not None else (enc, len(enc.ids) >= max_len)
        if fitted is None:  # training never sees it: nothing of it is marked
            rendered.append({"where": ex.where, "html": highlight(tokenizer, enc.ids, np.zeros(len(enc.ids), bool)),
                             "tokens": len(enc.ids), "trained": 0,
                             "note": f"dropped: no assistant turn fits in {cfg.sft.train.seq_len} tokens"})
            continue
        trained = loss_mask(fitted.mask)
        rendered.append({"where": ex.where, "html": highlight(tokenizer, fitted.ids, trained),
                         "tokens": len(fitted.ids), "trained": int(trained.sum()),
                         "note": f"cut to {cfg.sft.train.seq_len} tokens" if cut else ""})
    return {"sources": sources, "examples": rendered, "count": len(examples)}


# ---------------------------------------------------------------------------------------------------------
# The Train tab's data-source form: files in the project, uploads, a preview of a source's first records.

DATA_DIR = "data"  # uploads land in <project>/data/; the file picker lists what is there


def project_path(project: Path, path: str, what: str) -> Path:
    """A path the form names, inside the project (relative to it); anything outside is refused."""
    p = (project / path).resolve()
    if not p.is_relative_to(project.resolve()):
        raise UserError(f"{what} {path!r}: pick a file or folder inside the project ({project})")
    return p


def data_files(project: Path) -> list[str]:
    """Files and folders under <project>/data that a source can read, as project-relative paths."""
    root = project / DATA_DIR
    if not root.is_dir():
        return []
    found = [p for p in sorted(root.rglob("*")) if not any(s.startswith(".") for s in p.relative_to(root).parts)]
    return [str(p.relative_to(project)) for p in found if p.is_dir() or file_format(p) is not None]


def store_upload(project: Path, uploaded: str | Path) -> str:
    """Copy an uploaded file into <project>/data/ under a safe name (the one name rule, extension kept); returns its
    project-relative path. An existing different file of that name is never replaced: a number is added."""
    src = Path(uploaded)
    if file_format(src) is None:
        raise UserError(f"{src.name}: not a data file this project reads; expected one of {', '.join(FILE_FORMATS)} "
                        "(optionally .gz)")
    suffix = "".join(src.suffixes[-2:]) if src.name.endswith(".gz") else src.suffix
    stem = name_from(src.name[:-len(suffix)] if suffix else src.name, fallback="upload")
    dest = project / DATA_DIR / f"{stem}{suffix}"
    n = 1
    while dest.exists() and sha256_file(dest) != sha256_file(src):
        n += 1
        dest = project / DATA_DIR / f"{stem}-{n}{suffix}"
    if not dest.exists():
        with atomic_file(dest) as tmp:
            shutil.copyfile(src, tmp)
    return str(dest.relative_to(project))


def source_preview(project: Path, kind: str, path: str | None, text_field: str = "text", k: int = 3) -> dict:
    """The first records of a source as its readers see them, and the SFT format they look like (lib.data.sft_data's
    detector, the one the SFT stage uses): {"format", "records": [text...], "files"}."""
    if kind in ("bible", "chitchat"):
        files = [packaged_file(kind, "source")]
    elif kind == "files":
        if not path:
            raise UserError("source path: pick a file or folder (or upload one into data/)")
        files = resolve_files(str(project_path(project, path, "source path")), str(project), "source path")
    else:
        raise UserError(f"source type {kind!r}: the preview reads local files and the bible/chitchat packages "
                        "(a hub dataset is read when the pipeline runs)")
    records, fmt = [], None
    for where, rec in itertools.islice((r for f in files for r in read_file_records(f)), k):
        fmt = fmt or detect_format(rec)
        text = rec.get(text_field) if isinstance(rec, dict) and text_field in rec else json.dumps(rec, ensure_ascii=False)
        path, sep, rest = where.partition(":")  # "<file>:<line> ...": the file by its name, not where it lives
        records.append({"where": Path(path).name + sep + rest, "text": str(text)[:300]})
    return {"format": fmt, "records": records, "files": len(files)}
