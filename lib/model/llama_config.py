"""Which HF configs HomeLLM implements: the Llama architecture with plain RoPE, SiLU and no biases. Pure dict
inspection (no torch), so 05_check can say which engine will serve a model without loading anything."""

from __future__ import annotations

import json

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def homellm_problems(cfg: dict) -> list[str]:
    """What in a config.json HomeLLM does not implement; [] when it loads the model."""
    if cfg.get("model_type") != "llama":
        return [f"model_type is {cfg.get('model_type')!r}"]
    problems = []
    for key in ("rope_parameters", "rope_scaling"):  # transformers >= 5 / older configs
        rope = cfg.get(key)
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
            problems.append(f"{key} {json.dumps(rope)} (only plain RoPE, rope_type 'default', is implemented)")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg.get('hidden_act')!r} (only 'silu' is implemented)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            problems.append(f"{key}: true (biases are not implemented)")
    return problems + [f"{k}: missing" for k in REQUIRED if not isinstance(cfg.get(k), int)]
