"""Which engine serves a model and what it answers on, declared once: 05_check's verdict names them before
anything is downloaded, lib.serving.loading loads with them, and the tests hold the two to each other.

    llama.cpp      a GGUF file, on the CPU (any architecture llama.cpp knows)
    torch          our HomeLLM: Llama-architecture safetensors that it implements (lib.model.llama_config)
    transformers   every other causal LM transformers loads, through lib.serving.hf_engine.TransformersLM
"""

from __future__ import annotations

from lib.model.llama_config import homellm_problems

SERVED_TASKS = ("text-generation",)
CHAT_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health")


def torch_engine(config: dict) -> str:
    """The engine for safetensors weights with this config.json: "torch" (HomeLLM) or "transformers"."""
    return "transformers" if homellm_problems(config) else "torch"


def planned_engine(task: str, config: dict, has_gguf: bool, device: str = "cpu") -> dict | None:
    """{"engine", "endpoints"} a server started on `device` (auto: llama.cpp for a GGUF on the CPU) will use; None
    for a task 07_serve does not serve."""
    if task not in SERVED_TASKS:
        return None
    engine = "llama.cpp" if has_gguf and device == "cpu" else torch_engine(config)
    return {"engine": engine, "endpoints": list(CHAT_ENDPOINTS)}
