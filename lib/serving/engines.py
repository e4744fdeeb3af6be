"""Engines: what runs a model, declared once. lib/handlers.py says which engine serves a model of each kind
(Handler.engine, which also names the pip distributions a kind's environment needs); this registry says what each
engine is and the function that loads a model of each kind it serves (named as "module:function", imported when
first used, so that a serving environment imports only the engines it uses).

Every chat engine hands the engine thread (lib.serving.engine) a decoder with one protocol, Decoder; the other kinds
load into lib.serving.task_models' classes (embed, classify, rerank, transcribe).

    load = loader("llama.cpp", "chat")          # lib.serving.loading.load_llamacpp
    loaded = load(ref, device, note, max_active, max_context)

Adding a kind of model = one Handler in lib/handlers.py + one engine here (or a loader for the new kind on an engine
that exists), whose loader returns a decoder (chat) or a TaskModel.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol


class Decoder(Protocol):
    """What a chat engine's model does for the engine thread (which alone calls it)."""

    def stream(self, prompt_ids: list[int], params, record=None) -> Iterator[int]:
        """New token ids after the prompt (lib.model.generate.stream's contract: stop ids not yielded; `record`
        gets each token's log-probabilities when params.logprobs is set; params.grammar is followed)."""

    def score(self, ids: list[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """log p(ids[i] | ids[:i]) for i >= 1, and the `top` most likely next tokens at every position."""

    def close(self) -> None:
        """Free what it holds now (a llama.cpp context), not at garbage collection."""


@dataclass(frozen=True)
class EngineSpec:
    name: str
    loaders: dict[str, str]  # handler kind -> "module:function" that loads a model of that kind with this engine


# Loader signatures by kind: chat (ref, device, note, max_active, max_context) -> lib.serving.loading.LoadedModel;
# every other kind (ref, folder, config, device) -> lib.serving.task_models.TaskModel.
ENGINES: dict[str, EngineSpec] = {e.name: e for e in (
    # our own model (HomeLLM, Llama-compatible), decoded by lib.model.generate: GPUs, and CPUs without a GGUF
    EngineSpec("torch", {"chat": "lib.serving.loading:load_homellm"}),
    # transformers' own classes: every other causal LM, sequence classifiers
    EngineSpec("transformers", {"chat": "lib.serving.loading:load_transformers",
                                "classifier": "lib.serving.task_models:load_classifier"}),
    # GGUF files on the CPU, one batched decode per round for every active request
    EngineSpec("llama.cpp", {"chat": "lib.serving.loading:load_llamacpp",
                             "embedding": "lib.serving.task_models:load_gguf_embedder"}),
    # embedding models (bi-encoders) and rerankers (cross-encoders)
    EngineSpec("sentence-transformers", {"embedding": "lib.serving.task_models:load_embedder",
                                         "reranker": "lib.serving.task_models:load_reranker"}),
    # Whisper in CTranslate2's format (an HF Whisper is converted at install)
    EngineSpec("faster-whisper", {"speech": "lib.serving.task_models:load_transcriber"}),
)}


def loader(engine: str, kind: str) -> Callable:
    """The function that loads a `kind` model with `engine`; KeyError when that engine does not serve that kind."""
    spec = ENGINES[engine]
    if kind not in spec.loaders:
        raise KeyError(f"engine {engine} serves {', '.join(spec.loaders)}, not {kind}")
    module, _, name = spec.loaders[kind].partition(":")
    return getattr(importlib.import_module(module), name)
