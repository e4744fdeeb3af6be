"""The serving engine: loads a model and runs every generation request of the process on one worker thread.

    loaded = load_model(resolve_model(None, cfg))
    engine = Engine(loaded)
    ids = encode_chat(loaded.tokenizer, [{"role": "user", "content": "Hi"}])
    handle = engine.submit(ids, SamplingParams(max_new_tokens=64), stop=["\\n\\n"])
    for kind, value in handle:          # ("text", "Hel"), ("text", "lo"), ("done", "stop")
        ...

One thread owns the model, so requests from the API, the UI and the CLI never race on it. It keeps up to
`max_active` generations open and advances them round-robin one token each, so a long reply does not block a
short one, and a cancelled request (client gone, Stop button) is dropped at its next token. Requests beyond that
wait in a bounded queue.

Two decoders sit behind the same token iterators (`LoadedModel.stream`), picked by `choose_engine`:
- llama.cpp (lib.serving.llamacpp) for a model that has a GGUF file, on a CPU: llama.cpp's own speed, and one
  batched decode per round for all active requests;
- torch (lib.generate.stream, a KV cache per request) for GPUs and for models without a GGUF. It also serves a
  GGUF when llama-cpp-python is missing (converted to HF weights on load), and says why that is slower.

Text comes out through `TextStream`: UTF-8-complete pieces only, stop strings cut off, and any text that could
be the start of a stop string held back until it is known not to be one.

Not here: HTTP (lib.serving.api), the UI (lib.serving.ui), sampling maths (lib.generate).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import re
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from lib.chat import encode_chat, end_of_turn_ids
from lib.errors import UserError
from lib.serving.resolve import ModelRef

class EngineBusy(Exception):
    """The request queue is full; the caller should retry later (HTTP 503)."""


class ContextTooLong(ValueError):
    """The prompt does not leave room for a single new token in the model's context."""

    def __init__(self, prompt_tokens: int, context_length: int):
        self.prompt_tokens, self.context_length = prompt_tokens, context_length
        super().__init__(f"the prompt is {prompt_tokens} tokens but the model's context length is {context_length} "
                         f"tokens (at least one must be left for the reply); shorten the prompt or the conversation")


# ---------------------------------------------------------------------------------------------------------
# The loaded model.


@dataclass
class LoadedModel:
    ref: ModelRef
    model: Any  # lib.model.HomeLLM in eval mode (engine "torch"), or lib.serving.llamacpp.LlamaCppModel
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    context_length: int
    stop_token_ids: list[int]
    device: str
    dtype: str
    parameters: int
    config: dict = field(default_factory=dict)  # the model's config.json
    # the longest token's text: a text longer than context_length * this cannot fit, whatever it says
    max_token_chars: int = 64
    engine: str = "torch"  # "torch" or "llama.cpp"
    engine_note: str = ""  # why this engine (shown at start and in /info)

    def stream(self, prompt_ids: list[int], params) -> Iterator[int]:
        """New token ids for a prompt (lib.generate.stream's contract), from whichever decoder serves this model."""
        if self.engine == "llama.cpp":
            return self.model.stream(prompt_ids, params)
        from lib.generate import stream

        return stream(self.model, prompt_ids, params)

    @property
    def id(self) -> str:
        return self.ref.id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def surely_too_long(self, n_chars: int) -> bool:
        """True when a text of n_chars characters cannot fit the context (checked before spending time tokenizing)."""
        return n_chars > self.context_length * self.max_token_chars

    def describe(self) -> dict:
        """What /info and the UI show about the model."""
        return {
            "id": self.id, "source": self.ref.source, "path": str(self.ref.path or self.ref.gguf),
            "gguf": str(self.ref.gguf) if self.ref.gguf else None, "engine": self.engine,
            "engine_note": self.engine_note,
            "architecture": (self.config.get("architectures") or [self.config.get("model_type")])[0],
            "parameters": self.parameters, "context_length": self.context_length,
            "vocab_size": self.config.get("vocab_size"), "device": self.device, "dtype": self.dtype,
            "chat_template": self.has_chat_template, "stop_token_ids": self.stop_token_ids, "info": self.ref.info,
        }


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu (or auto)")
    return device


def choose_engine(ref: ModelRef, device: str, requested: str = "auto") -> tuple[str, str]:
    """("llama.cpp" | "torch", why). llama.cpp needs a GGUF file, the CPU and an importable llama-cpp-python."""
    from lib.serving import llamacpp

    if requested == "torch":
        return "torch", "engine torch (asked for)"
    ok, why_not = llamacpp.available()
    problems = []
    if ref.gguf is None:
        problems.append("the model has no GGUF file (export or install one to serve it with llama.cpp)")
    if device != "cpu":
        problems.append(f"llama.cpp here runs on the CPU and the model is to run on {device}")
    if not ok:
        problems.append(why_not)
    if not problems:
        return "llama.cpp", f"engine llama.cpp on {ref.gguf.name}"
    if requested == "llama.cpp":
        raise UserError("serve.engine llama.cpp: " + "; ".join(problems))
    slower = "; the torch engine decodes several times slower on a CPU" if device == "cpu" and ref.gguf else ""
    return "torch", "engine torch: " + "; ".join(problems) + slower


def load_model(ref: ModelRef, device: str = "auto", engine: str = "auto", max_active: int = 4,
               max_context: int = 4096) -> LoadedModel:
    """Load `ref` for serving with the engine `choose_engine` picks, and check that tokenizer and model fit."""
    device = pick_device(device)
    if ref.install_dir is not None:  # an installed model is served only if every file matches its SHA256SUMS
        from lib.install import verify_install

        verify_install(ref.install_dir)
    engine, note = choose_engine(ref, device, engine)
    if engine == "llama.cpp":
        return _load_llamacpp(ref, note, max_active, max_context)
    return _load_torch(ref, device, note)


def _load_torch(ref: ModelRef, device: str, note: str) -> LoadedModel:
    """Our HomeLLM on the HF weights (safetensors through lib.hf_io.load_hf)."""
    import torch

    from lib.hf_io import load_hf
    from lib.tokenizer import load_tokenizer

    hf_dir = ref.path
    if hf_dir is None:  # a GGUF alone: dequantised into an HF folder first (once per process)
        hf_dir = _gguf_as_hf(ref.gguf)
    config_path = hf_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path}: cannot read the model config ({e})") from None
    tokenizer = load_tokenizer(hf_dir)
    # bf16 halves memory and is fast on GPUs; CPUs serve in fp32 (bf16 matmuls are slow on most of them).
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_hf(hf_dir, device=device, dtype=dtype)
    model.eval()
    n_vocab = config.get("vocab_size")
    largest_id = max(tokenizer.get_vocab().values())
    if isinstance(n_vocab, int) and largest_id >= n_vocab:
        raise UserError(f"{hf_dir}: the tokenizer has token id {largest_id} but the model's vocab_size is {n_vocab} "
                        f"(config.json); the tokenizer files do not belong to this model")
    context = config.get("max_position_embeddings") or getattr(tokenizer, "model_max_length", None) or 2048
    return LoadedModel(ref=ref, model=model, tokenizer=tokenizer, context_length=int(context),
                       stop_token_ids=sorted(end_of_turn_ids(tokenizer, hf_dir)), device=device, dtype=str(dtype).split(".")[-1],
                       parameters=model.num_params(), config=config,
                       # a byte-level token's string has one character per byte, so it bounds the decoded length
                       max_token_chars=max(len(t) for t in tokenizer.get_vocab()), engine="torch", engine_note=note)


def _gguf_as_hf(gguf: Path) -> Path:
    import tempfile

    from lib.convert import gguf_to_hf

    out = Path(tempfile.mkdtemp(prefix="serve-gguf-")) / gguf.stem
    print(f"converting {gguf} to HF weights for the torch engine (llama.cpp would serve it as is) …",
          file=sys.stderr, flush=True)
    return gguf_to_hf(gguf, out)


def gguf_tokenizer(gguf: Path):
    """The tokenizer (and chat template) stored in a GGUF file, as a transformers tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers raises many kinds for a tokenizer it cannot rebuild
        raise UserError(f"{gguf}: cannot read its tokenizer ({type(e).__name__}: {e}); serve the HF folder of "
                        "the model instead") from None


def _load_llamacpp(ref: ModelRef, note: str, max_active: int, max_context: int) -> LoadedModel:
    from lib.serving.llamacpp import LlamaCppModel
    from lib.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ref.path) if ref.path is not None else gguf_tokenizer(ref.gguf)
    model = LlamaCppModel(ref.gguf, n_ctx_seq=max_context, n_seq=max_active)
    if len(tokenizer) > model.n_vocab:
        raise UserError(f"{ref.gguf}: the tokenizer has {len(tokenizer)} tokens but the GGUF model only {model.n_vocab}"
                        "; the tokenizer files do not belong to this model")
    config = json.loads((ref.path / "config.json").read_text(encoding="utf-8")) if ref.path is not None else {}
    config.setdefault("vocab_size", model.n_vocab)
    stop_ids = sorted(end_of_turn_ids(tokenizer, ref.path if ref.path is not None else ref.gguf.parent))
    quant = re.search(r"(?i)(q\d+_[a-z0-9_]+|i?q\d_\w+|bf16|f16|f32)$", ref.gguf.stem)
    quant = quant.group(1) if quant else "model"
    return LoadedModel(ref=ref, model=model, tokenizer=tokenizer, context_length=model.n_ctx_seq,
                       stop_token_ids=stop_ids, device="cpu", dtype=f"gguf {quant}", parameters=model.n_params,
                       config=config, max_token_chars=max(len(t) for t in tokenizer.get_vocab()),
                       engine="llama.cpp", engine_note=note)


def sampling_params(temperature: float, top_p: float, max_new_tokens: int, seed: int | None = None, **extra):
    """lib.generate.SamplingParams from the knobs users see. top_p = 0 keeps only the most likely token, i.e. greedy
    (OpenAI's reading of it; lib.generate itself wants top_p in (0, 1])."""
    from lib.generate import SamplingParams

    if top_p <= 0:
        temperature, top_p = 0.0, 1.0
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                          seed=seed, **extra)


# ---------------------------------------------------------------------------------------------------------
# Prompts (rendering and encoding are lib.chat's).


def fit_conversation(tokenizer, messages: list[dict], context_length: int, reserve: int) -> tuple[list[int], int]:
    """Encode a chat, dropping its oldest non-system turns until `reserve` new tokens fit; returns (ids, n_dropped).

    For the UI and the terminal chat, where a long conversation should keep going. The API does not trim: it
    answers 400 like OpenAI's, since the client decides what to drop.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids = encode_chat(tokenizer, system + turns)
        if len(ids) + reserve <= context_length or len(turns) <= 1:
            break
        turns = turns[1:]
        dropped += 1
        if turns and turns[0]["role"] == "assistant":  # a conversation starts with the user
            turns, dropped = turns[1:], dropped + 1
    if len(ids) >= context_length:
        raise ContextTooLong(len(ids), context_length)
    return ids, dropped


# ---------------------------------------------------------------------------------------------------------
# Token ids → text.


class TextStream:
    """Incremental detokenizer with stop strings.

    `push(id)` returns the text that is now safe to show: tokenizers' DecodeStream waits while the last tokens end
    inside a UTF-8 character (a byte-level BPE splits emoji and CJK across tokens), a stop string ends the stream and
    is not shown, and a tail that could be the beginning of a stop string is held back until it is not.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        from tokenizers.decoders import DecodeStream

        self.backend = tokenizer.backend_tokenizer  # every tokenizer we load is a fast (Rust) one
        self.stop = [s for s in stop if s]
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was found
        self._stream = DecodeStream(skip_special_tokens=True)
        self._held = ""

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        piece = self._stream.step(self.backend, token_id)
        return self._cut(piece) if piece else ""  # None: a multi-byte character is still incomplete

    def finish(self) -> str:
        """The rest of the text at the end of generation: what was held back as a possible stop string."""
        if self.stopped:
            return ""
        out, self._held = self._held, ""
        self.text += out
        return out

    def _cut(self, piece: str) -> str:
        buf = self._held + piece
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            out = buf[:min(hits)]
        else:
            hold = max((k for s in self.stop for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
            out, self._held = buf[:len(buf) - hold], buf[len(buf) - hold:]
        self.text += out
        return out


# ---------------------------------------------------------------------------------------------------------
# Metrics.


class Metrics:
    """Counters and recent latencies for /metrics (thread-safe: the engine thread and the HTTP loop both write)."""

    def __init__(self, window: int = 1000):
        self._lock = threading.Lock()
        self.started = time.time()
        self.counters: dict[str, int] = {}
        self._latency = deque(maxlen=window)  # seconds from submit to the last token
        self._ttft = deque(maxlen=window)  # seconds from submit to the first token
        self._decode_tps = deque(maxlen=window)  # tokens per second after the first token

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def observe(self, latency: float, ttft: float | None, tokens: int) -> None:
        with self._lock:
            self._latency.append(latency)
            if ttft is not None:
                self._ttft.append(ttft)
                if tokens > 1 and latency > ttft:
                    self._decode_tps.append((tokens - 1) / (latency - ttft))

    @staticmethod
    def _summary(values) -> dict:
        if not values:
            return {"count": 0}
        v = sorted(values)
        pick = lambda q: round(v[min(len(v) - 1, int(q * len(v)))], 4)  # noqa: E731
        return {"count": len(v), "mean": round(sum(v) / len(v), 4), "p50": pick(0.5), "p95": pick(0.95),
                "max": round(v[-1], 4)}

    def snapshot(self) -> dict:
        with self._lock:
            return {"uptime_s": round(time.time() - self.started, 1), "counters": dict(sorted(self.counters.items())),
                    "latency_s": self._summary(self._latency), "time_to_first_token_s": self._summary(self._ttft),
                    "decode_tokens_per_s": self._summary(self._decode_tps)}


# ---------------------------------------------------------------------------------------------------------
# Requests and the worker.

_ids = itertools.count(1)


class Handle:
    """One submitted generation: iterate it (sync) or `async for` over `aiter()` to get its events.

    Events are ("text", str), then exactly one of ("done", finish_reason) or ("error", message).
    finish_reason is "stop" (end of turn or a stop string), "length" (max_new_tokens) or "cancelled".
    """

    def __init__(self, prompt_tokens: int, loop: asyncio.AbstractEventLoop | None):
        self.id = next(_ids)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.text = ""
        self._cancel = threading.Event()
        self._loop = loop
        self._q: Any = asyncio.Queue() if loop is not None else queue.Queue()

    def cancel(self) -> None:
        """Stop generating at the next token (a no-op once finished)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _emit(self, kind: str, value: str) -> None:
        if self._loop is None:
            self._q.put((kind, value))
            return
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self._cancel.set()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        assert self._loop is None, "submitted with an event loop: use `async for ... in handle.aiter()`"
        while True:
            kind, value = self._q.get()
            yield kind, value
            if kind != "text":
                return

    async def aiter(self, poll_s: float | None = None):
        """Events as an async iterator; with `poll_s`, also yields ("idle", "") when nothing came for that long."""
        assert self._loop is not None, "submitted without an event loop: iterate the handle directly"
        while True:
            try:
                kind, value = await asyncio.wait_for(self._q.get(), poll_s)
            except asyncio.TimeoutError:
                yield "idle", ""
                continue
            yield kind, value
            if kind != "text":
                return


@dataclass
class _Request:
    handle: Handle
    loaded: LoadedModel
    prompt_ids: list[int]
    params: Any  # lib.generate.SamplingParams
    stop: list[str]
    submitted: float


@dataclass
class _Active:
    req: _Request
    tokens: Iterator[int]
    text: TextStream
    first_token_at: float | None = None


class Engine:
    """Owns the loaded model; `submit` queues a generation and returns its Handle at once."""

    def __init__(self, loaded: LoadedModel, max_active: int = 4, max_queue: int = 64, metrics: Metrics | None = None,
                 engine: str = "auto", max_context: int = 4096):
        self._loaded = loaded
        self.max_active, self.max_queue = max_active, max_queue
        self.engine_choice, self.max_context = engine, max_context  # for models loaded later (the UI's picker)
        self.metrics = metrics or Metrics()
        self._inbox: queue.Queue[_Request | None] = queue.Queue()
        self._active: list[_Active] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self._thread.start()

    @property
    def loaded(self) -> LoadedModel:
        return self._loaded

    def swap(self, loaded: LoadedModel) -> LoadedModel:
        """Serve another model from now on; generations already running finish on the old one."""
        with self._lock:
            old, self._loaded = self._loaded, loaded
        self.metrics.inc("model_swaps")
        return old

    def load(self, ref: ModelRef, device: str | None = None) -> LoadedModel:
        """Load `ref` (in the caller's thread, so serving goes on meanwhile) and swap it in."""
        loaded = load_model(ref, device or self._loaded.device, self.engine_choice, self.max_active, self.max_context)
        self.swap(loaded)
        return loaded

    def pending(self) -> dict:
        out = {"active": len(self._active), "queued": self._inbox.qsize(), "max_active": self.max_active,
               "max_queue": self.max_queue, "engine": self._loaded.engine}
        rounds = getattr(self._loaded.model, "rounds", 0)
        if rounds:  # llama.cpp: how many replies each batched decode advanced, on average
            out["batched_decodes"] = rounds
            out["replies_per_decode"] = round(self._loaded.model.round_sequences / rounds, 2)
        return out

    def submit(self, prompt_ids: list[int], params, stop: Sequence[str] = (), loaded: LoadedModel | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a generation of `params.max_new_tokens` at most after `prompt_ids`.

        Pass `loop` (the running event loop) to consume the events with `async for`; without it iterate the
        handle in a thread. Raises EngineBusy when the queue is full, ContextTooLong when nothing fits.
        """
        loaded = loaded or self._loaded
        if self._closed:
            raise EngineBusy("the server is shutting down")
        if len(prompt_ids) >= loaded.context_length:
            raise ContextTooLong(len(prompt_ids), loaded.context_length)
        if self._inbox.qsize() >= self.max_queue:
            self.metrics.inc("rejected_busy")
            raise EngineBusy(f"{self._inbox.qsize()} requests are already waiting; try again shortly")
        # Never ask for more tokens than the context has room for, and always stop at the end of a turn.
        room = loaded.context_length - len(prompt_ids)
        stop_ids = sorted(set(params.stop_token_ids or []) | set(loaded.stop_token_ids))
        params = replace(params, max_new_tokens=min(params.max_new_tokens, room), stop_token_ids=stop_ids)
        handle = Handle(len(prompt_ids), loop)
        self._inbox.put(_Request(handle, loaded, list(prompt_ids), params, list(stop or ()), time.perf_counter()))
        self.metrics.inc("generations_submitted")
        return handle

    def generate_text(self, prompt_ids: list[int], params, stop: Sequence[str] = ()) -> tuple[str, Handle]:
        """Blocking convenience: the whole reply and its handle (finish_reason, usage)."""
        handle = self.submit(prompt_ids, params, stop)
        for kind, value in handle:
            if kind == "error":
                raise RuntimeError(value)
        return handle.text, handle

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything and stop the worker thread."""
        self._closed = True
        for a in list(self._active):
            a.req.handle.cancel()
        self._inbox.put(None)
        self._thread.join(timeout)

    # -- the worker thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while self._admit():
                for a in list(self._active):
                    self._step(a)  # a finished request leaves self._active inside _step
        for a in list(self._active):
            self._finish(a, "cancelled")
        while True:  # whatever is still queued
            try:
                req = self._inbox.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                req.handle.finish_reason = "cancelled"
                req.handle._emit("done", "cancelled")

    def _admit(self) -> bool:
        """Move queued requests into the active set; block only when there is nothing to do. False = shut down."""
        while len(self._active) < self.max_active:
            try:
                req = self._inbox.get(block=not self._active)
            except queue.Empty:
                return True
            if req is None:
                return False
            if req.handle.cancelled:
                self.metrics.inc("generations_cancelled")
                req.handle.finish_reason = "cancelled"
                req.handle._emit("done", "cancelled")
                continue
            self.metrics.inc("prompt_tokens", len(req.prompt_ids))
            tokens = req.loaded.stream(req.prompt_ids, req.params)
            self._active.append(_Active(req, tokens, TextStream(req.loaded.tokenizer, req.stop)))
        return True

    def _step(self, a: _Active) -> bool:
        """Advance one request by one token; True when it is finished."""
        req, handle = a.req, a.req.handle
        if handle.cancelled:
            self._finish(a, "cancelled")
            return True
        try:
            token = next(a.tokens)
        except StopIteration:
            # lib.generate ends the stream at a stop token (not yielded) or at max_new_tokens.
            self._finish(a, "length" if handle.completion_tokens >= req.params.max_new_tokens else "stop")
            return True
        except Exception as e:  # a bug or out-of-memory must fail this request, not the server
            traceback.print_exc(file=sys.stderr)
            self.metrics.inc("generations_failed")
            self._active.remove(a)
            a.tokens.close()
            handle.finish_reason = "error"
            handle._emit("error", f"generation failed: {type(e).__name__}: {e}")
            return True
        if a.first_token_at is None:
            a.first_token_at = time.perf_counter()
        handle.completion_tokens += 1
        self.metrics.inc("completion_tokens")
        piece = a.text.push(token)
        if piece:
            handle.text += piece
            handle._emit("text", piece)
        if a.text.stopped:
            self._finish(a, "stop")
            return True
        if handle.completion_tokens >= req.params.max_new_tokens:
            self._finish(a, "length")
            return True
        return False

    def _finish(self, a: _Active, reason: str) -> None:
        handle = a.req.handle
        self._active.remove(a)  # before "done" is sent, so that a client who saw it also sees the slot free
        a.tokens.close()  # frees the request's KV cache now, not at garbage collection
        if reason != "cancelled":
            tail = a.text.finish()
            if tail:
                handle.text += tail
                handle._emit("text", tail)
        handle.finish_reason = reason
        now = time.perf_counter()
        ttft = a.first_token_at - a.req.submitted if a.first_token_at else None
        self.metrics.observe(now - a.req.submitted, ttft, handle.completion_tokens)
        self.metrics.inc(f"generations_{'cancelled' if reason == 'cancelled' else 'completed'}")
        handle._emit("done", reason)
