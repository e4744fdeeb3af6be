"""The torch engines' decoder: a torch causal LM — our HomeLLM (engine "torch") or transformers' own class for any
other architecture (engine "transformers", lib.serving.hf_engine.TransformersLM) — behind the Decoder protocol that
the engine thread calls (lib.serving.engines), decoded by our sampling loop (lib.model.generate.stream).

    decoder = TorchDecoder(net, tokenizer, stop_ids)
    for token in decoder.stream(prompt_ids, params): ...
    logprobs, tops = decoder.score(ids, top=5)

Not here: loading (lib.serving.loading), the sampling maths and the KV cache (lib.model.generate).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lib.model.generate import decoder_of, stream
from lib.serving.constrain import GrammarMask


class TorchDecoder:
    def __init__(self, net, tokenizer, stop_token_ids: list[int]):
        self.net, self.tokenizer, self.stop_token_ids = net, tokenizer, list(stop_token_ids)
        self.context_length, self.vocab_size, self.device, _ = decoder_of(net)

    def num_params(self) -> int:
        return self.net.num_params()

    def stream(self, prompt_ids: list[int], params, record=None) -> Iterator[int]:
        """lib.model.generate.stream, through a GrammarMask when params has a grammar (built at the first token, so
        that a bad grammar fails its request, not the engine's thread)."""
        constraint = None
        if params.grammar:
            constraint = GrammarMask(params.grammar, self.tokenizer, self.vocab_size, self.stop_token_ids)
        yield from stream(self.net, prompt_ids, params, constraint=constraint, record=record)

    @torch.inference_mode()
    def score(self, ids: list[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """log p(ids[i] | ids[:i]) for i >= 1, and the `top` most likely next tokens at every position: one forward
        pass over the whole prompt."""
        x = torch.tensor([ids], device=self.device)
        logits = self.net.hf(input_ids=x).logits if hasattr(self.net, "hf") else self.net(x)[0]
        lp = torch.log_softmax(logits[0].float(), dim=-1)  # (T, vocab)
        target = lp[:-1].gather(1, x[0, 1:, None])[:, 0]
        values, indices = lp.topk(max(top, 1), dim=-1)
        return target.tolist(), [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]

    def close(self) -> None:
        pass
