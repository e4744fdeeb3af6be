"""The model SFT starts from and trains: our HomeLLM for Llama directories, any other transformers causal LM behind
the same interface (forward -> (logits, loss), generation of a reply), a hub id resolved through lib.hub, 4-bit
QLoRA bases, and LoRA adapters through peft (applied for training, merged for export).

    base_dir = resolve_base_model(cfg)          # the phase-1 output, a local folder or a hub id
    model, kind = load_base(base_dir)           # ("homellm" | "transformers")
    model = apply_lora(model, cfg.sft.lora, n_params)
    new_ids, ended = reply_ids(model, prompt_ids, 64, stop_ids)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from lib.artifacts import require_stage
from lib.config import Config
from lib.errors import UserError
from lib.hub import endpoint, hub_call, offline_reason, require_reachable
from lib.model.generate import SamplingParams, generate
from lib.model.hf_io import load_hf


class HFCausalLM(torch.nn.Module):
    """A transformers causal LM (non-Llama architectures, or a 4-bit QLoRA base) with HomeLLM's training interface:
    forward(idx, targets=None, loss_mask=None) -> (logits, loss)."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def forward(self, idx, targets=None, loss_mask=None):
        logits = self.hf(input_ids=idx).logits  # (B, T, V)
        if targets is None:
            return logits, None
        if loss_mask is not None:
            targets = targets.masked_fill(loss_mask == 0, -100)
        if not bool((targets != -100).any()):  # a fully masked batch: zero loss rather than NaN
            return None, logits.sum() * 0.0
        return None, torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops_per_token(self, seq_len: Optional[int] = None) -> float:
        return 6.0 * self.num_params()  # the matmul term; attention adds a few percent at these lengths

    def set_grad_checkpointing(self, enabled: bool = True):
        if enabled:
            self.hf.gradient_checkpointing_enable()


def _hub_model(name: str) -> Path:
    """A hub model id, from the local HF cache or downloaded (safetensors, configs and tokenizer files only);
    offline or unreachable fails in seconds (lib.hub)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True, endpoint=endpoint()))
    except Exception:  # not in the cache: go to the network below
        pass
    where = f"sft.base_model: {name!r} is not a local directory (relative paths resolve against the config file), " \
            f"so it was looked up on the hub ({endpoint()}), but"
    reason = offline_reason()
    if reason:
        raise UserError(f"{where} it is not in the local HF cache and {reason}. Download it on a connected machine "
                        "(save_pretrained to a folder) and point sft.base_model at that folder")
    require_reachable(where, "use a local model folder")
    return Path(hub_call(lambda: snapshot_download(name, allow_patterns=patterns, endpoint=endpoint()),
                         f"sft.base_model: cannot download {name!r}"))


def resolve_base_model(cfg: Config) -> Path:
    """The directory SFT starts from: the phase-1 output by default, else sft.base_model (a local dir or hub id)."""
    name = cfg.sft.base_model
    if name is None:
        return require_stage(cfg, "03_pretrain", "Run: python 03_pretrain.py (or snakemake pretrained), or set "
                                                 "sft.base_model to an HF model directory.")
    p = Path(name).expanduser()
    if not p.is_absolute():
        p = Path(cfg.base_dir) / p
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"sft.base_model: {p} is not an HF model directory (no config.json); expected a folder "
                            f"with config.json, model.safetensors and tokenizer files")
        return p
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"sft.base_model: {p} does not exist (relative paths resolve against the config file's "
                        f"directory), and {name!r} is not a hub id of the form 'owner/name'")
    return _hub_model(name)


def load_base(base_dir: Path, qlora: bool = False):
    """(model, kind): HomeLLM for Llama directories ("homellm"), transformers otherwise ("hf")."""
    conf = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if qlora:
        return _load_4bit(base_dir), "hf"
    if conf.get("model_type") == "llama":
        return load_hf(base_dir), "homellm"
    from transformers import AutoModelForCausalLM  # seconds to import; only non-Llama bases need it

    try:
        hf = AutoModelForCausalLM.from_pretrained(str(base_dir), trust_remote_code=False, dtype=torch.float32,
                                                  use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"sft.base_model: {base_dir} cannot be loaded as a causal LM by transformers "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return HFCausalLM(hf), "hf"


def _load_4bit(base_dir: Path):
    """QLoRA's base: the model in 4-bit NF4 through bitsandbytes (CUDA only; checked before)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=quant, trust_remote_code=False,
                                              use_safetensors=True, device_map={"": 0})
    return HFCausalLM(prepare_model_for_kbit_training(hf))


def check_qlora() -> None:
    if not torch.cuda.is_available():
        raise UserError("sft.lora.qlora: QLoRA loads the base model in 4 bits with bitsandbytes, which needs a CUDA "
                        "GPU; this machine has none (torch.cuda.is_available() is False). Set sft.lora.qlora: false — "
                        "plain LoRA (sft.lora.enabled: true) works on CPU.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("sft.lora.qlora: needs the bitsandbytes package (pip install bitsandbytes), which is not "
                        "installed; or set sft.lora.qlora: false") from None


# ---------------------------------------------------------------------------------------------------------
# LoRA through peft.


def lora_defaults(n_params: int) -> tuple[int, float]:
    """(rank, alpha) by model size: small models need few directions; alpha = 2 x rank (the common choice)."""
    rank = 8 if n_params < 100e6 else 16 if n_params < 1e9 else 32
    return rank, 2.0 * rank


def apply_lora(model: torch.nn.Module, lora, n_params: int):
    """Inject LoRA adapters into `model` in place (everything else frozen); return the peft wrapper (for saving
    the adapter and merging) and the resolved settings."""
    from peft import LoraConfig as PeftLoraConfig  # peft imports transformers (seconds); only LoRA runs need it
    from peft import get_peft_model

    inner = model.hf if isinstance(model, HFCausalLM) else model
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in inner.named_modules()
                     if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Linear4bit", "Conv1D")})
    targets = [t for t in lora.target_modules if t in linear]
    if not targets:
        raise UserError(f"sft.lora.target_modules: none of {lora.target_modules} is a linear layer of this model; "
                        f"its linear layers are named: {', '.join(linear)}")
    rank, alpha = lora_defaults(n_params)
    rank = lora.rank if lora.rank is not None else rank
    alpha = lora.alpha if lora.alpha is not None else 2.0 * rank
    peft_cfg = PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=lora.dropout, target_modules=targets,
                              bias="none")
    peft_model = get_peft_model(inner, peft_cfg)  # injects in place: `model` now runs with the adapters
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return peft_model, {"rank": rank, "alpha": alpha, "dropout": lora.dropout, "target_modules": targets,
                        "trainable_params": trainable}


def merge_adapter(base_dir: Path, adapter_dir: Path):
    """The base model with a saved LoRA adapter merged in (used by export when sft.lora.merge is false)."""
    # peft: only LoRA runs need it, and it imports transformers (seconds)
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, set_peft_model_state_dict

    model, _ = load_base(base_dir)
    inner = model.hf if isinstance(model, HFCausalLM) else model
    conf = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    peft_cfg = PeftLoraConfig(r=conf["r"], lora_alpha=conf["lora_alpha"], target_modules=conf["target_modules"],
                              lora_dropout=0.0, bias="none")
    pm = get_peft_model(inner, peft_cfg)
    result = set_peft_model_state_dict(pm, load_file(str(adapter_dir / "adapter_model.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{adapter_dir}: the adapter does not fit the base model {base_dir} "
                        f"(unexpected tensors {result.unexpected_keys[:3]})")
    merged = pm.merge_and_unload()
    if isinstance(model, HFCausalLM):
        model.hf = merged
        return model
    return merged


# ---------------------------------------------------------------------------------------------------------
# A reply from either kind of model (samples in the log, the end-of-turn check, the export's reference).


def reply_ids(model, prompt_ids: list[int], max_new_tokens: int, stop_ids: list[int], temperature: float = 0.0,
              seed: int = 0) -> tuple[list[int], bool]:
    """(new tokens after the prompt, whether a stop id ended them); greedy when temperature is 0. The stop token
    itself is not in the list."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, HFCausalLM):
            with torch.no_grad():
                ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
                torch.manual_seed(seed)
                out = model.hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                        temperature=temperature or None, eos_token_id=stop_ids or None,
                                        pad_token_id=(stop_ids or [0])[0])
                new = out[0, len(prompt_ids):].tolist()
        else:
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_k=50 if temperature else 0, seed=seed, stop_token_ids=stop_ids)
            new = list(generate(model, prompt_ids, params))
            # generate drops the stop token: a reply shorter than its limit (the context may cap it) was stopped
            limit = min(max_new_tokens, model.args.max_seq_len - min(len(prompt_ids), model.args.max_seq_len - 1))
            return new, len(new) < limit
        ended = bool(new) and new[-1] in stop_ids
        return (new[:-1] if ended else new), ended
    finally:
        model.train(was_training)
