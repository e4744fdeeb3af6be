"""SFT examples as training rows: token ids with the loss mask of the assistant turns, the train/val split, length
fitting, packing, and the batches lib.train.loop.fit draws from.

    enc = encode_conversations(tokenizer, [messages], max_len)[0]   # enc.ids, enc.mask (True = a trained token)
    rows, stats = encode_examples(tokenizer, examples, max_len)
    batches = SftBatches(rows, batch_size, grad_accum, seed, pad_id)

A token is trained iff its characters lie inside an assistant span of lib.chat.render: the turn's content and its
`<|im_end|>`, so the model learns to stop. Not here: reading data files (lib.data.sft_data), the stage (lib.train.sft).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from lib.chat import render
from lib.data.sft_data import Example


@dataclass
class Encoded:
    ids: np.ndarray  # (n,) int64 token ids
    mask: np.ndarray  # (n,) bool: token n is a training target (predicted from the tokens before it)
    turn_ends: list[int] = field(default_factory=list)  # token index just after each assistant turn's end token
    complete: bool = True  # the conversation ends with an assistant turn (nothing to trim)


# Rendering only a prefix of a long conversation saves most of the tokenizing: a few thousand characters are more
# than seq_len tokens of English. The prefix is checked afterwards, so the result is exact (see encode_conversations).
CHARS_PER_TOKEN_CAP = 6


def _prefix(messages: list[dict], max_chars: int) -> list[dict]:
    """The messages up to and including the one that takes the text past max_chars."""
    total = 0
    for i, m in enumerate(messages):
        total += len(m["content"]) + 16  # + the ChatML frame
        if total > max_chars:
            return messages[: i + 1]
    return messages


def encode_conversations(tokenizer, conversations: list[list[dict]], max_len: Optional[int] = None) -> list[Encoded]:
    """Tokenize rendered conversations (batched) and mark the assistant tokens.

    A token is trained iff its characters lie inside an assistant span. Offsets come from the tokenizer itself,
    so the ids are exactly those of tokenizing the whole rendered text — what apply_chat_template gives.
    With max_len, long conversations are rendered only up to CHARS_PER_TOKEN_CAP * max_len characters; a prefix
    that turns out to have max_len tokens or fewer is redone in full, so fit_length(result, max_len) is the same
    as without the cap."""
    if max_len is None:
        return _encode(tokenizer, conversations, [True] * len(conversations))
    prefixes = [_prefix(msgs, CHARS_PER_TOKEN_CAP * max_len) for msgs in conversations]
    cut = [len(p) < len(m) for p, m in zip(prefixes, conversations)]
    out = _encode(tokenizer, prefixes, [not c for c in cut])
    redo = [i for i, (c, e) in enumerate(zip(cut, out)) if c and len(e.ids) <= max_len]
    if redo:
        for i, e in zip(redo, _encode(tokenizer, [conversations[i] for i in redo], [True] * len(redo))):
            out[i] = e
    return out


def _encode(tokenizer, conversations: list[list[dict]], whole: list[bool]) -> list[Encoded]:
    rendered = [render(tokenizer, msgs) for msgs in conversations]
    encodings = tokenizer.backend_tokenizer.encode_batch([t for t, _ in rendered], add_special_tokens=False)
    out = []
    for (_text, spans), enc, msgs, w in zip(rendered, encodings, conversations, whole):
        ids = np.asarray(enc.ids, dtype=np.int64)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        mask = np.zeros(len(ids), dtype=bool)
        turn_ends = []
        for s, e in spans:
            mask |= (starts >= s) & (ends <= e)
            turn_ends.append(int(np.searchsorted(ends, e, side="right")))
        # a rendered prefix is never "complete": what follows it was not rendered
        out.append(Encoded(ids, mask, turn_ends, complete=w and msgs[-1]["role"] == "assistant"))
    return out


def fit_length(enc: Encoded, max_len: int) -> tuple[Optional[Encoded], bool]:
    """Cut a conversation to at most max_len tokens without ever leaving an assistant turn without its end token:
    the cut goes after the last assistant turn that fits whole; a partial turn is dropped. Trailing non-assistant
    turns are trimmed too (they carry no loss). Returns (encoded or None if not even one turn fits, truncated)."""
    n = len(enc.ids)
    if n <= max_len and enc.complete:
        return enc, False
    fitting = [k for k in enc.turn_ends if k <= max_len]
    if not fitting:
        return None, True
    cut = max(fitting)
    return Encoded(enc.ids[:cut], enc.mask[:cut], [k for k in enc.turn_ends if k <= cut]), n > max_len


def encode_text(tokenizer, texts: list[str], max_len: int) -> list[Encoded]:
    """Plain text (continued pretraining): eos after each document, loss on every token, long documents cut into
    windows of max_len that overlap by one token, so every token is predicted exactly once."""
    eos = tokenizer.eos_token_id
    out = []
    for enc in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False):  # no offsets needed
        ids = np.asarray(enc.ids + ([eos] if eos is not None else []), dtype=np.int64)
        for start in range(0, max(len(ids) - 1, 1), max_len - 1):
            piece = ids[start:start + max_len]
            if len(piece) >= 2:
                out.append(Encoded(piece, np.ones(len(piece), dtype=bool)))
    return out


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic train/val split by a hash of each example's content (stable when examples are added; duplicates
    land on the same side). At least one validation example when val_fraction > 0 and there are two or more."""
    if val_fraction <= 0 or len(examples) < 2:
        return list(examples), []

    def h(ex: Example) -> float:
        digest = hashlib.blake2b(f"{seed}:{ex.key()}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    scored = [(h(ex), i) for i, ex in enumerate(examples)]
    val_idx = {i for s, i in scored if s < val_fraction}
    if not val_idx:
        val_idx = {min(scored)[1]}
    if len(val_idx) == len(examples):
        val_idx.discard(max(scored)[1])
    return ([ex for i, ex in enumerate(examples) if i not in val_idx],
            [ex for i, ex in enumerate(examples) if i in val_idx])


@dataclass
class EncodeStats:
    examples: int = 0
    turns: int = 0  # assistant turns kept
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0  # conversations cut to seq_len (after their last whole assistant turn)
    dropped_too_long: int = 0  # not even the first assistant turn fits in seq_len

    def line(self, name: str) -> str:
        return (f"{name}: {self.examples:,} examples, {self.turns:,} assistant turns, {self.tokens:,} tokens "
                f"({self.trained_tokens:,} trained), {self.truncated:,} truncated, "
                f"{self.dropped_too_long:,} dropped as too long")


def encode_examples(tokenizer, examples: list[Example], max_len: int) -> tuple[list[Encoded], EncodeStats]:
    """Conversations and plain texts as token sequences of at most max_len, with stats."""
    convs = [ex.messages for ex in examples if ex.messages is not None]
    texts = [ex.text for ex in examples if ex.text is not None]
    stats = EncodeStats()
    out = []
    for enc in encode_conversations(tokenizer, convs, max_len) if convs else []:
        fitted, truncated = fit_length(enc, max_len)
        if fitted is None:
            stats.dropped_too_long += 1
            continue
        stats.truncated += truncated
        stats.turns += len(fitted.turn_ends)
        out.append(fitted)
    out += encode_text(tokenizer, texts, max_len) if texts else []
    stats.examples = len(out)
    stats.tokens = sum(len(e.ids) for e in out)
    stats.trained_tokens = sum(int(e.mask[1:].sum()) for e in out)
    return out, stats


def pack(sequences: list[Encoded], max_len: int, seed: int) -> list[Encoded]:
    """Concatenate whole examples (in a seeded shuffled order) into rows of at most max_len tokens. Attention is
    not blocked between examples of a row (like most packing trainers); the first token of each example is
    not a target, so no loss crosses an example boundary."""
    order = np.random.default_rng([seed, 4]).permutation(len(sequences))
    rows, ids, mask = [], [], []
    for i in order:
        s = sequences[i]
        if ids and sum(map(len, ids)) + len(s.ids) > max_len:
            rows.append(Encoded(np.concatenate(ids), np.concatenate(mask)))
            ids, mask = [], []
        m = s.mask.copy()
        m[0] = False
        ids.append(s.ids)
        mask.append(m)
    if ids:
        rows.append(Encoded(np.concatenate(ids), np.concatenate(mask)))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Batches for lib.train.loop.fit.


class SftBatches:
    """Micro-batches of whole examples, padded to the longest in the batch. `get` is a pure function of
    (step, micro, rank, world): example i of the run is entry i mod n of a seeded permutation of epoch i // n, so a
    resumed run sees the same batches. `repeat` lists every example that many times per epoch."""

    def __init__(self, rows: list[Encoded], batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 repeat: int = 1):
        assert rows, "no rows"
        self.rows, self.batch_size, self.grad_accum = rows, batch_size, grad_accum
        self.seed, self.pad_id, self.repeat = seed, pad_id, repeat
        self.n = len(rows) * repeat
        # "tokens" are counted in example slots of the mean length, so that steps x tokens/step = epochs x
        # tokens/epoch exactly (the loop derives max_epochs from these two numbers)
        self.mean_len = max(1, round(sum(self.row_len(r) for r in rows) / len(rows)))
        self.tokens_per_epoch = self.n * self.mean_len
        self._perm: dict[int, np.ndarray] = {}

    @staticmethod
    def row_len(row: Encoded) -> int:
        return len(row.ids)

    def _index(self, i: int) -> int:
        epoch = i // self.n
        if epoch not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            self._perm[epoch] = np.random.default_rng([self.seed, 41, epoch]).permutation(self.n)
        return int(self._perm[epoch][i % self.n]) % len(self.rows)

    def collate(self, rows: list[Encoded]) -> dict[str, torch.Tensor]:
        T = max(len(r.ids) for r in rows)
        ids = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=bool)
        for b, r in enumerate(rows):
            ids[b, :len(r.ids)] = r.ids
            mask[b, :len(r.ids)] = r.mask
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        # position t predicts token t+1: the mask belongs to the target
        return {"x": ids_t[:, :-1], "y": ids_t[:, 1:], "mask": mask_t[:, 1:]}

    def get(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        B = self.batch_size
        first = ((step * self.grad_accum + micro) * world + rank) * B
        return self.collate([self.rows[self._index(i)] for i in range(first, first + B)])

    def eval_batches(self, n: int) -> Iterator[dict[str, torch.Tensor]]:
        """The first n*B examples in their fixed order (fewer batches if there are fewer examples)."""
        B = self.batch_size
        for start in range(0, min(n * B, len(self.rows)), B):
            yield self.collate(self.rows[start:start + B])
