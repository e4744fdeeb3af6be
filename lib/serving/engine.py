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

The decoders behind the token iterators (`LoadedModel.stream`) follow one protocol (lib.serving.engines.Decoder),
picked by `choose_engine` (lib.serving.loading):
- llama.cpp (lib.serving.llamacpp) for a model that has a GGUF file, on a CPU: llama.cpp's own speed, and one
  batched decode per round for all active requests;
- torch and transformers (lib.serving.torch_engine: lib.model.generate.stream, a KV cache per request) for GPUs and
  for models without a GGUF. They also serve a GGUF when llama-cpp-python is missing (converted to HF weights on
  load), and say why that is slower.

Text comes out through `TextStream` (lib.serving.text): UTF-8-complete pieces only, stop strings cut off, and any
text that could be the start of a stop string held back until it is known not to be one.

Not here: loading and choosing the decoder (lib.serving.loading), HTTP (lib.serving.api), the UI (lib.serving.ui),
sampling maths (lib.model.generate).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lib.serving.loading import LoadedModel, load_model
from lib.serving.resolve import ModelRef
from lib.serving.text import ContextTooLong, TextStream


class EngineBusy(Exception):
    """The request queue is full; the caller should retry later (HTTP 503)."""


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
        # with params.logprobs: (token id, logprob, [(id, logprob) of the most likely]) per new token, appended by
        # the worker thread before the token's text is sent
        self.logprobs: list[tuple[int, float, list]] = []
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
            except TimeoutError:
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
    params: Any  # lib.model.generate.SamplingParams
    stop: list[str]
    submitted: float


@dataclass
class _Call:
    """A function to run on the worker thread, between rounds (what needs the model's context to itself)."""
    fn: Any
    future: Any  # concurrent.futures.Future


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

    def call(self, fn) -> concurrent.futures.Future:
        """Run fn(loaded model) on the worker thread, between two rounds of generation (llama.cpp's context is the
        worker's alone); its result or exception comes through the Future."""
        if self._closed:
            raise EngineBusy("the server is shutting down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Call(fn, future))
        return future

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
            if isinstance(req, _Call):
                try:
                    req.future.set_result(req.fn(self._loaded))
                except Exception as e:  # the caller's to report
                    req.future.set_exception(e)
                continue
            if req.handle.cancelled:
                self.metrics.inc("generations_cancelled")
                req.handle.finish_reason = "cancelled"
                req.handle._emit("done", "cancelled")
                continue
            self.metrics.inc("prompt_tokens", len(req.prompt_ids))
            record = (lambda *entry, h=req.handle: h.logprobs.append(entry)) if req.params.logprobs is not None \
                else None
            tokens = req.loaded.stream(req.prompt_ids, req.params, record)
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
            # lib.model.generate ends the stream at a stop token (not yielded) or at max_new_tokens.
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
