"""The inference engine of HomeLLM: a preallocated KV cache, prefill + one-token decode steps, and sampling.

Used by serving (lib.serving streams tokens from `stream`) and by the training loops (sample printing). It runs
the model in the dtype its weights have: callers load fp32 on CPUs without bf16 matrix units (bf16 matmuls are
emulated there and several times slower, see bench/bench_decode.py) and bf16 where it is fast.

    params = SamplingParams(max_new_tokens=64, temperature=0.8, top_p=0.9, seed=1, stop_token_ids=[eos])
    for token in stream(model, prompt_ids, params):   # tokens as they are produced
        ...
    new_ids = generate(model, prompt_ids, params)     # the same tokens as a list

The same loop decodes any transformers causal LM wrapped as lib.serving.hf_engine.TransformersLM (see decoder_of).

Not here: tokenisation, chat templates, batching several requests (lib.serving interleaves streams).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from lib.errors import UserError
from lib.model.homellm import HomeLLM, ModelArgs


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    # 0 = greedy (argmax); otherwise logits are divided by it before sampling
    temperature: float = 1.0
    # keep only the k most likely tokens (0 or None = off)
    top_k: Optional[int] = 0
    # keep the smallest set of most likely tokens whose probability reaches top_p (1.0 = off)
    top_p: float = 1.0
    # > 1 discourages tokens already in the prompt or the output (transformers' rule: positive logits are
    # divided by it, negative ones multiplied)
    repetition_penalty: float = 1.0
    # generation ends when one of these is sampled; the stop token itself is not returned
    stop_token_ids: Sequence[int] = field(default_factory=list)
    # generation ends when the decoded output contains one of these (needs `decode`); the tokens that complete
    # the stop string are not returned, and tokens that might be the start of one are held back until decided
    stop_strings: Sequence[str] = field(default_factory=list)
    # seed of the sampling generator (None = a fresh random seed)
    seed: Optional[int] = None
    # a GBNF grammar the output must follow (lib.serving.constrain: JSON, a JSON schema); the llama.cpp engine's
    # sampler applies it, and `stream` through the `constraint` lib.serving.loading builds from it
    grammar: Optional[str] = None
    # log-probabilities of the sampled tokens under the model (before penalties, temperature or a grammar), with this
    # many most likely alternatives each (0: the token's own only); None = not wanted. `stream`'s `record` gets them.
    logprobs: Optional[int] = None

    def __post_init__(self):
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            problems.append(f"max_new_tokens: expected an integer >= 0, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            problems.append(f"temperature: expected >= 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 0:
            problems.append(f"top_k: expected >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p: expected a value in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty: expected > 0 (1 = off), got {self.repetition_penalty!r}")
        if problems:
            raise UserError("sampling parameters: " + "; ".join(problems))


class KVCache:
    """Keys and values of every layer, preallocated: `layers[i] = (k, v)`, each (B, n_kv_heads, max_len, head_dim).

    The model writes positions start_pos .. start_pos + T - 1 of each buffer in place (see Attention.forward),
    so decoding never reallocates or concatenates.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype: torch.dtype, device):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.max_len = max_len
        self.layers = [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                       for _ in range(args.n_layers)]


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                seen: Optional[torch.Tensor] = None) -> int:
    """One token id from logits (V,) fp32. seen: (V,) bool, the tokens the repetition penalty applies to."""
    if params.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the tokens before it already reach top_p (the most likely one is always kept)
        drop = (sorted_probs.cumsum(0) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under next-token logits (V,), and the `top` most likely tokens as (id, logprob), best first."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    best = lp.topk(top) if top else None
    return float(lp[token]), ([] if best is None else list(zip(best.indices.tolist(), best.values.tolist())))


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper beginning of a stop string (0 = none)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _homellm_steps(model: HomeLLM, max_len: int) -> Callable[[list[int], int], torch.Tensor]:
    """step(ids, start_pos) -> the next-token logits (V,) after `ids`, which sit at start_pos onwards: one forward
    pass over them with HomeLLM's preallocated cache."""
    weight = model.lm_head.weight
    cache = KVCache(model.args, 1, max_len, weight.dtype, weight.device)

    def step(ids: list[int], start_pos: int) -> torch.Tensor:
        logits, _ = model(torch.tensor([ids], device=weight.device), kv_cache=cache.layers, start_pos=start_pos,
                          last_only=True)
        return logits[0, -1]

    return step


def decoder_of(model) -> tuple[int, int, torch.device, Callable[[int], Callable]]:
    """(context, vocab size, device, steps(max_len)) for HomeLLM, or for any model object that has
    `context_length`, `vocab_size`, `device` and `steps(max_len)` (lib.serving.hf_engine.TransformersLM)."""
    if isinstance(model, HomeLLM):
        return (model.args.max_seq_len, model.args.vocab_size, model.lm_head.weight.device,
                lambda max_len: _homellm_steps(model, max_len))
    return model.context_length, model.vocab_size, model.device, model.steps


@torch.inference_mode()
def stream(model, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None,
           decode: Optional[Callable[[list[int]], str]] = None, constraint=None,
           record: Optional[Callable[[int, float, list], None]] = None) -> Iterator[int]:
    """Yield new token ids one at a time: one prefill pass over the prompt, then one cached step per token.

    Stops at max_new_tokens, a stop token id, a stop string (checked on `decode(new_ids)`), or the model's context:
    a prompt longer than the context keeps its last context - 1 tokens. `model`: see decoder_of. `constraint`
    (lib.serving.constrain.GrammarMask): `apply(logits)` masks what may not come next (None: nothing may, the
    output ends), `accept(token)` follows the sampled token. `record(token, logprob, top)` with params.logprobs:
    each new token's log-probability and the params.logprobs most likely tokens as (id, logprob), best first.
    """
    params = params or SamplingParams()
    if params.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode callback (token ids -> text)")
    prompt = list(prompt_ids)
    if not prompt:
        raise UserError("generation needs a prompt of at least one token (e.g. the BOS token)")
    ctx, vocab, device, steps = decoder_of(model)
    prompt = prompt[-(ctx - 1):]
    max_new = min(params.max_new_tokens, ctx - len(prompt))
    if max_new <= 0:
        return
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()
    stop_ids = set(params.stop_token_ids or ())
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen[torch.tensor(prompt, device=device)] = True

    was_training = model.training
    model.eval()
    try:
        step_fn = steps(len(prompt) + max_new)
        logits = step_fn(prompt, 0)
        pos = len(prompt)
        out: list[int] = []
        emitted = 0  # out[emitted:] is held back: it may be the beginning of a stop string
        for step in range(max_new):
            logits = logits.float()
            raw = logits
            if constraint is not None:
                logits = constraint.apply(logits)
                if logits is None:
                    break
            token = sample_next(logits, params, generator, seen)
            if token in stop_ids:
                return
            if constraint is not None:
                constraint.accept(token)
            if record is not None and params.logprobs is not None:
                record(token, *token_logprobs(raw, token, params.logprobs))
            out.append(token)
            maybe_stop = False
            if params.stop_strings:
                text = decode(out)
                if any(s in text for s in params.stop_strings):
                    return
                maybe_stop = _longest_stop_prefix(text, params.stop_strings) > 0
            if not maybe_stop:
                yield from out[emitted:]
                emitted = len(out)
            if step + 1 == max_new:
                break
            if seen is not None:
                seen[token] = True
            logits = step_fn([token], pos)
            pos += 1
        yield from out[emitted:]  # the output ended on what looked like the start of a stop string
    finally:
        model.train(was_training)


def generate(model, prompt_ids: Sequence[int], params: Optional[SamplingParams] = None,
             decode: Optional[Callable[[list[int]], str]] = None) -> list[int]:
    """The new token ids (the prompt not included) that `stream` yields."""
    return list(stream(model, prompt_ids, params, decode))
