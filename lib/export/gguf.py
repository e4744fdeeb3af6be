"""HF llama directory -> GGUF file (llama.cpp / Ollama format), f16 or Q8_0, written with the `gguf` package.

    info = write_gguf("artifacts/04_sft/<h>", "out/homellm-q8_0.gguf", "q8_0", name="homellm")

Reads config.json, the safetensors weights and tokenizer.json straight from the directory (no model object), maps
the Llama tensor names to llama.cpp's, permutes the rows of the Q/K projections into the pair-interleaved rotary
layout llama.cpp's llama rope uses, and stores the byte-level BPE tokenizer (tokens, types, merges, special ids,
chat template) as metadata. Only the llama architecture with a byte-level BPE tokenizer is supported; anything else is
a UserError saying so. The reverse direction (GGUF -> HF) is lib/export/convert.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lib.atomic import atomic_file
from lib.errors import UserError
from lib.model.hf_io import args_from_hf_config

QTYPES = ("f16", "q8_0")
Q8_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values (one fp16 scale per block)

# HF Llama weight name (after "model.layers.{i}.") -> llama.cpp tensor name (after "blk.{i}.")
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def rope_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotary layout -> llama.cpp's. Within each head, HF rotates dimension j with j + head_dim/2 (rotate_half);
    llama.cpp's llama rope rotates adjacent pairs (2j, 2j+1). Reordering the output rows of W_q/W_k as
    [0, h/2, 1, h/2+1, ...] makes the two compute the same attention scores."""
    out_dim = w.shape[0]
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; expected an HF model directory with config.json, model.safetensors and "
                        f"tokenizer.json") from None


def weight_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in _read_json(index)["weight_map"].values()})
    raise UserError(f"{model_dir}: no model.safetensors (or model.safetensors.index.json); expected an HF model "
                    "directory saved with safetensors")


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of the directory as float32 numpy arrays (safetensors: no pickle)."""
    import torch
    from safetensors import safe_open

    out = {}
    for f in weight_files(model_dir):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k).to(torch.float32).numpy()
    return out


# ---------------------------------------------------------------------------------------------------------
# Tokenizer metadata.


def pre_tokenizer_type(tok_json: dict) -> str:
    """llama.cpp's name for the way the text is split before BPE. Ours and GPT-2's: the GPT-2 regex inside
    ByteLevel ("gpt-2"); SmolLM2's: single digits first, then the GPT-2 regex ("smollm")."""
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex")) for p in pre["pretokenizers"]]
        if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
            return "smollm"
    raise UserError(f"tokenizer.json: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent known to the "
                    "GGUF export (supported: GPT-2 style byte-level BPE)")


def tokenizer_metadata(model_dir: Path, vocab_size: int) -> dict:
    """Tokens (by id), token types, merges, special ids and chat template of a byte-level BPE tokenizer."""
    from gguf import TokenType

    tok_json = _read_json(model_dir / "tokenizer.json")
    tok_cfg = _read_json(model_dir / "tokenizer_config.json")
    model = tok_json.get("model", {})
    decoder = json.dumps(tok_json.get("decoder"))
    if model.get("type") != "BPE" or "ByteLevel" not in decoder:
        raise UserError(f"{model_dir}/tokenizer.json: a {model.get('type')} tokenizer; the GGUF export supports "
                        "byte-level BPE (GPT-2 style) tokenizers only")
    tokens: list = [None] * vocab_size
    types = [int(TokenType.NORMAL)] * vocab_size
    for text, i in model["vocab"].items():
        if i >= vocab_size:
            raise UserError(f"{model_dir}: the tokenizer has token id {i} but the model's vocab_size is {vocab_size}")
        tokens[i] = text
    for added in tok_json.get("added_tokens", []):
        i = added["id"]
        if i >= vocab_size:
            raise UserError(f"{model_dir}: the tokenizer has token id {i} but the model's vocab_size is {vocab_size}")
        tokens[i] = added["content"]
        types[i] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:  # embedding rows beyond the tokenizer (vocab padded to a multiple): never produced
            tokens[i] = f"[PAD{i}]"
            types[i] = int(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}

    def special(name: str):
        value = tok_cfg.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if isinstance(value, str) else None

    template = tok_cfg.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_type(tok_json),
            "bos": special("bos_token"), "eos": special("eos_token"), "pad": special("pad_token"),
            "unk": special("unk_token"), "im_end": vocab.get("<|im_end|>"), "chat_template": template,
            "add_bos": bool(tok_cfg.get("add_bos_token", False))}


# ---------------------------------------------------------------------------------------------------------
# The writer.


def llama_hparams(cfg: dict, where: str = "config.json") -> dict:
    """The hyper-parameters the GGUF writer needs, read by the same parser that loads a Llama directory into our
    model (lib.model.hf_io), so what cannot be loaded cannot be exported either."""
    a = args_from_hf_config(cfg, where)
    return {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
            "ffn_dim": a.ffn_dim, "head_dim": a.head_dim, "ctx": a.max_seq_len, "eps": a.norm_eps,
            "theta": a.rope_theta, "vocab": a.vocab_size, "tied": a.tie_embeddings}


def gguf_tensors(weights: dict[str, np.ndarray], hp: dict) -> dict[str, np.ndarray]:
    """llama.cpp name -> float32 array, Q/K rows permuted, the output matrix left out when tied."""
    out = {}
    for name, w in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some checkpoints carry; llama.cpp computes it
        if name in TOP_NAMES:
            target = TOP_NAMES[name]
            if target == "output.weight" and hp["tied"]:
                continue
        elif name.startswith("model.layers."):
            idx, rest = name[len("model.layers."):].split(".", 1)
            if rest not in LAYER_NAMES:
                raise UserError(f"weights: unexpected tensor {name!r} for a llama model")
            target = f"blk.{int(idx)}.{LAYER_NAMES[rest]}"
            if rest == "self_attn.q_proj.weight":
                w = rope_permute(w, hp["n_heads"])
            elif rest == "self_attn.k_proj.weight":
                w = rope_permute(w, hp["n_kv_heads"])
        else:
            raise UserError(f"weights: unexpected tensor {name!r} for a llama model")
        out[target] = w
    if "token_embd.weight" not in out:
        raise UserError("weights: no model.embed_tokens.weight")
    if not hp["tied"] and "output.weight" not in out:
        out["output.weight"] = out["token_embd.weight"]  # untied config but no lm_head saved: it equals the embedding
    return out


def write_gguf(model_dir: str | Path, out_path: str | Path, qtype: str, name: str) -> dict:
    """Write `model_dir` (an HF llama directory) as a GGUF file; returns what was written (for the manifest)."""
    import gguf

    if qtype not in QTYPES:
        raise UserError(f"export.gguf: {qtype!r} is not supported; expected one of {', '.join(QTYPES)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    hp = llama_hparams(_read_json(model_dir / "config.json"), str(model_dir / "config.json"))
    tok = tokenizer_metadata(model_dir, hp["vocab"])
    tensors = gguf_tensors(load_weights(model_dir), hp)

    with atomic_file(out_path) as tmp:  # a GGUF appears whole or not at all
        writer = gguf.GGUFWriter(str(tmp), arch="llama")
        writer.add_name(name)
        writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0))
        if qtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(hp["ctx"])
        writer.add_embedding_length(hp["dim"])
        writer.add_block_count(hp["n_layers"])
        writer.add_feed_forward_length(hp["ffn_dim"])
        writer.add_head_count(hp["n_heads"])
        writer.add_head_count_kv(hp["n_kv_heads"])
        writer.add_rope_dimension_count(hp["head_dim"])
        if hp["head_dim"] != hp["dim"] // hp["n_heads"]:
            writer.add_key_length(hp["head_dim"])
            writer.add_value_length(hp["head_dim"])
        writer.add_rope_freq_base(hp["theta"])
        writer.add_layer_norm_rms_eps(hp["eps"])
        writer.add_vocab_size(hp["vocab"])

        writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        writer.add_tokenizer_pre(tok["pre"])
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
        for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                         ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
            if tok[key] is not None:
                add(tok[key])
        if tok["im_end"] is not None and tok["im_end"] != tok["eos"]:
            writer.add_eot_token_id(tok["im_end"])  # llama.cpp ends generation at eot as well as eos
        writer.add_add_bos_token(tok["add_bos"])
        writer.add_add_eos_token(False)
        if tok["chat_template"]:
            writer.add_chat_template(tok["chat_template"])

        counts = {"F32": 0, "F16": 0, "Q8_0": 0}
        for tname, w in tensors.items():
            if w.ndim == 1:  # norms stay float32, as llama.cpp keeps them
                writer.add_tensor(tname, w.astype(np.float32))
                counts["F32"] += 1
            elif qtype == "q8_0" and w.shape[-1] % Q8_BLOCK == 0:
                q = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(tname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                counts["Q8_0"] += 1
            else:  # f16, or a row length Q8_0 blocks do not divide
                writer.add_tensor(tname, w.astype(np.float16))
                counts["F16"] += 1
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return {"file": out_path.name, "type": qtype, "bytes": out_path.stat().st_size, "tensors": counts,
            "pre_tokenizer": tok["pre"], "vocab": hp["vocab"]}
