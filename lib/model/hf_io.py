"""Our model <-> a Hugging Face Llama directory: config.json, model.safetensors (never pickle), generation_config.json
and the tokenizer files, written atomically; and any Llama-architecture safetensors directory read back into a
HomeLLM (our exports, SmolLM2-135M, ...), with a clear error for what we do not implement.

    save_hf(model, "out/", bos_token_id=1, eos_token_id=2)
    model = load_hf("out/")
    save_model_dir(model, "out/", tokenizer)            # weights + config + tokenizer + generation_config
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from lib.atomic import atomic_file, atomic_write_json
from lib.chat import end_of_turn_ids
from lib.data.tokenizer import save_tokenizer
from lib.errors import UserError
from lib.model.homellm import HomeLLM, ModelArgs, rope_tables
from lib.model.llama_config import homellm_problems

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32, extra: Optional[dict] = None) -> dict:
    """The config.json of a LlamaForCausalLM with these arguments."""
    dtype_name = next(k for k, v in _DTYPES.items() if v == dtype)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        # transformers >= 5 reads rope_parameters; older versions and llama.cpp's converter read rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "rope_theta": args.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,  # the pre-5.0 name of "dtype"
    }
    cfg.update(extra or {})
    return cfg


def save_hf(model: HomeLLM, out_dir: str | Path, extra_config: Optional[dict] = None, *,
            bos_token_id: Optional[int] = None, eos_token_id: int | list[int] | None = None,
            pad_token_id: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Write `out_dir/config.json` and `out_dir/model.safetensors` (each atomically; config last).

    With tied embeddings only `model.embed_tokens.weight` is stored, as transformers does for
    tie_word_embeddings=True. dtype: the stored dtype (default: the model's). extra_config: more config.json keys.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.lm_head.weight.dtype
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()
               if not (model.args.tie_embeddings and name == "lm_head.weight")}
    _atomic_save_safetensors(tensors, out_dir / "model.safetensors")
    extra = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
             **(extra_config or {})}
    atomic_write_json(out_dir / "config.json", hf_config(model.args, dtype, extra))
    return out_dir


def _atomic_save_safetensors(tensors: dict, path: Path) -> None:
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def args_from_hf_config(cfg: dict, where: str = "config.json") -> ModelArgs:
    """ModelArgs from a Llama config.json; UserError for anything we do not implement."""
    problems = homellm_problems(cfg)
    if cfg.get("model_type") != "llama":
        raise UserError(f"{where}: {problems[0]}; HomeLLM loads Llama-architecture models only (model_type 'llama', "
                        "e.g. our exports or SmolLM2): the serving engine 'transformers' serves other types.")
    if problems:
        raise UserError(f"{where}: this Llama variant is not supported: " + "; ".join(problems))
    n_heads = cfg["num_attention_heads"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta") or 10000.0
    return ModelArgs(vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                     n_heads=n_heads, n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                     head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads, ffn_dim=cfg["intermediate_size"],
                     max_seq_len=cfg.get("max_position_embeddings") or 2048, rope_theta=float(theta),
                     norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                     # transformers' LlamaConfig defaults tie_word_embeddings to False
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _read_safetensors(d: Path) -> dict[str, torch.Tensor]:
    if (d / "model.safetensors").is_file():
        files = [d / "model.safetensors"]
    elif (d / "model.safetensors.index.json").is_file():  # sharded checkpoint
        index = json.loads((d / "model.safetensors.index.json").read_text(encoding="utf-8"))
        files = [d / name for name in sorted(set(index["weight_map"].values()))]
    else:
        pickles = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt*"))
        hint = (f" It has {', '.join(pickles)}: pickle files are never loaded (they can run code); convert them to "
                "safetensors with transformers' save_pretrained in a trusted environment.") if pickles else ""
        raise UserError(f"{d}: no model.safetensors (or model.safetensors.index.json) found.{hint}")
    tensors = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: listed in model.safetensors.index.json but missing")
        tensors.update(load_file(str(f)))
    return tensors


def load_hf(path: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> HomeLLM:
    """Load any Llama-architecture HF directory with safetensors weights into a HomeLLM (in eval mode).

    dtype: the parameter dtype (default float32, whatever the file stores). The parsed config.json is kept in
    `model.hf_config` (bos/eos ids for generation).
    """
    d = Path(path)
    if not (d / "config.json").is_file():
        raise UserError(f"{d}: not a model directory (no config.json). Expected a Hugging Face Llama folder "
                        "with config.json and model.safetensors.")
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{d / 'config.json'}:{e.lineno}: invalid JSON ({e.msg})") from None
    args = args_from_hf_config(cfg, str(d / "config.json"))
    tensors = _read_safetensors(d)
    # buffers some older checkpoints store; we recompute them
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some exports store the tied copy too

    with torch.device("meta"):
        model = HomeLLM(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        parts = ([f"missing tensors: {show(missing)}"] if missing else []) + \
                ([f"unexpected tensors: {show(unexpected)}"] if unexpected else []) + \
                (["wrong shapes: " + show([f'{k} {tuple(tensors[k].shape)} != {tuple(expected[k])}' for k in wrong])]
                 if wrong else [])
        raise UserError(f"{d}: the weights do not match config.json: " + "; ".join(parts))

    dtype = dtype or torch.float32
    state = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    if args.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign=True replaced the shared Parameter
    cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    model.hf_config = cfg
    return model.eval()


def write_generation_config(out: Path, tokenizer) -> None:
    atomic_write_json(out / "generation_config.json", {
        "_from_model_config": False, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": end_of_turn_ids(tokenizer),
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id})


def save_model_dir(model, out: Path, tokenizer) -> None:
    """An HF directory: weights + config.json, tokenizer files with the chat template, generation_config.json.
    `model` is a HomeLLM or wraps a transformers model as `.hf` (lib.train.base_model.HFCausalLM)."""
    if isinstance(model, HomeLLM):
        save_hf(model, out, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    else:
        model.hf.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    write_generation_config(out, tokenizer)
