"""The transformers engine: any causal LM that transformers loads (Qwen, Mistral, Phi, Gemma, GPT-2, OLMo …),
decoded by our sampling loop (lib.model.generate.stream) with the model's own KV cache.

Our own Llama-family models are served by HomeLLM instead (faster on a CPU, bench/bench_decode.py); a model with a
GGUF file by llama.cpp. This engine is what serves everything else from safetensors.

    lm = TransformersLM.load(hf_dir, device="cpu", dtype=torch.float32)
    for token in stream(lm, prompt_ids, params): ...
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from lib.errors import UserError


class TransformersLM:
    """A transformers causal LM behind the interface lib.model.generate.stream decodes: `context_length`,
    `vocab_size`, `device` and `steps(max_len)` (one forward pass per call, the cache carried between calls)."""

    def __init__(self, hf_model, context_length: int):
        self.hf = hf_model
        self.context_length = int(context_length)
        self.vocab_size = int(hf_model.get_output_embeddings().weight.shape[0])
        self.device = next(hf_model.parameters()).device
        self._keep_one = "logits_to_keep" in inspect.signature(hf_model.forward).parameters

    @classmethod
    def load(cls, hf_dir: Path, device: str, dtype: torch.dtype) -> TransformersLM:
        """Safetensors weights only, and never the model's own Python code (no trust_remote_code)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(str(hf_dir))
            model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, use_safetensors=True)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{hf_dir}: transformers cannot load this model as a causal LM ({type(e).__name__}: "
                            f"{e})") from None
        model.to(device).eval()
        context = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                   or 2048)
        return cls(model, context)

    # lib.model.generate.stream switches the model's mode around decoding
    @property
    def training(self) -> bool:
        return self.hf.training

    def eval(self):
        self.hf.eval()
        return self

    def train(self, mode: bool = True):
        self.hf.train(mode)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.hf.parameters())

    def steps(self, max_len: int):
        """step(ids, start_pos) -> next-token logits (V,) after `ids` (positions start_pos onwards)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.hf.config)
        extra = {"logits_to_keep": 1} if self._keep_one else {}

        def step(ids: list[int], start_pos: int) -> torch.Tensor:
            assert cache.get_seq_length() == start_pos, "steps must follow each other"
            out = self.hf(input_ids=torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True,
                          **extra)
            return out.logits[0, -1]

        return step
