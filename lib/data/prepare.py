"""Stage 01: raw text sources -> a cleaned, deduplicated corpus split into train/val JSONL shards.

    run_data(cfg)                          # artifacts/01_data/<hash>/ (train-00000.jsonl, val-00000.jsonl, stats.json)
    for text in iter_documents(path, "train"): ...

The pipeline streams: read (lib/data/sources.py) -> clean -> length filters -> exact dedup -> near dedup (MinHash
LSH) -> stable split -> shards. Documents move in batches of a few thousand so the hashing and MinHash work
is done by numpy, not a Python loop per word. The per-document work runs in worker processes
on Linux (see `_Builder`). Memory does not grow with the corpus except for the two dedup indexes, which hold
8-byte hashes only, 11-23 bytes per key in the table (see `U64Set`):

    exact dedup   1 key per document that passed the length filters    ~16 bytes per document
    near dedup    `bands` keys per document (4 for 64 perms at 0.85)     ~64 bytes per document

so 10 million documents need about 0.8 GB of index (1.15 GB at worst, and briefly up to twice the largest
table while it doubles). Nothing in here knows about tokens.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import cache
from json.decoder import scanstring  # the C string decoder of json.loads
from json.encoder import encode_basestring  # the C string encoder json.dumps uses (ensure_ascii=False)
from pathlib import Path

import numpy as np

from lib.artifacts import is_complete, stage_output
from lib.atomic import atomic_write_json
from lib.config import Config, DataConfig
from lib.data.records import OVERSIZED, BadRecords
from lib.data.sources import open_source, source_label
from lib.errors import UserError
from lib.stages import stage_config, stage_dir

STAGE = "01_data"
SPLITS = ("train", "val")
FILTERS = ("empty", "too_short", "too_long", "exact_dup", "near_dup", "skipped_bad_records")
_BATCH_DOCS = 4096
_BATCH_CHARS = 1 << 20  # a batch's MinHash temporaries stay below ~25 MB
_MASK64 = (1 << 64) - 1

# ---------------------------------------------------------------------------------------------------------
# Cleaning.

# Characters that need the slow path: line breaks other than \n, control characters (Cc) other than \t and
# \n, and lone surrogates (JSON can carry them; UTF-8 cannot). Most documents have none, so one search decides.
_SPECIAL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NEWLINES = re.compile(r"\r\n?|[\x0b\x0c\x85\u2028\u2029]")  # every line break becomes \n
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff]")
_EXOTIC_SPACE = re.compile(r"[^\S \n\t]")  # NBSP, ideographic space, ... (only in non-ASCII text)
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


def _collapse_spaces(text: str) -> str:
    """Every run of spaces becomes one space. str.replace halves each run per pass (a run of n spaces needs
    log2(n) passes): 1.6-2.6x faster than re.sub(" {2,}", " ") on the generated corpus's documents."""
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def clean_text(text: str, normalize: str = "NFC") -> str:
    """Unicode-normalise, drop control characters (keeping \\n and \\t), collapse runs of spaces, strip every
    line's end and the whole text, and allow at most one blank line in a row.

    Each rewrite runs only when a cheap test says it has something to do: this is the per-document Python work
    of the stage, and most documents are already clean.
    """
    if text.isprintable():  # one line, no control characters, no exotic spaces: the common case, fast
        if normalize != "none" and not text.isascii():
            text = unicodedata.normalize(normalize, text)
        if text.isprintable():  # (NFKC may make something unprintable; then the general path below)
            return _collapse_spaces(text).strip()
    if _SPECIAL.search(text):
        text = _CONTROL.sub("", _NEWLINES.sub("\n", text))
    if not text.isascii():
        if normalize != "none":
            text = unicodedata.normalize(normalize, text)
        if _EXOTIC_SPACE.search(text):
            text = _EXOTIC_SPACE.sub(" ", text)
    text = _collapse_spaces(text)
    if " \n" in text or "\t\n" in text:
        text = _TRAILING.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


# ---------------------------------------------------------------------------------------------------------
# Hashing helpers. All arithmetic is on uint64 and wraps mod 2**64 on purpose.

_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that spreads every input bit over the whole output."""
    x = x ^ (x >> np.uint64(30))
    x *= _C1
    x ^= x >> np.uint64(27)
    x *= _C2
    x ^= x >> np.uint64(31)
    return x


# _BYTE_MASKS[k]: the low k bytes of a little-endian uint64 (k = 0..8)
_BYTE_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)


def _rand_u64(seed: int, n: int, odd: bool = False) -> np.ndarray:
    x = np.random.default_rng(seed).integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
    return x | np.uint64(1) if odd else x


class U64Set:
    """A set of 64-bit keys in one numpy array (open addressing, linear probing, 0 = empty slot).

    8 bytes per slot at a load between 0.35 and 0.7: 11-23 bytes per key (a Python set of ints takes ~100),
    and while the table doubles, briefly the old keys and the new table together (~2x). Works on whole
    batches; keys must already be well mixed (they are hashes), since the slot is their low bits.
    """

    MAX_LOAD = 0.7

    def __init__(self, capacity: int = 1 << 16):
        self.table = np.zeros(capacity, dtype=np.uint64)
        self.size = 0

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def _insert_unique(self, keys: np.ndarray) -> np.ndarray:
        """Insert distinct keys; True where a key was already present."""
        if self.size + len(keys) > self.MAX_LOAD * len(self.table):
            self._grow(self.size + len(keys))
        table, mask = self.table, np.uint64(len(self.table) - 1)
        present = np.zeros(len(keys), dtype=bool)
        todo = np.arange(len(keys))
        slot = keys & mask
        while len(todo):
            cur = table[slot[todo]]
            hit = cur == keys[todo]
            present[todo[hit]] = True
            empty = cur == 0
            # several keys may race for one empty slot: all write, one of them is there after the write (which
            # one does not matter: membership is the same); the others find the slot taken and probe on
            e_idx = todo[empty]
            table[slot[e_idx]] = keys[e_idx]
            lost = e_idx[table[slot[e_idx]] != keys[e_idx]]
            self.size += len(e_idx) - len(lost)
            busy = np.concatenate([todo[~hit & ~empty], lost])
            slot[busy] = (slot[busy] + np.uint64(1)) & mask
            todo = busy
        return present

    def _grow(self, need: int) -> None:
        cap = len(self.table)
        while need > self.MAX_LOAD * cap:
            cap *= 2
        old = self.table[self.table != 0]
        self.table = None  # freed before the new table is allocated: the peak is old keys + new table
        self.table = np.zeros(cap, dtype=np.uint64)
        self.size = 0
        for i in range(0, len(old), 1 << 16):  # in slices: the probing temporaries stay small
            self._insert_unique(old[i:i + (1 << 16)])

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Add a batch of keys (repeats allowed); True where the key was seen before: in the set already, or
        earlier in this batch. Same answers as adding them one by one."""
        keys = np.where(keys == 0, np.uint64(1), keys)
        uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
        present = self._insert_unique(uniq)
        return present[inv] | (first[inv] != np.arange(len(keys)))


# ---------------------------------------------------------------------------------------------------------
# MinHash over word shingles, vectorised over a batch of documents.


@cache
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives of the LSH S-curve 1-(1-s^r)^b around the
    threshold, both weighted 1/2 (the same criterion as datasketch's MinHashLSH)."""
    s = np.linspace(0.0, 1.0, 1001)
    lo, hi = s <= threshold, s >= threshold
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])  # (K, 2)
    b, r = pairs[:, :1].astype(np.float64), pairs[:, 1:].astype(np.float64)
    p = 1.0 - (1.0 - s[None, :] ** r) ** b  # (K, s): probability that a pair of similarity s becomes a candidate
    err = 0.5 * np.trapezoid(p[:, lo], s[lo], axis=1) + 0.5 * np.trapezoid(1.0 - p[:, hi], s[hi], axis=1)
    best = pairs[int(np.argmin(err))]
    return int(best[0]), int(best[1])


class MinHasher:
    """MinHash signatures of lower-cased word n-gram shingles, computed for many documents at once.

    Words are maximal runs of non-whitespace bytes of the UTF-8 text. A word's hash is sum_j chunk_j * R[j]
    over the 8-byte chunks of its first 64 bytes (R random odd constants) plus its length times R[8],
    computed for all words of the batch at once: no Python loop over words. A shingle's hash combines its n
    word hashes and is mixed (splitmix64); the signatures work on its top 32 bits x (datasketch's values are 32
    bits too): permutation i is x -> a_i * x mod 2**32 with a random odd a_i, a bijection, one multiply per
    shingle and permutation. Half the bytes of 64-bit values, into one reused buffer: stage 01 on a 30 MB corpus
    1.11-1.17 -> 0.82-0.92 s, with the same error against the true Jaccard similarity (200 document pairs at
    J ~0.3 and ~0.66: mean |error| 0.049 -> 0.047 and 0.051 -> 0.048, 60 permutations). tests/test_data.py
    checks the estimates against the truth and datasketch's. A document with fewer than n words is one shingle
    of all its words.

    Why not datasketch itself: even used as advised (MinHash.bulk, an LSH insertion session) it hashes each shingle
    with SHA-1 in Python; bench/bench_data.py measured 260 ms/MB for its signatures with the shingles already made,
    against 16 ms/MB here from raw text (16x; 17x with the LSH index), and its index keeps Python objects per
    document (kilobytes, not bytes).
    """

    def __init__(self, num_perm: int, shingle_words: int, seed: int):
        self.num_perm, self.n = num_perm, shingle_words
        self.a = (_rand_u64(seed, num_perm, odd=True) >> np.uint64(32)).astype(np.uint32) | np.uint32(1)
        self._scratch = None  # (num_perm, 2 * step) products of one block, allocated at the first call
        self.R = _rand_u64(seed + 2, 9, odd=True)  # multipliers of a word's 8-byte chunks, and of its length
        self.Q = _rand_u64(seed + 3, shingle_words, odd=True)  # word multipliers by position in the shingle

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(D, num_perm) uint32 signatures of D texts, each with at least one non-whitespace character."""
        D = len(texts)
        # \x00 never survives cleaning, so it can separate documents in one buffer
        buf = np.frombuffer("\x00".join(texts).lower().encode("utf-8"), dtype=np.uint8)  # (L,)
        is_word = buf > 32  # after cleaning, the only bytes <= 32 are \x00 (our separator), \t, \n and space
        edges = np.diff(is_word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # (W,) each, ends exclusive
        lens = ends - starts  # (W,)
        # word hash: its bytes read 8 at a time (a uint64 view with a stride of one byte: the 8 bytes from any
        # offset), chunk j times R[j], over the first 64 bytes, plus the length times R[8]. Most words fit in
        # the first chunk; later chunks touch only the longer words.
        padded = np.concatenate([buf, np.zeros(8, dtype=np.uint8)])
        at = np.ndarray(shape=(len(buf) + 1,), dtype="<u8", buffer=padded, strides=(1,))  # (L+1,) unaligned
        h = lens.astype(np.uint64) * self.R[8]
        h += (at[starts] & _BYTE_MASKS[np.minimum(lens, 8)]) * self.R[0]
        active = np.flatnonzero(lens > 8)
        for j in range(1, 8):
            if not len(active):
                break
            rest = lens[active] - 8 * j
            h[active] += (at[starts[active] + 8 * j] & _BYTE_MASKS[np.minimum(rest, 8)]) * self.R[j]
            active = active[rest > 8]
        words = _mix64(h)  # (W,)
        doc = np.searchsorted(np.flatnonzero(buf == 0), starts)  # (W,) document of each word: separators before it
        W, n = len(words), self.n
        # shingle starting at word i: sum_k Q[k] * word[i+k] over the words of the same document
        sh = words * self.Q[0]
        for k in range(1, min(n, W)):
            same = doc[: W - k] == doc[k:]
            sh[: W - k] += np.where(same, words[k:] * self.Q[k], np.uint64(0))
        full = np.zeros(W, dtype=bool)
        if W >= n:
            full[: W - n + 1] = doc[: W - n + 1] == doc[n - 1:]
        counts = np.bincount(doc, minlength=D)  # (D,) words per document
        first_word = np.concatenate([[0], np.cumsum(counts)[:-1]])
        full[first_word[counts < n]] = True  # documents with fewer than n words: their one shingle
        # (S,) the top 32 bits of the mixed shingle hashes, grouped by document; every document has at least one
        x = (_mix64(sh[full]) >> np.uint64(32)).astype(np.uint32)
        per_doc = np.bincount(doc[full], minlength=D)  # (D,) shingles per document
        first = np.concatenate([[0], np.cumsum(per_doc)])  # (D+1,) shingle offset of each document
        sig = np.empty((self.num_perm, D), dtype=np.uint32)  # (num_perm, D)
        # blocks of whole documents, (num_perm, shingles) at most ~4 MB: cache-sized; the minimum per document
        # runs along contiguous rows
        step = max(1024, (1 << 19) // self.num_perm)
        if self._scratch is None:
            self._scratch = np.empty((self.num_perm, 2 * step), dtype=np.uint32)
        d0 = 0
        while d0 < D:
            d1 = max(int(np.searchsorted(first, first[d0] + step, side="right")) - 1, d0 + 1)
            s0, s1 = first[d0], first[d1]
            if s1 - s0 <= 2 * step:
                hv = np.multiply.outer(self.a, x[s0:s1], out=self._scratch[:, : s1 - s0])  # a_i * x mod 2**32
                sig[:, d0:d1] = np.minimum.reduceat(hv, first[d0:d1] - s0, axis=1)
            else:  # one long document: its shingles in pieces
                sig[:, d0] = np.iinfo(np.uint32).max
                for c in range(s0, s1, step):
                    np.minimum(sig[:, d0], np.multiply.outer(self.a, x[c:c + step]).min(axis=1), out=sig[:, d0])
            d0 = d1
        return sig.T  # (D, num_perm)

    def band_keys(self, sig: np.ndarray, bands: int, rows: int, salt: np.ndarray) -> np.ndarray:
        """(D, bands) uint64 keys: a hash of each band of `rows` signature values, salted per band and by
        `salt` (D,) so that different repeat passes never collide."""
        D = len(sig)
        mult, band_salt = _rand_u64(0xBA4D, rows, odd=True), _rand_u64(0x5A17, bands)  # fixed constants
        h = (sig[:, : bands * rows].reshape(D, bands, rows) * mult).sum(axis=2, dtype=np.uint64)  # (D, bands)
        return _mix64(h + band_salt[None, :] + salt[:, None])


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The share of equal signature values: an unbiased estimate of the Jaccard similarity of the shingle sets."""
    return float(np.mean(sig_a == sig_b))


# ---------------------------------------------------------------------------------------------------------
# Building the corpus.


class _Shards:
    """JSONL shards `<split>-00000.jsonl`, ... of at most `max_bytes` each (one longer line gets its own shard)."""

    def __init__(self, out_dir: Path, split: str, max_bytes: int):
        self.out_dir, self.split, self.max_bytes = out_dir, split, max_bytes
        self.names: list[str] = []
        self.f = None
        self.size = 0
        self._next()

    def _next(self):
        if self.f:
            self.f.close()
        self.names.append(f"{self.split}-{len(self.names):05d}.jsonl")
        self.f = open(self.out_dir / self.names[-1], "wb", buffering=1 << 20)
        self.size = 0

    def write(self, data: bytes, sizes: np.ndarray):
        """Write lines given as their concatenated bytes and their sizes, rolling over between lines."""
        data, pos = memoryview(data), 0
        while pos < len(data):
            room = self.max_bytes - self.size
            fit = int(np.searchsorted(np.cumsum(sizes), room, side="right"))  # lines that fit in this shard
            if fit == 0 and self.size:
                self._next()
                continue
            fit = max(fit, 1)  # a line longer than a whole shard gets a shard of its own
            n = int(sizes[:fit].sum())
            self.f.write(data[pos:pos + n])
            self.size += n
            pos += n
            sizes = sizes[fit:]

    def close(self):
        self.f.close()


# Per-document work (cleaning, hashing, MinHash, JSON encoding) runs in worker processes, a batch at a time;
# the main process reads the sources and applies the results in batch order: the dedup indexes, the split and
# the shards. The order makes the output independent of the number of workers.

_STATUS = ("candidate", "empty", "too_short", "too_long")  # what cleaning and the length filters made of a document
_W: dict = {}  # the per-process state of _prepare_batch: parameters and the MinHasher


def _batch_params(cfg: Config) -> dict:
    d, nd = cfg.data, cfg.data.near_dedup
    bands, rows = lsh_params(nd.threshold, nd.num_perm)
    return {"normalize": d.normalize, "min_chars": d.min_chars, "max_chars": d.max_chars, "near": nd.enabled,
            "key": hashlib.sha256(f"homellm-data-{cfg.seed}".encode()).digest(),  # blake2b key
            "num_perm": nd.num_perm, "shingle_words": nd.shingle_words, "seed": cfg.seed, "bands": bands, "rows": rows}


def _init_state(params: dict, worker: bool = False):
    if worker:  # Ctrl+C is the main process's to handle: it stops the workers
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _W.clear()
    # the LSH reads bands * rows signature values (60 of 64 for the defaults): no need to compute the rest
    used = params["bands"] * params["rows"]
    _W.update(params=params, minhash=MinHasher(used, params["shingle_words"], params["seed"]))


def _prepare_batch(raw: list[str], reps: np.ndarray) -> dict:
    """Clean and length-filter a batch, and compute for each remaining candidate: the dedup key (salted by its
    repeat pass), the split key, the near-dedup band keys, its length and its JSONL line."""
    p = _W["params"]
    norm, lo, hi = p["normalize"], p["min_chars"], p["max_chars"]
    status = np.zeros(len(raw), dtype=np.int8)  # index into _STATUS
    texts, idx = [], []
    for i, t in enumerate(raw):
        t = clean_text(t, norm)
        L = len(t)
        if L < lo:
            status[i] = 1 if L == 0 else 2
        elif L > hi:
            status[i] = 3
        else:
            texts.append(t)
            idx.append(i)
    D = len(texts)
    idx = np.array(idx, dtype=np.int64)  # (D,) position of each candidate in the batch
    enc = [t.encode("utf-8") for t in texts]
    key = p["key"]
    dig = np.frombuffer(b"".join([hashlib.blake2b(e, digest_size=16, key=key).digest() for e in enc]),
                        dtype="<u8").reshape(D, 2)  # (D, 2)
    # a repeat pass r dedups only within pass r: its keys are salted (pass 0 by 0: the mixer maps 0 to 0)
    salt = _mix64(reps[idx] * np.uint64(0x9E3779B97F4A7C15))  # (D,)
    out = {"status": status, "idx": idx, "exact_key": dig[:, 0] ^ salt, "split_key": dig[:, 1].copy(),
           "chars": np.fromiter(map(len, texts), dtype=np.int64, count=D),
           "bytes": np.fromiter(map(len, enc), dtype=np.int64, count=D),
           "band_keys": None}
    # the JSONL lines as one buffer and their sizes: cheaper to send back than a list of bytes objects
    lines = [('{"text": ' + encode_basestring(t) + "}\n").encode("utf-8") for t in texts]
    out["line_sizes"] = np.fromiter(map(len, lines), dtype=np.int64, count=D)
    out["lines"] = b"".join(lines)
    if p["near"] and D:
        mh = _W["minhash"]
        out["band_keys"] = mh.band_keys(mh.signatures(texts), p["bands"], p["rows"], salt)  # (D, bands)
    return out


def _worker_count() -> int:
    """Worker processes: one per CPU (at most 8) on Linux, where they start by fork in milliseconds and need
    no re-import of the caller's main module; elsewhere none (all work in this process)."""
    if not sys.platform.startswith("linux") or "fork" not in mp.get_all_start_methods():
        return 0
    cpus = len(os.sched_getaffinity(0))
    return min(cpus, 8) if cpus > 1 else 0


class _Builder:
    """One corpus build: batches out to the workers, results back in order into the dedup indexes and shards."""

    def __init__(self, cfg: Config, out_dir: Path, workers: int | None):
        d: DataConfig = cfg.data
        self.params = _batch_params(cfg)
        self.bands = self.params["bands"]
        self.val_cut = np.uint64(min(int(d.val_fraction * 2**64), _MASK64))
        self.exact = U64Set() if d.dedup else None
        self.near = U64Set() if d.near_dedup.enabled else None
        self.shards = {s: _Shards(out_dir, s, d.shard_mb << 20) for s in SPLITS}
        self.split_stats = {s: {"documents": 0, "chars": 0, "bytes": 0} for s in SPLITS}
        self.hist = np.zeros(64, dtype=np.int64)  # documents by length: bucket i holds [2**(i-1), 2**i) chars
        self.nsrc = len(d.sources)
        self.per_source = {k: np.zeros(self.nsrc, dtype=np.int64)
                           for k in ("kept", "kept_chars", "exact_dup", "near_dup", "empty", "too_short", "too_long")}
        self.workers = _worker_count() if workers is None else workers
        self.pool = None
        self.pending: deque = deque()  # (future, source of each document) in batch order
        self.batches = 0
        self.raw: list[str] = []  # the batch being filled (the caller appends to it and adds to batch_chars)
        self.runs: list[tuple[int, int, int]] = [(0, 0, 0)]  # (first index in raw, source, repeat pass)
        self.batch_chars = 0

    def start_run(self, src: int, rep: int):
        """The documents added from now on come from source `src`, repeat pass `rep`."""
        self.runs.append((len(self.raw), src, rep))

    def submit(self):
        if not self.raw:
            return
        # per-document source and pass from the runs (documents arrive source by source)
        starts = [r[0] for r in self.runs] + [len(self.raw)]
        counts = np.diff(starts)
        src = np.repeat([r[1] for r in self.runs], counts).astype(np.int64)
        batch = (self.raw, np.repeat([r[2] for r in self.runs], counts).astype(np.uint64))
        last = self.runs[-1]
        self.raw, self.runs, self.batch_chars = [], [(0, last[1], last[2])], 0
        self.batches += 1
        if self.workers and self.batches == 2:  # a corpus of one batch is not worth starting processes for
            # fork: the workers share the parent's imports; they use only numpy, hashlib and re, so numpy's
            # BLAS threads in the parent (the reason 3.12+ warns about fork) are no concern. A worker that dies
            # (out of memory) breaks the executor and result() raises, instead of waiting forever.
            for shard in self.shards.values():  # no buffered output may be copied into the children
                shard.f.flush()
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"),
                                            initializer=_init_state, initargs=(self.params, True))
        if self.pool is None:
            if _W.get("params") != self.params:
                _init_state(self.params)
            self._apply(_prepare_batch(*batch), src)
            return
        while len(self.pending) > self.workers:  # a bounded number of batches in flight: bounded memory
            self._collect()
        self.pending.append((self.pool.submit(_prepare_batch, *batch), src))

    def _collect(self):
        future, src = self.pending.popleft()
        try:
            result = future.result()
        except BrokenProcessPool:
            raise UserError("data: a worker process of stage 01 died (out of memory?); run again with fewer "
                            "CPUs (e.g. taskset -c 0) or more memory") from None
        self._apply(result, src)

    def finish(self):
        self.submit()
        while self.pending:
            self._collect()

    def close(self):
        if self.pool is not None:  # after finish() nothing is pending; after an error, pending work is dropped
            self.pool.shutdown(wait=True, cancel_futures=True)
        for s in self.shards.values():
            s.close()

    def _apply(self, r: dict, src: np.ndarray):
        n, ps = self.nsrc, self.per_source
        for code in (1, 2, 3):
            ps[_STATUS[code]] += np.bincount(src[r["status"] == code], minlength=n)
        csrc = src[r["idx"]]  # (D,) source of each candidate
        keep = np.ones(len(csrc), dtype=bool)
        if self.exact is not None:
            dup = self.exact.add(r["exact_key"])
            keep &= ~dup
            ps["exact_dup"] += np.bincount(csrc[dup], minlength=n)
        if self.near is not None and len(csrc):
            sel = np.flatnonzero(keep)
            dup = sel[self.near.add(r["band_keys"][sel].reshape(-1)).reshape(-1, self.bands).any(axis=1)]
            keep[dup] = False
            ps["near_dup"] += np.bincount(csrc[dup], minlength=n)
        kept = np.flatnonzero(keep)
        is_val = r["split_key"][kept] < self.val_cut
        lines, sizes = memoryview(r["lines"]), r["line_sizes"]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        for split, sel in (("train", kept[~is_val]), ("val", kept[is_val])):
            if len(sel):
                # the selected lines' bytes, one slice each (not an index per byte of text)
                self.shards[split].write(b"".join([lines[offsets[i]:offsets[i + 1]] for i in sel.tolist()]),
                                         sizes[sel])
                st = self.split_stats[split]
                st["documents"] += len(sel)
                st["chars"] += int(r["chars"][sel].sum())
                st["bytes"] += int(r["bytes"][sel].sum())
        self.hist += np.bincount(np.frexp(r["chars"][kept].astype(np.float64))[1], minlength=64)  # = bit_length
        ps["kept"] += np.bincount(csrc[kept], minlength=n)
        ps["kept_chars"] += np.bincount(csrc[kept], weights=r["chars"][kept], minlength=n).astype(np.int64)


def _counter() -> dict:
    return {"read": 0, "kept": 0, "kept_chars": 0, **{k: 0 for k in FILTERS}}


def _histogram(hist: np.ndarray) -> dict:
    out = {}
    for i, n in enumerate(hist.tolist()):
        if n:
            out[f"{1 << (i - 1) if i else 0}-{(1 << i) - 1}"] = n
    return out


def build_corpus(cfg: Config, out_dir: Path, workers: int | None = None) -> dict:
    """Read every source, clean, filter, dedup and split into JSONL shards in out_dir; write and return stats.

    workers: processes for the per-document work (None: see `_worker_count`; 0: all in this process; more
    than 0 needs the fork start method, i.e. Linux or macOS). The output does not depend on it.
    """
    d = cfg.data
    t0 = time.time()
    bads = [BadRecords(d.on_bad_record) for _ in d.sources]
    # open every source first: a missing file or unreachable hub in the last source fails before any work
    readers = [open_source(src, i, cfg.base_dir, bads[i], d.max_chars) for i, src in enumerate(d.sources)]
    b = _Builder(cfg, out_dir, workers)
    counts = [_counter() for _ in d.sources]
    try:
        for i, src in enumerate(d.sources):
            c = counts[i]
            for rep in range(src.repeat):
                b.start_run(i, rep)
                n, limit = 0, src.max_docs
                for raw in readers[i]():  # the per-document loop of the main process: kept minimal
                    if n == limit:
                        break
                    n += 1
                    if raw is OVERSIZED:
                        c["too_long"] += 1
                        continue
                    b.raw.append(raw)
                    b.batch_chars += len(raw)
                    if b.batch_chars >= _BATCH_CHARS or len(b.raw) >= _BATCH_DOCS:
                        b.submit()
                c["read"] += n
            c["skipped_bad_records"] = bads[i].count
        b.finish()
    finally:
        b.close()
    for k, v in b.per_source.items():
        for c, n in zip(counts, v.tolist()):
            c[k] += n

    removed = {k: sum(c[k] for c in counts) for k in FILTERS}
    splits = {s: {**b.split_stats[s], "shards": b.shards[s].names} for s in SPLITS}
    stats = {
        "documents": sum(v["documents"] for v in splits.values()),
        "chars": sum(v["chars"] for v in splits.values()),
        "bytes": sum(v["bytes"] for v in splits.values()),
        "splits": splits,
        "removed": removed,
        "sources": [{"index": i, "label": source_label(src), **counts[i],
                     **({"sha256": ident["contents"]} if ident.get("contents") else {})}
                    for i, (src, ident) in enumerate(zip(d.sources, stage_config(cfg, "01_data")["data"]["sources"]))],
        "length_histogram_chars": _histogram(b.hist),
        "dedup_index": {"lsh_bands": b.bands, "lsh_rows": b.params["rows"],
                        "exact_keys": b.exact.size if b.exact else 0, "near_keys": b.near.size if b.near else 0,
                        "index_mb": round(sum(x.nbytes for x in (b.exact, b.near) if x) / 2**20, 1)},
    }
    where = "; ".join(f"{s['label']}: read {s['read']}, kept {s['kept']}" for s in stats["sources"])
    if splits["train"]["documents"] == 0:
        raise UserError(f"data.sources: the corpus is empty after filtering ({where}; removed: "
                        f"{_fmt_removed(removed)}). Add text, or relax data.min_chars/max_chars/dedup.")
    if d.val_fraction > 0 and splits["val"]["documents"] == 0:
        raise UserError(f"data.val_fraction: {d.val_fraction} of {stats['documents']} documents put none into the "
                        "validation split; add documents, raise data.val_fraction, or set it to 0 for no validation")
    atomic_write_json(out_dir / "stats.json", stats)
    stats["seconds"] = round(time.time() - t0, 2)  # not in stats.json: it must be identical between runs
    return stats


def _fmt_removed(removed: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in removed.items())


def summary(stats: dict) -> str:
    tr, va = stats["splits"]["train"], stats["splits"]["val"]
    lines = [f"01_data: {stats['documents']:,} documents (train {tr['documents']:,}, val {va['documents']:,}), "
             f"{stats['chars'] / 1e6:.2f}M chars, {stats['bytes'] / 1e6:.2f} MB"
             + (f" in {stats['seconds']:.1f} s" if "seconds" in stats else "")]
    for s in stats["sources"]:
        lines.append(f"  {s['label']}: read {s['read']:,}, kept {s['kept']:,}")
    lines.append(f"  removed: {_fmt_removed(stats['removed'])}")
    return "\n".join(lines)


def run_data(cfg: Config, force: bool = False) -> Path:
    """Build the corpus for cfg unless its artifact directory is already complete; return the directory."""
    final = stage_dir(cfg, STAGE)
    if is_complete(final) and not force:
        print(f"{STAGE}: already complete, nothing to do (use --force to rebuild): {final}")
        return final
    with stage_output(cfg, STAGE) as (tmp, extra):
        stats = build_corpus(cfg, tmp)
        extra.update({"documents": {s: stats["splits"][s]["documents"] for s in SPLITS},
                      "chars": {s: stats["splits"][s]["chars"] for s in SPLITS},
                      "bytes": {s: stats["splits"][s]["bytes"] for s in SPLITS},
                      "removed": stats["removed"],
                      "sources": {s["label"]: s["kept"] for s in stats["sources"]}})
    print(summary(stats))
    return final


# ---------------------------------------------------------------------------------------------------------
# Reading the corpus back (stage 02 streams it into the tokenizer).


def shard_paths(stage_dir: str | Path, split: str) -> list[Path]:
    assert split in SPLITS, split
    paths = sorted(Path(stage_dir).glob(f"{split}-*.jsonl"))
    if not paths:
        raise UserError(f"{stage_dir}: no {split} shards ({split}-00000.jsonl); run 01_prepare_data.py for this config")
    return paths


def iter_documents(stage_dir: str | Path, split: str = "train") -> Iterator[str]:
    """Stream the texts of one split, in corpus order."""
    for path in shard_paths(stage_dir, split):
        with open(path, encoding="utf-8", newline="\n", buffering=1 << 20) as f:
            for lineno, line in enumerate(f, 1):
                # our own fixed line format {"text": "..."}: the one JSON string is read directly by the
                # decoder's string scanner, 5x faster than json.loads building a dict per line
                try:
                    if line.startswith('{"text": "'):
                        text, end = scanstring(line, 10)
                        if line[end:] in ("}\n", "}"):
                            yield text
                            continue
                    yield json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as e:
                    raise UserError(f"{path}:{lineno}: not a corpus line ({e}); the artifact is damaged: rebuild it "
                                    "with 01_prepare_data.py --force") from None


def read_stats(stage_dir: str | Path) -> dict:
    return json.loads((Path(stage_dir) / "stats.json").read_text(encoding="utf-8"))
