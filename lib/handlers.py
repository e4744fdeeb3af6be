"""One handler per kind of model, declared once: what 05_check promises, what 06_install does, what 07_serve loads
and answers on, what the UI shows and how the model is fine-tuned all read this table, and the tests hold each to it.

    chat        causal LMs of any architecture: GGUF through llama.cpp (CPU), our HomeLLM (Llama) through torch,
                every other through transformers' generic classes            /v1/chat/completions, /v1/completions
    embedding   sentence-transformers / BERT-style encoders (safetensors);   /v1/embeddings
                GGUF embedding models (BERT, nomic-bert, ...) through llama.cpp
    classifier  *ForSequenceClassification with labels                      /v1/classify
    reranker    cross-encoders (a sequence classifier with one output)      /v1/rerank
    speech      Whisper through faster-whisper: CTranslate2 folders as they   /v1/audio/transcriptions
                are, Hugging Face folders converted to CTranslate2 at install

A kind is picked from the detection (lib.check.detect: task and loader) and the model's config, never its name.
"""

from __future__ import annotations

from dataclasses import dataclass

from lib.model.llama_config import homellm_problems

COMMON_ENDPOINTS = ("/v1/models", "/health")
POST_TEST_TEXT = "Hello! What is the capital of France?"


@dataclass(frozen=True)
class Handler:
    kind: str
    title: str  # what the UI tab and `06_install.py list` call it
    library: str  # the engine that runs it (chat: picked per model, see engine())
    endpoints: tuple[str, ...]
    requires: tuple[str, ...]  # pip distributions the server needs for it (beyond the base runtime)
    cli: str  # how 07_serve answers once on the command line
    post_test: dict  # the post-install test's request to the install's running server: its endpoint (the first of
    #                  `endpoints`) and JSON body; "SPEECH" stands for a spoken clip (lib.install.scripts)
    finetune: str | None  # how an installed model of this kind is fine-tuned ("lora-sft"), None: not offered

    def engine(self, config: dict, has_gguf: bool, device: str = "cpu") -> str:
        """The engine a server started on `device` uses for a model with this config.json (and a GGUF or not)."""
        if self.kind == "chat":
            return "llama.cpp" if has_gguf and device == "cpu" else torch_engine(config)
        if self.kind == "embedding" and has_gguf and not config.get("model_type"):
            return "llama.cpp"  # a GGUF embedding model (no HF folder beside it)
        return self.library


HANDLERS = {h.kind: h for h in (
    Handler("chat", "Chat", "torch", ("/v1/chat/completions", "/v1/completions"),
            # llguidance: constrained output on the torch engines; the rest: train.sh's LoRA SFT with the pipeline's loop
            ("llguidance", "peft", "accelerate", "tensorboard", "matplotlib"),
            "--prompt TEXT", {"messages": [{"role": "user", "content": POST_TEST_TEXT}]}, "lora-sft"),
    Handler("embedding", "Embeddings", "sentence-transformers", ("/v1/embeddings",), ("sentence-transformers",),
            "--prompt TEXT (prints the vector as JSON)", {"input": POST_TEST_TEXT}, None),
    Handler("classifier", "Classify", "transformers", ("/v1/classify",), (),
            "--prompt TEXT (prints the labels with scores)", {"input": POST_TEST_TEXT}, None),
    Handler("reranker", "Rerank", "sentence-transformers", ("/v1/rerank",), ("sentence-transformers",),
            "--prompt QUERY --documents DOC [DOC ...]",
            {"query": "capital of France", "documents": ["Paris is the capital of France.", "Bananas are yellow."]},
            None),
    Handler("speech", "Transcribe", "faster-whisper", ("/v1/audio/transcriptions",), ("faster-whisper",),
            "--audio FILE (prints the transcript)", {"file": "SPEECH"}, None),
)}


def torch_engine(config: dict) -> str:
    """The engine for causal-LM safetensors with this config.json: "torch" (HomeLLM) or "transformers"."""
    return "transformers" if homellm_problems(config) else "torch"


def is_reranker(config: dict) -> bool:
    """A sequence classifier with a single output is a relevance scorer (cross-encoder), not a labeller."""
    labels = config.get("id2label")
    n = config.get("num_labels") or (len(labels) if isinstance(labels, dict) else None)
    return n == 1 or "sentence_transformers" in config and n in (None, 1)


def is_hf_whisper(config: dict, loader: str | None) -> bool:
    """Whisper in Hugging Face format: the install converts it to CTranslate2's format (faster-whisper's)."""
    return loader == "transformers" and config.get("model_type") == "whisper"


def handler_for(task: str, config: dict, loader: str | None = None) -> Handler | None:
    """The handler that serves a model detected as `task` (with this config.json and loader); None: not served."""
    if task == "text-generation":
        return HANDLERS["chat"]
    if task == "embedding":
        return HANDLERS["embedding"]
    if task == "text-classification":
        return HANDLERS["reranker" if is_reranker(config) else "classifier"]
    if task == "automatic-speech-recognition" and (loader == "faster-whisper" or is_hf_whisper(config, loader)):
        return HANDLERS["speech"]
    return None


def planned_engine(task: str, config: dict, has_gguf: bool, device: str = "cpu",
                   loader: str | None = None) -> dict | None:
    """{"kind", "engine", "endpoints"} a server started on `device` (auto: llama.cpp for a GGUF on the CPU) will
    use; None for a model no handler serves."""
    h = handler_for(task, config, loader)
    if h is None or (h.kind not in ("chat", "embedding") and has_gguf and not config.get("model_type")):
        return None  # a GGUF of a classifier or reranker: llama.cpp reads them, we do not serve them from one
    return {"kind": h.kind, "engine": h.engine(config, has_gguf, device),
            "endpoints": [*h.endpoints, *COMMON_ENDPOINTS]}
