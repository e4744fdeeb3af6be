"""The export stage: the HF directory loads in transformers with our logits, the GGUF files (f16, q8_0) load in
transformers and decode greedily exactly like our PyTorch model, the Ollama Modelfile, and the refusals."""

import csv
import json
from pathlib import Path

import pytest
import torch

from lib import ROOT
from lib.config import from_dict, load_config
from lib.errors import UserError
from lib.stages import stage_dir

SMOKE = ROOT / "config" / "smoke.yaml"
# Long answers to the export check prompts, learnt by heart below, so greedy decoding has clear margins and
# quantization noise cannot flip a token: the q8_0 comparison then tests the export, not luck.
ANSWERS = {"Hi! How are you?": "I am well, and the LORD hath blessed the work of my hands this day and for ever.",
           "What is your name?": "My name is Abraham, the son of Terah, and I dwell in the land of Canaan."}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_qa(path: Path) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["question", "answer"], *ANSWERS.items()])
    return path


def export_cfg(tmp: Path, base: Path, *extra):
    return load_config(SMOKE, [
        f"artifacts_dir={tmp / 'artifacts'}", f"sft.base_model={base}",
        f"sft.data=[{{type: files, path: {write_qa(tmp / 'qa.csv')}}}]", "sft.val_fraction=0", "sft.repeat=8",
        "sft.train.seq_len=64", "sft.train.batch_size=4", "sft.train.lr=0.01", "sft.train.min_lr=0.001",
        "sft.train.max_steps=60", "sft.train.eval_every=1000", "sft.train.ckpt_every=1000", "sft.train.log_every=20",
        "sft.train.precision=fp32", "sft.train.sample_prompts=[]", "prefs.enabled=false", *extra])


@pytest.fixture(scope="module")
def exported(tiny_chat_model, tmp_path_factory):
    from lib.export.exporter import run_export
    from lib.train.sft import run_sft

    cfg = export_cfg(tmp_path_factory.mktemp("export"), tiny_chat_model)
    run_sft(cfg)
    out = run_export(cfg)
    return cfg, out, json.loads((out / "manifest.json").read_text())


def ours_greedy(model_dir: Path, prompt: str, n: int) -> tuple[list[int], list[int]]:
    from lib.data.tokenizer import load_tokenizer
    from lib.model.generate import SamplingParams, generate
    from lib.model.hf_io import load_hf

    tok = load_tokenizer(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False)
    return ids, generate(load_hf(model_dir), ids, SamplingParams(max_new_tokens=n, temperature=0))


def test_layout_and_manifest(exported):
    cfg, out, manifest = exported
    assert out == stage_dir(cfg, "04_export")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["Modelfile", "hf", "homellm-f16.gguf", "homellm-q8_0.gguf", "manifest.json"]
    assert [g["type"] for g in manifest["gguf"]] == ["f16", "q8_0"]
    assert all(g["check"]["greedy_match"] for g in manifest["gguf"])  # the stage's own check
    assert manifest["hf"]["max_abs_logit_diff"] < 1e-4


def test_hf_dir_loads_in_transformers_with_our_logits(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lib.chat import CHAT_TEMPLATE
    from lib.model.hf_io import load_hf

    hf = exported[1] / "hf"
    conf = json.loads((hf / "config.json").read_text())
    assert conf["model_type"] == "llama" and "auto_map" not in conf
    tok = AutoTokenizer.from_pretrained(hf, trust_remote_code=False)
    assert tok.chat_template == CHAT_TEMPLATE and tok.model_max_length == conf["max_position_embeddings"] == 256
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    theirs = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=False).eval()
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Hi! How are you?"}],
                                                add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        a = theirs(ids).logits
        b, _ = load_hf(hf)(ids)
    assert torch.allclose(a, b, atol=1e-5)
    # the model learnt its answer: transformers' own generate ends the turn with <|im_end|> from generation_config
    out = theirs.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
    assert tok.decode(out, skip_special_tokens=True) == ANSWERS["Hi! How are you?"]
    assert out[-1] == tok.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_gguf_loads_in_transformers_and_decodes_like_pytorch(exported, qtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lib.export.exporter import hf_greedy

    out = exported[1]
    name = f"homellm-{qtype}.gguf"
    gtok = AutoTokenizer.from_pretrained(str(out), gguf_file=name)
    gmodel = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=name, dtype=torch.float32).eval()
    for prompt, answer in ANSWERS.items():
        ids, ours = ours_greedy(out / "hf", prompt, 24)
        gids = gtok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_dict=False)
        assert gids == ids  # the tokenizer rebuilt from GGUF metadata encodes the chat prompt identically
        theirs = hf_greedy(gmodel, gids, 24)
        assert theirs == ours
        assert gtok.decode(theirs).startswith(answer[:30])  # a confident model: the check is not decided by ties


def test_gguf_metadata(exported):
    import gguf

    out = exported[1]
    tok = json.loads((out / "hf" / "tokenizer.json").read_text())
    for qtype, ftype, matrix_type in (("f16", 1, "F16"), ("q8_0", 7, "Q8_0")):
        r = gguf.GGUFReader(out / f"homellm-{qtype}.gguf")
        f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
        assert f["general.architecture"] == "llama" and f["general.name"] == "homellm" and f["general.file_type"] == ftype
        assert f["llama.block_count"] == 2 and f["llama.embedding_length"] == 64 and f["llama.context_length"] == 256
        assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
        assert len(f["tokenizer.ggml.tokens"]) == 512 and f["tokenizer.ggml.tokens"][3] == "<|im_end|>"
        assert f["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3]  # the special tokens are CONTROL
        assert len(f["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
        assert f["tokenizer.ggml.eos_token_id"] == 0 and f["tokenizer.ggml.eot_token_id"] == 3
        assert f["tokenizer.chat_template"].startswith("{% for message in messages %}")
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
        assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == matrix_type
        assert types["blk.1.ffn_norm.weight"] == types["output_norm.weight"] == "F32"


def test_modelfile(exported):
    out = exported[1]
    text = (out / "Modelfile").read_text()
    lines = text.splitlines()
    assert "FROM ./homellm-q8_0.gguf" in lines and (out / "homellm-q8_0.gguf").is_file()
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|endoftext|>"' in lines
    assert "PARAMETER num_ctx 256" in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.endswith("<|im_start|>assistant\n")
    assert "{{ range .Messages }}" in template.replace("{{- range", "{{ range")
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n" in template
    assert template.count("{{") == template.count("}}")
    opened = sum(template.count(k) for k in ("{{- if", "{{ if", "{{- range", "{{ range"))
    assert opened == template.count("{{ end }}")


def test_rope_permutation_matches_llama_cpp_rotation():
    """Scores with HF's rotate_half rope on the original rows == scores with llama.cpp's adjacent-pair rope on the
    permuted rows: the permutation is what makes the GGUF compute the same attention."""
    from lib.export.gguf import rope_permute

    torch.manual_seed(0)
    n_heads, hd, dim, T = 2, 8, 16, 5
    wq, wk, x = torch.randn(n_heads * hd, dim), torch.randn(n_heads * hd, dim), torch.randn(T, dim)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))  # (hd/2,)
    ang = torch.outer(torch.arange(T).float(), inv)  # (T, hd/2)

    def hf_rope(v):  # (T, hd): pairs (j, j + hd/2)
        a, b = v[:, :hd // 2], v[:, hd // 2:]
        c, s = ang.cos(), ang.sin()
        return torch.cat([a * c - b * s, b * c + a * s], dim=1)

    def cpp_rope(v):  # (T, hd): pairs (2j, 2j + 1)
        a, b = v[:, 0::2], v[:, 1::2]
        c, s = ang.cos(), ang.sin()
        return torch.stack([a * c - b * s, b * c + a * s], dim=2).reshape(T, hd)

    def scores(q_w, k_w, rope):
        q, k = (x @ q_w.t()).view(T, n_heads, hd), (x @ k_w.t()).view(T, n_heads, hd)
        return torch.stack([rope(q[:, h]) @ rope(k[:, h]).t() for h in range(n_heads)])

    pq = torch.from_numpy(rope_permute(wq.numpy(), n_heads))
    pk = torch.from_numpy(rope_permute(wk.numpy(), n_heads))
    assert torch.allclose(scores(wq, wk, hf_rope), scores(pq, pk, cpp_rope), atol=1e-4)
    assert not torch.allclose(scores(wq, wk, hf_rope), scores(wq, wk, cpp_rope), atol=1e-2)  # permuting matters


@pytest.mark.slow
def test_adapter_only_sft_is_merged_at_export(tiny_chat_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from lib.export.exporter import run_export
    from lib.train.sft import run_sft

    common = ["sft.lora.enabled=true", "sft.train.max_steps=6", "export.gguf=[]"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    merged_cfg = export_cfg(tmp_path / "a", tiny_chat_model, *common)
    adapter_cfg = export_cfg(tmp_path / "b", tiny_chat_model, *common, "sft.lora.merge=false")
    merged_dir = run_sft(merged_cfg)
    adapter_dir = run_sft(adapter_cfg)
    assert not (adapter_dir / "model.safetensors").exists() and (adapter_dir / "adapter").is_dir()
    out = run_export(adapter_cfg)
    assert not (out / "Modelfile").exists() and not list(out.glob("*.gguf"))
    ids = torch.tensor([[4, 40, 41, 42, 3]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out / "hf").eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_other_architectures_sft_but_gguf_refuses(tiny_chat_model, tmp_path):
    """A non-Llama base (GPT-2 here) trains through the transformers wrapper and exports as HF; GGUF says why not."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lib.data.tokenizer import load_tokenizer, save_tokenizer
    from lib.export.exporter import run_export
    from lib.train.sft import run_sft

    base = tmp_path / "gpt2"
    tok = load_tokenizer(tiny_chat_model)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2)).save_pretrained(base)
    save_tokenizer(tok, base)
    cfg = export_cfg(tmp_path, base, "sft.train.max_steps=3")
    out = run_sft(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_kind"] == "hf" and json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    with pytest.raises(UserError, match="supports the llama architecture only; set export.gguf: \\[\\]"):
        run_export(cfg)
    lora = export_cfg(tmp_path, base, "sft.lora.enabled=true")
    with pytest.raises(UserError, match="its linear layers are named: .*c_attn"):
        run_sft(lora)


def test_bad_export_name(tmp_path):
    from lib.export.exporter import run_export

    for bad in ("../evil", "a/b", "", ".hidden", "x" * 65, "a b"):
        cfg = from_dict({"export": {"name": bad}, "artifacts_dir": str(tmp_path)})
        with pytest.raises(UserError, match="export.name .*expected 1-64 letters"):
            run_export(cfg)
