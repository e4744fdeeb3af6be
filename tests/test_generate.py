"""lib.model.generate: the KV-cache engine gives transformers' greedy tokens on the same exported weights; stops,
seeds, top-k/top-p, repetition penalty, stop strings and streaming behave as documented."""

import pytest
import torch
from test_model import VOCAB, greedy_no_cache, hf_load, tiny

from lib.errors import UserError
from lib.model.generate import KVCache, SamplingParams, generate, stream
from lib.model.hf_io import save_hf

PROMPT = [5, 17, 3, 88, 41, 7, 7, 60]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def letters(ids: list[int]) -> str:
    """A stand-in tokenizer's decode: token i is one letter."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    return tiny()  # GQA (4 heads, 2 kv heads), tied embeddings, context 128


@pytest.fixture(scope="module")
def greedy(model):
    return generate(model, PROMPT, SamplingParams(max_new_tokens=40, temperature=0))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "n_kv_heads": 4}])
def test_greedy_equals_transformers_generate(tmp_path, overrides):
    ours_model = tiny(**overrides)
    save_hf(ours_model, tmp_path, bos_token_id=1, eos_token_id=2)
    theirs = hf_load(tmp_path)
    for prompt in (PROMPT, [9]):
        ours = generate(ours_model, prompt, SamplingParams(max_new_tokens=60, temperature=0))
        with torch.no_grad():
            ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == ref
        assert len(set(ours)) > 5


def test_repetition_penalty_equals_transformers(tmp_path, model):
    save_hf(model, tmp_path)
    theirs = hf_load(tmp_path)
    ours = generate(model, PROMPT, SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=1.8))
    with torch.no_grad():
        ref = theirs.generate(torch.tensor([PROMPT]), max_new_tokens=30, do_sample=False, repetition_penalty=1.8,
                              eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == ref
    assert ours != generate(model, PROMPT, SamplingParams(max_new_tokens=30, temperature=0))


def test_cache_matches_full_forward(model, greedy):
    """Prefill in two chunks (the second one needs the explicit mask) and single steps give the full pass's logits;
    so does the last-row-only prefill the engine runs."""
    ids = torch.tensor([PROMPT + greedy[:12]])  # (1, 20)
    with torch.no_grad():
        full, _ = model(ids)
        cache = KVCache(model.args, 1, 32, torch.float32, "cpu")
        a, _ = model(ids[:, :7], kv_cache=cache.layers, start_pos=0)
        b, _ = model(ids[:, 7:15], kv_cache=cache.layers, start_pos=7)
        steps = [model(ids[:, i:i + 1], kv_cache=cache.layers, start_pos=i)[0] for i in range(15, 20)]

        cache = KVCache(model.args, 1, 32, torch.float32, "cpu")
        last, _ = model(ids[:, :9], kv_cache=cache.layers, start_pos=0, last_only=True)
        last2, _ = model(ids[:, 9:20], kv_cache=cache.layers, start_pos=9, last_only=True)
        plain, _ = model(ids, last_only=True)
    # equal up to fp32 rounding (different attention kernels sum in different orders), relative to the logits' scale
    tol = dict(atol=1e-5 * full.abs().max().item(), rtol=0)
    torch.testing.assert_close(torch.cat([a, b, *steps], dim=1), full, **tol)
    assert last.shape == last2.shape == plain.shape == (1, 1, VOCAB)
    torch.testing.assert_close(torch.cat([last, last2, plain]), full[:, [8, 19, 19]].transpose(0, 1), **tol)
    assert greedy == greedy_no_cache(model, PROMPT, 40)


def test_decode_fast_path_matches_linear(model, greedy):
    """Decoding splits each one-row matmul across two cores (lib.model.homellm.project); with one thread it does not.
    Both give nn.Linear's result up to fp32 rounding, and the same tokens."""
    from lib.model.homellm import project

    threads = torch.get_num_threads()
    layer = model.model.layers[0].mlp.gate_proj
    x = torch.randn(1, 1, layer.in_features)
    try:
        torch.set_num_threads(2)
        torch.testing.assert_close(project(layer, x), layer(x), atol=1e-6, rtol=1e-5)
        two = generate(model, PROMPT, SamplingParams(max_new_tokens=40, temperature=0))
        torch.set_num_threads(1)
        one = generate(model, PROMPT, SamplingParams(max_new_tokens=40, temperature=0))
    finally:
        torch.set_num_threads(threads)
    assert one == two == greedy


def test_stop_token_ends_generation(model, greedy):
    k = next(i for i in range(5, len(greedy)) if greedy[i] not in greedy[:i])  # a token's first appearance
    out = generate(model, PROMPT, SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[999, greedy[k]]))
    assert out == greedy[:k]


def test_max_new_tokens_and_context_limit(model, greedy):
    assert generate(model, PROMPT, SamplingParams(max_new_tokens=7, temperature=0)) == greedy[:7]
    assert generate(model, PROMPT, SamplingParams(max_new_tokens=0)) == []
    ctx = model.args.max_seq_len
    long_prompt = (PROMPT * 40)[:ctx + 10]
    # the prompt keeps its last ctx - 1 tokens, which leaves room for exactly one new token
    out = generate(model, long_prompt, SamplingParams(max_new_tokens=5, temperature=0))
    assert out == greedy_no_cache(model, long_prompt[-(ctx - 1):], 1)


def test_seeded_sampling_is_reproducible(model):
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=11)
    first = generate(model, PROMPT, params)
    assert generate(model, PROMPT, params) == first
    assert generate(model, PROMPT, SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=12)) != first


def test_top_k_1_and_tiny_top_p_are_greedy(model, greedy):
    assert generate(model, PROMPT, SamplingParams(max_new_tokens=40, temperature=1.5, top_k=1, seed=3)) == greedy
    assert generate(model, PROMPT, SamplingParams(max_new_tokens=40, temperature=1.5, top_p=1e-6, seed=3)) == greedy


def test_top_k_restricts_the_choice(model):
    """With top_k=2 every sampled token is one of the two most likely at its step."""
    out = generate(model, PROMPT, SamplingParams(max_new_tokens=25, temperature=5.0, top_k=2, seed=0))
    ids = list(PROMPT)
    with torch.no_grad():
        for t in out:
            top2 = model(torch.tensor([ids]))[0][0, -1].topk(2).indices.tolist()
            assert t in top2
            ids.append(t)
    assert len(set(out)) > 3


def test_stream_yields_the_same_tokens(model):
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_k=20, seed=5)
    it = stream(model, PROMPT, params)
    assert iter(it) is it  # a real iterator: tokens arrive one at a time
    first = next(it)
    assert [first, *it] == generate(model, PROMPT, params)


def test_stop_strings(model, greedy):
    text = letters(greedy)
    k = next(i for i in range(4, 30) if text[i:i + 2] not in text[:i + 1])
    stop = text[k:k + 2]  # completed by greedy[k + 1]
    out = generate(model, PROMPT, SamplingParams(max_new_tokens=40, temperature=0, stop_strings=[stop]), letters)
    assert out == greedy[:k]
    # a stop string that only starts to match is held back, then released: the output is unchanged
    never = text[k] + "#"
    tokens = list(stream(model, PROMPT, SamplingParams(max_new_tokens=40, temperature=0, stop_strings=[never]),
                         letters))
    assert tokens == greedy
    with pytest.raises(ValueError, match="decode"):
        generate(model, PROMPT, SamplingParams(stop_strings=["x"]))


def test_restores_training_mode_and_runs_in_bf16(model):
    model.train()
    generate(model, PROMPT, SamplingParams(max_new_tokens=3))
    assert model.training
    model.eval()
    half = tiny().to(torch.bfloat16)
    out = generate(half, PROMPT, SamplingParams(max_new_tokens=10, temperature=0))
    assert len(out) == 10 and all(0 <= t < VOCAB for t in out)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_new_tokens=-1),
                                 dict(repetition_penalty=0)])
def test_bad_sampling_params(bad):
    with pytest.raises(UserError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_empty_prompt(model):
    with pytest.raises(UserError, match="at least one token"):
        generate(model, [], SamplingParams())
