"""llama.cpp as the serving engine's decoder for GGUF models on a CPU, through llama-cpp-python's C API.

One llama.cpp context holds up to `n_seq` sequences, each with its own slice of the KV cache. Every request gets a
token iterator (`stream`), as lib.model.generate gives the torch path; the engine's round-robin asks each active request
for its next token in turn. The first request of a round that has no token ready runs one `llama_decode` over a
batch holding the next token of *every* active sequence (and a chunk of any prompt not yet read), so N concurrent
users cost about one forward pass per round instead of N: that is where the aggregate speed comes from.

Sampling uses llama.cpp's own sampler chain per sequence, configured to mean what lib.model.generate.sample_next means:
repetition penalty (transformers' rule, over the prompt and the output), top-k, temperature, top-p (the most likely
token always kept), then a draw seeded with the request's seed; temperature 0 is argmax. So greedy output equals
the torch path's for the same weights, and a seed makes a reply reproducible (the two paths draw differently).

Not here: choosing this engine (lib.serving.loading), text and stop strings (lib.serving.text.TextStream).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.check.formulas import LLAMA_CPP_UBATCH
from lib.errors import UserError
from lib.hardware import llama_cpp_repack


def available() -> tuple[bool, str]:
    """Whether llama-cpp-python can be imported here, and if not, why (said when serving falls back to torch)."""
    try:
        import llama_cpp  # noqa: F401  (the import is the check)
    except Exception as e:  # not installed, or its shared library does not load on this machine
        return False, (f"llama-cpp-python is not usable here ({type(e).__name__}: {e}); install it with "
                       "`pip install llama-cpp-python` (it builds llama.cpp from source with cmake and a C++ compiler)")
    return True, ""


@dataclass
class _Seq:
    seq_id: int
    pending: list[int]  # tokens to feed at the next decode: the prompt (in chunks), then the last sampled token
    pos: int = 0  # position of pending[0]
    sampler: object = None
    ready: int | None = None  # the token sampled at the last decode, not yet taken
    logits_index: int = -1
    done: bool = False
    logprobs: int | None = None  # params.logprobs: log-probabilities wanted for each sampled token
    ready_logprobs: tuple | None = None  # (logprob, top) of `ready`, read before the next decode overwrites the logits


class LlamaCppModel:
    """A GGUF model loaded into llama.cpp, serving up to `n_seq` concurrent sequences of `n_ctx_seq` tokens each.
    Not thread-safe: the engine's worker thread is its only caller."""

    def __init__(self, gguf: Path, n_ctx_seq: int | None = None, n_seq: int = 4, n_threads: int | None = None,
                 batch: int = LLAMA_CPP_UBATCH, lora: Path | None = None):
        import llama_cpp as L

        self.L, self.path = L, Path(gguf)
        self.model = load_gguf(L, self.path)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = L.llama_model_n_ctx_train(self.model)
        self.n_params = L.llama_model_n_params(self.model)
        self.n_ctx_seq = min(n_ctx_seq or self.n_ctx_train, self.n_ctx_train)
        self.n_seq = n_seq
        self.batch_size = batch
        self.ctx = new_context(L, self.model, self.n_ctx_seq * n_seq, batch, n_seq, n_threads,
                               f"{self.path}: llama.cpp could not create a context of {n_seq} x {self.n_ctx_seq} "
                               "tokens (not enough memory?); lower serve.max_active")
        if lora is not None:  # a LoRA GGUF (convert_lora_to_gguf.py) applied over the weights as they are
            adapter = L.llama_adapter_lora_init(self.model, str(lora).encode())
            if not adapter or L.llama_set_adapters_lora(self.ctx, (L.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                                        (ctypes.c_float * 1)(1.0)) != 0:
                L.llama_free(self.ctx)
                L.llama_model_free(self.model)
                self.ctx = None
                raise UserError(f"{lora}: llama.cpp cannot apply this LoRA adapter to {self.path.name} (made for "
                                "another model?)")
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(batch, 0, 1)
        self._free = list(range(n_seq))
        self._live: list[_Seq] = []
        self.rounds = 0  # llama_decode calls, and how many sequences they advanced: the batching at work
        self.round_sequences = 0

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (e.g. "general.name"), None when the file does not have it."""
        buf = ctypes.create_string_buffer(512)
        n = self.L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- one request -------------------------------------------------------------------------------------

    def stream(self, prompt_ids: list[int], params, record=None) -> Iterator[int]:
        """New token ids one at a time for `params` (lib.model.generate.SamplingParams); ends at a stop token id (not
        yielded), max_new_tokens or the sequence's context. Closing the iterator frees the sequence's slot.
        `record(token, logprob, top)` as lib.model.generate.stream's."""
        prompt = list(prompt_ids)[-(self.n_ctx_seq - 1):]
        max_new = min(params.max_new_tokens, self.n_ctx_seq - len(prompt))
        if not prompt or max_new <= 0:
            return
        if not self._free:
            raise RuntimeError("llama.cpp: no free sequence slot (the engine admits at most n_seq requests)")
        seq = _Seq(self._free.pop(), pending=prompt, sampler=self._sampler(params, prompt),
                   logprobs=params.logprobs if record is not None else None)
        self._live.append(seq)
        stop_ids = set(params.stop_token_ids or ())
        try:
            for i in range(max_new):
                while seq.ready is None:
                    self._decode_round()
                token, seq.ready = seq.ready, None
                if token in stop_ids:
                    return
                if seq.ready_logprobs is not None:
                    record(token, *seq.ready_logprobs)
                if i + 1 < max_new:  # queued before yielding, so the next round feeds it with everyone else's
                    seq.pending = [token]
                yield token
        finally:
            self._release(seq)

    def _sampler(self, params, prompt: list[int]):
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if getattr(params, "grammar", None):  # only tokens the grammar allows next (llama.cpp's grammar sampler)
            grammar = L.llama_sampler_init_grammar(self.vocab, params.grammar.encode(), b"root")
            if not grammar:
                L.llama_sampler_free(chain)
                raise ValueError("llama.cpp could not parse the grammar")
            L.llama_sampler_chain_add(chain, grammar)
        if params.repetition_penalty != 1.0:
            penalties = L.llama_sampler_init_penalties(self.n_vocab, -1, float(params.repetition_penalty), 0.0, 0.0)
            for t in prompt:  # the penalty covers the prompt, as lib.model.generate's does (the grammar never sees it)
                L.llama_sampler_accept(penalties, t)
            L.llama_sampler_chain_add(chain, penalties)
        if params.temperature == 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            if params.top_k:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(int(params.top_k)))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(float(params.temperature)))
            if params.top_p < 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(float(params.top_p), 1))
            seed = params.seed if params.seed is not None else L.LLAMA_DEFAULT_SEED  # the default = random
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(int(seed) & 0xFFFFFFFF))
        return chain

    def _release(self, seq: _Seq) -> None:
        if seq in self._live:
            self._live.remove(seq)
            self.L.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
            self.L.llama_sampler_free(seq.sampler)
            self._free.append(seq.seq_id)

    # -- one decode for everyone -------------------------------------------------------------------------

    def _decode_round(self) -> None:
        """Feed every live sequence's pending tokens (prompts in chunks that fit the batch) in one llama_decode,
        then sample the next token of each sequence whose input is complete."""
        L, b = self.L, self.batch
        waiting = [s for s in self._live if s.ready is None and s.pending]
        # decode steps (one token each) first, so that a long prompt never delays the others' next token
        chunks, room = [], self.batch_size
        for s in sorted(waiting, key=lambda s: len(s.pending)):
            if room <= 0:
                break
            chunk, s.pending = s.pending[:room], s.pending[room:]
            chunks.append((s, chunk))
            room -= len(chunk)
        # laid out in sequence-id order: llama.cpp splits a batch over per-sequence KV streams more efficiently so
        # (measured, 8 streams on SmolLM2: 51-53 tok/s in every run; arrival order alternated between 38 and 51)
        n, fed = 0, []
        for s, chunk in sorted(chunks, key=lambda c: c[0].seq_id):
            for i, t in enumerate(chunk):
                b.token[n] = t
                b.pos[n] = s.pos + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = s.seq_id
                b.logits[n] = 0
                n += 1
            s.pos += len(chunk)
            if not s.pending:  # its input is complete: read logits at its last token
                b.logits[n - 1] = 1
                s.logits_index = n - 1
                fed.append(s)
        b.n_tokens = n
        if n == 0:
            raise RuntimeError("llama.cpp: nothing to decode")
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} (KV cache full or bad batch)")
        self.rounds += 1
        self.round_sequences += len(fed)
        for s in fed:
            # llama_sampler_sample accepts the token into the chain itself (the penalties' history, the grammar's
            # state): accepting it again would count it twice, and a grammar would reject the repeat
            s.ready = int(L.llama_sampler_sample(s.sampler, self.ctx, s.logits_index))
            if s.logprobs is not None:
                s.ready_logprobs = row_logprobs(self._row(s.logits_index), s.ready, s.logprobs)

    def _row(self, index: int) -> np.ndarray:
        """The logits of batch row `index` of the last decode, as float64."""
        return np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,)).astype(
            np.float64)

    def logits_of_prompt(self, prompt_ids: list[int]) -> list[float]:
        """The next-token logits after `prompt_ids` (tests compare them with the torch path's)."""
        seq = _Seq(self._free.pop(), pending=list(prompt_ids))
        self._live.append(seq)
        seq.sampler = self.L.llama_sampler_init_greedy()
        try:
            while seq.ready is None:
                self._decode_round()
            ptr = self.L.llama_get_logits_ith(self.ctx, seq.logits_index)
            return list(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float * self.n_vocab)).contents)
        finally:
            self._release(seq)


    def token_logprobs(self, ids: list[int], start: int) -> tuple[list[float], list[bool]]:
        """For each token from ids[start] on: log p(ids[i] | ids[:i]) and whether it was the most likely token — what
        a multiple-choice benchmark scores (lib.report.evaluate). One sequence, in batch-sized chunks, with logits
        asked for only where they score a token."""
        L, b = self.L, self.batch
        ids = list(ids)[:self.n_ctx_seq]
        start = max(1, start)
        slot = self._free.pop()
        logps, greedy = [], []
        try:
            for pos in range(0, len(ids) - 1, self.batch_size):
                chunk = ids[pos:pos + self.batch_size]
                rows = []
                for i, t in enumerate(chunk):
                    b.token[i], b.pos[i], b.n_seq_id[i] = t, pos + i, 1
                    b.seq_id[i][0] = slot
                    b.logits[i] = int(start <= pos + i + 1 < len(ids))
                    if b.logits[i]:
                        rows.append(i)
                b.n_tokens = len(chunk)
                if L.llama_decode(self.ctx, b) != 0:
                    raise RuntimeError("llama_decode failed (KV cache full or bad batch)")
                for i in rows:
                    lp, target = log_softmax(self._row(i)), ids[pos + i + 1]
                    logps.append(float(lp[target]))
                    greedy.append(int(lp.argmax()) == target)
        finally:
            L.llama_memory_seq_rm(self.memory, slot, -1, -1)
            self._free.append(slot)
        return logps, greedy

    def score(self, ids: list[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """lib.serving.loading.LoadedModel.score through llama.cpp: logits at every position of one sequence."""
        L, b = self.L, self.batch
        ids = list(ids)
        if len(ids) > self.n_ctx_seq:
            raise ValueError(f"{len(ids)} tokens: more than the {self.n_ctx_seq} of a sequence's context")
        if not self._free:
            raise NoFreeSequence(f"all {len(self._live)} sequences of the context are generating replies")
        slot = self._free.pop()
        logps, tops = [], []
        try:
            for pos in range(0, len(ids), self.batch_size):
                chunk = ids[pos:pos + self.batch_size]
                for i, t in enumerate(chunk):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos + i, 1, 1
                    b.seq_id[i][0] = slot
                b.n_tokens = len(chunk)
                if L.llama_decode(self.ctx, b) != 0:
                    raise RuntimeError("llama_decode failed (KV cache full or bad batch)")
                for i in range(len(chunk)):
                    lp = log_softmax(self._row(i))
                    if pos + i + 1 < len(ids):
                        logps.append(float(lp[ids[pos + i + 1]]))
                    tops.append(_best(lp, max(top, 1)))
        finally:
            L.llama_memory_seq_rm(self.memory, slot, -1, -1)
            self._free.append(slot)
        return logps, tops

    def tokenize(self, text: str, bos: bool) -> list[int]:
        """llama.cpp's tokenization of `text` (special tokens as plain text)."""
        L = self.L
        raw = text.encode("utf-8")
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), bos, False)
        return list(buf[:n])


def log_softmax(row: np.ndarray) -> np.ndarray:
    m = row.max()
    return row - m - np.log(np.exp(row - m).sum())


def _best(lp: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k largest log-probabilities as (token id, logprob), best first."""
    best = np.argpartition(-lp, k - 1)[:k]
    best = best[np.argsort(-lp[best], kind="stable")]
    return [(int(t), float(lp[t])) for t in best]


def row_logprobs(row: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under one row of logits, and the `top` most likely tokens (lib.model.generate.token_logprobs's
    answer, from llama.cpp's logits)."""
    lp = log_softmax(row)
    return float(lp[token]), (_best(lp, top) if top else [])


class NoFreeSequence(RuntimeError):
    """Every sequence of a context is in use (the engine's replies); scoring waits for one to end (HTTP 503)."""


def load_gguf(L, path: Path):
    """A llama_model* for the GGUF at `path` (a UserError when llama.cpp cannot load it)."""
    L.llama_backend_init()
    quiet_logs(L)
    mparams = L.llama_model_default_params()
    mparams.use_extra_bufts = llama_cpp_repack()  # off where repacked quantized weights crash (AMX CPUs)
    model = L.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise UserError(f"{path}: llama.cpp could not load this GGUF file (damaged, or an architecture this "
                        "llama.cpp build does not know)")
    return model


def new_context(L, model, n_ctx: int, batch: int, n_seq: int, n_threads: int | None, error: str,
                embeddings: bool = False):
    """A llama_context* of `n_ctx` tokens for up to `n_seq` sequences. On failure the model is freed and `error`
    raised.

    Chat (decoding): each sequence its own KV stream of n_ctx / n_seq cells and no flash attention, as llama-cpp-
    python's `Llama` defaults to. llama.cpp's own default (flash attention "auto", which turns it on for the CPU)
    decodes far slower here: measured on this 2-core AMX CPU, single stream after a 256-token prompt, SmolLM2-135M
    Q4_1 84 vs 63 tok/s and our 512-8-8 Q8_0 537 vs 329; after a 900-token prompt 71 vs 45 and 477 vs 193. It
    prefills 8-25% faster, which loses to the decode from about 20 new tokens on. One KV pool for all sequences
    (kv_unified) was slower too without flash attention: 8 streams 39 vs 52 tok/s aggregate on SmolLM2.
    Embeddings: one batch holds many short sequences, so one pool and llama.cpp's default attention."""
    cparams = L.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = cparams.n_ubatch = batch
    cparams.n_seq_max = n_seq
    cparams.n_threads = cparams.n_threads_batch = n_threads or max(1, len(os.sched_getaffinity(0)))
    cparams.embeddings = embeddings
    cparams.kv_unified = embeddings
    if not embeddings:
        cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cparams.no_perf = True
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        L.llama_model_free(model)
        raise UserError(error)
    return ctx


class LlamaCppEmbeddings:
    """A GGUF embedding model (BERT, nomic-bert, a causal model with last-token pooling, ...) in llama.cpp: one
    pooled vector per text, with the pooling the GGUF declares, L2-normalised as llama-server returns them. Texts
    are packed into batches of up to `batch` tokens, one sequence each. Not thread-safe (lib.serving.task_models
    calls it under a lock)."""

    def __init__(self, gguf: Path, n_threads: int | None = None, batch: int = 512, max_seqs: int = 64):
        import llama_cpp as L

        self.L, self.path = L, Path(gguf)
        self.model = load_gguf(L, self.path)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_ctx_train = L.llama_model_n_ctx_train(self.model)
        self.n_params = L.llama_model_n_params(self.model)
        self.dim = L.llama_model_n_embd(self.model)
        # an encoder reads a whole text in one batch; a larger batch is slower, as its attention spans every
        # text in it (masked): MiniLM f16, KJV verses, 111 texts/s at 2,048 tokens, 159 at 512
        self.batch_size = max(batch, self.n_ctx_train)
        self.max_seqs = max_seqs
        self.ctx = new_context(L, self.model, self.batch_size, self.batch_size, max_seqs, n_threads,
                               f"{self.path}: llama.cpp could not create an embedding context of "
                               f"{self.batch_size} tokens (not enough memory?)", embeddings=True)
        self.pooled = L.llama_pooling_type(self.ctx) != L.LLAMA_POOLING_TYPE_NONE
        self.encoder = L.llama_model_has_encoder(self.model) and not L.llama_model_has_decoder(self.model)
        self.batch = L.llama_batch_init(self.batch_size, 0, 1)
        self.keep_last = L.llama_vocab_get_add_sep(self.vocab) or L.llama_vocab_get_add_eos(self.vocab)

    def tokenize(self, text: str) -> list[int]:
        """The model's tokens for `text`, with the special tokens it adds ([CLS] ... [SEP] for BERT)."""
        L = self.L
        raw = text.encode("utf-8")
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), True, False)
        return list(buf[:n])

    def truncate(self, ids: list[int]) -> list[int]:
        """The first tokens that fit the model, keeping a closing [SEP]/EOS as the tokenizer placed it."""
        if len(ids) <= self.n_ctx_train:
            return ids
        return ids[:self.n_ctx_train - 1] + ids[-1:] if self.keep_last else ids[:self.n_ctx_train]

    def embed(self, seqs: list[list[int]]) -> np.ndarray:
        """Unit vectors [len(seqs), dim] (float32) for token sequences no longer than the model's context."""
        out = np.empty((len(seqs), self.dim), dtype=np.float32)
        start = 0
        while start < len(seqs):
            end, n = start, 0
            while end < len(seqs) and end - start < self.max_seqs and n + len(seqs[end]) <= self.batch_size:
                n += len(seqs[end])
                end += 1
            out[start:end] = self._run(seqs[start:end])
            start = end
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def _run(self, seqs: list[list[int]]) -> np.ndarray:
        L, b = self.L, self.batch
        n, rows = 0, []
        for s, ids in enumerate(seqs):
            rows.append((n, n + len(ids)))
            for i, t in enumerate(ids):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = t, i, 1, 1
                b.seq_id[n][0] = s
                n += 1
        b.n_tokens = n
        memory = L.llama_get_memory(self.ctx)
        if memory:
            L.llama_memory_clear(memory, True)
        rc = (L.llama_encode if self.encoder else L.llama_decode)(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not embed a batch of {n} tokens (code {rc})")
        vecs = np.empty((len(seqs), self.dim), dtype=np.float32)
        for s, (lo, hi) in enumerate(rows):
            if self.pooled:
                vecs[s] = np.ctypeslib.as_array(L.llama_get_embeddings_seq(self.ctx, s), shape=(self.dim,))
            else:  # a GGUF without pooling: the mean of its token vectors
                vecs[s] = np.mean([np.ctypeslib.as_array(L.llama_get_embeddings_ith(self.ctx, i), shape=(self.dim,))
                                   for i in range(lo, hi)], axis=0)
        return vecs

    meta, close = LlamaCppModel.meta, LlamaCppModel.close


_LOG_CALLBACK = None


def quiet_logs(L) -> None:
    """llama.cpp logs every load detail to stderr; keep its errors only (its warnings are about settings we chose,
    e.g. a shared KV pool larger than one sequence's training context)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        @L.llama_log_callback
        def _cb(level, text, user_data):
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                os.write(2, text)

        _LOG_CALLBACK = _cb
        L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
