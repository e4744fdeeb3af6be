"""How big a model is and how much memory and disk it needs: hyper-parameters in one vocabulary whatever the config
calls them, parameter counts from headers or config formulas, and the memory estimates for inference and training.
Every formula used is listed in FORMULAS and copied into the report."""

from __future__ import annotations

import math

from lib.check.detect import ENCODER_TASKS, ENCODER_TYPES, SSM_TYPES, Detection
from lib.check.source import PICKLE_SUFFIXES, WEIGHT_SUFFIXES, Source
from lib.config import CheckConfig
from lib.hardware import activation_dtype, training_precision
from lib.model.dims import Dims

MiB, GiB = 2**20, 2**30

# Bytes per parameter of the weights in each dtype. int8/int4 are llama.cpp's Q8_0 / Q4_0 block formats:
# 32 weights share one fp16 scale, so 8.5 and 4.5 bits per weight (bitsandbytes is within a few % of this).
DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 34 / 32, "int4": 18 / 32}
TORCH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                     "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5}

# Calibrated by bench/bench_check_memory.py (transformers 5.23, torch 2.13 CPU): besides weights, KV cache and
# activations, loading a tokenizer + model with transformers and running generate() grows a process that has
# already imported torch and transformers by 143-146 MB, whatever the model size (0.9M-135M parameters): lazily
# imported model/tokenizer/generation code, the chat-template engine, allocator pools and thread pools.
RUNTIME_OVERHEAD_BYTES = 145 * MiB
# The tokenizer's own data (vocabulary, merges) grows with its tokenizer.json, by how the tokenizer class builds it.
# Classes that hand tokenizer.json to the Rust library as is (TokenizersBackend, PreTrainedTokenizerFast) hold about
# 3.4 bytes per byte of it (measured on the calibration models: 12 MB for SmolLM2's 3.5 MB file). Model-specific
# classes of transformers 5 (GemmaTokenizer, BertTokenizer, ...) first build the vocabulary and merges as Python
# objects: a 14-byte JSON entry like "▁the": 1234, becomes a str (49 + len bytes), an int (28) and a dict slot (~36):
# about 8 bytes per byte of JSON, and the Rust tokenizer beside them.
RUST_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
TOKENIZER_BYTES_PER_JSON_BYTE = {"rust": 3.4, "python": 8.0 + 3.4}
# What `python -c "import torch, transformers"` occupies before any model (measured: 249 MB). Counted in the
# RAM a CPU run needs, not in the per-model estimate that the benchmark checks.
FRAMEWORK_BYTES = 250 * MiB
# A CUDA context + cuBLAS workspaces take device memory before any tensor (typical for CUDA 12; not
# calibrated here: the development machines have no GPU).
GPU_CONTEXT_BYTES = 500 * MiB
# `import peft` (LoRA) grows a process that already imported torch + transformers by 136 MB (measured).
PEFT_IMPORT_BYTES = 136 * MiB
# Disk for an environment: a venv made with --system-site-packages reuses what is installed (a few MB);
# a fresh one needs torch (CPU wheel ~0.8 GB, CUDA ~5 GB with its libraries) + transformers & friends.
ENV_DISK_BYTES = {"shared (--system-site-packages)": 20 * MiB, "fresh venv, CPU torch": int(1.6 * GiB),
                  "fresh venv, CUDA torch": int(6.5 * GiB)}
# The context length assumed when a config does not say
DEFAULT_CONTEXT = 2048


# ---------------------------------------------------------------------------------------------------------
# Hyper-parameters in one vocabulary, whatever the config calls them.


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        v = cfg.get(k)
        if v is not None:
            return v
    return default


GATED_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
               "gemma3_text", "phi3", "olmo", "olmo2", "granite", "cohere", "stablelm", "starcoder2", "deepseek_v2",
               "deepseek_v3", "smollm3", "internlm2", "exaone", "glm", "glm4", "helium", "jamba"}


def dims_of(det: Detection) -> Dims:
    """The detected model's dimensions (lib.model.dims), from its config in whatever words its family uses."""
    c = det.config or {}
    if det.gguf is not None or det.architecture is None:  # already normalised (GGUF, params.json, litgpt)
        hidden, layers = c.get("hidden"), c.get("layers")
        heads = c.get("heads") or (max(1, (hidden or 64) // 64))
        kv = c.get("kv_heads") or heads
        return Dims(hidden=hidden, layers=layers, heads=heads, kv_heads=kv,
                    head_dim=(hidden // heads) if hidden and heads else None,
                    ffn=c.get("ffn") or (4 * hidden if hidden else None),
                    vocab=c.get("vocab"), context=c.get("context_length"),
                    tied=det.gguf is not None and not any(t[0] == "output.weight" for t in det.gguf["tensors"]),
                    gated=det.family not in ("gpt2", "bloom", "falcon", "starcoder", "bert", "phi2"),
                    experts=c.get("experts") or 1, experts_used=c.get("experts_used") or 1,
                    attention="ssm" if det.family in ("mamba", "mamba2") else "full",
                    ssm_inner=c.get("ssm_inner"), ssm_state=c.get("ssm_state"), ssm_conv=c.get("ssm_conv"),
                    bias=False, positions=0)
    mt = c.get("model_type") or det.family
    hidden = _first(c, "hidden_size", "n_embd", "d_model", "dim", "embed_dim")
    layers = _first(c, "num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
    heads = _first(c, "num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads")
    kv = _first(c, "num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
    if kv is None and c.get("multi_query"):
        kv = 1
    kv = kv or heads
    head_dim = _first(c, "head_dim", "d_kv") or (hidden // heads if hidden and heads else None)
    ffn = _first(c, "intermediate_size", "n_inner", "ffn_dim", "d_ff", "decoder_ffn_dim", "ffn_hidden_size")
    if ffn is None and hidden:
        ffn = 4 * hidden
    act = str(_first(c, "hidden_act", "hidden_activation", "activation_function", default=""))
    ssm = mt in SSM_TYPES
    d = Dims(
        hidden=hidden, layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim, ffn=ffn,
        vocab=c.get("vocab_size"),
        context=_first(c, "max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx",
                       "max_sequence_length", "max_target_positions"),
        tied=bool(c.get("tie_word_embeddings", det.full_config.get("tie_word_embeddings", True))),
        gated=mt in GATED_TYPES or act in ("silu", "swish", "swiglu"),
        experts=_first(c, "num_local_experts", "num_experts", "n_routed_experts", default=1) or 1,
        experts_used=_first(c, "num_experts_per_tok", "num_experts_per_token", default=1) or 1,
        attention="ssm" if ssm else "full",
        ssm_inner=_first(c, "intermediate_size", "d_inner") if ssm else None,
        ssm_state=_first(c, "state_size", "d_state", "ssm_state_size") if ssm else None,
        ssm_conv=_first(c, "conv_kernel", "d_conv") if ssm else None,
        # GPT-2/BERT style: biases everywhere and learned absolute positions
        bias=bool(c.get("attention_bias") or c.get("qkv_bias") or mt in ("gpt2", "bert", "roberta", "whisper")
                  or mt in ENCODER_TYPES),
        positions=(_first(c, "n_positions", "max_position_embeddings") or 0)
        if (mt in ("gpt2", "gpt_neo", "opt", "whisper") or c.get("position_embedding_type") == "absolute") else 0,
        type_vocab=c.get("type_vocab_size") or 0,
    )
    if ssm:
        if not d.ssm_inner and hidden:
            d.ssm_inner = int(c.get("expand", 2) * hidden)
        d.ssm_state = d.ssm_state or 16
        d.ssm_conv = d.ssm_conv or 4
        d.heads = d.kv_heads = d.head_dim = None
    if det.task == "seq2seq" or mt == "whisper":
        d.encoder_layers = _first(c, "encoder_layers", "num_layers", default=layers)
        d.layers = _first(c, "decoder_layers", "num_decoder_layers", default=layers)
    return d


def vision_params_from_config(vc: dict, text_hidden: int | None) -> int:
    """A ViT tower: L_v * (4*d_v^2 + 2*d_v*f_v) + patch embedding, plus a 2-layer projector d_v*d + d*d."""
    dv = _first(vc, "hidden_size", "embed_dim", "width")
    lv = _first(vc, "num_hidden_layers", "depth", "layers")
    if not (dv and lv):
        return 0
    fv = _first(vc, "intermediate_size", "mlp_dim", default=4 * dv)
    patch = _first(vc, "patch_size", default=14)
    tower = lv * (4 * dv * dv + 2 * dv * fv) + 3 * patch * patch * dv
    return int(tower + (dv * text_hidden + text_hidden * text_hidden if text_hidden else 0))


def params_from_config(d: Dims) -> int | None:
    """Parameter count from hyper-parameters (used when no weight headers are available). Norm weights and
    biases are counted; exotic extras (rotary tables, pooler heads) are not, so expect a few % off."""
    h, L, V = d.hidden, d.layers, d.vocab
    if not (h and L and V):
        return None
    if d.attention == "ssm":
        di, ds, dc = d.ssm_inner, d.ssm_state, d.ssm_conv
        dt_rank = math.ceil(h / 16)
        # in_proj (x and gate), depthwise conv, x_proj (dt, B, C), dt_proj, A_log, D, out_proj, norm
        layer = h * 2 * di + di * dc + di + di * (dt_rank + 2 * ds) + dt_rank * di + di + di * ds + di + di * h + h
        return V * h + L * layer + h + (0 if d.tied else V * h)
    nh, nkv, hd, f = d.heads, d.kv_heads, d.head_dim, d.ffn
    b = 1 if d.bias else 0
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + b * (nh * hd + 2 * nkv * hd + h)
    mlp = (3 if d.gated else 2) * h * f + b * (f + h)
    if d.experts > 1:
        mlp = d.experts * mlp + h * d.experts  # experts + router
    norms = 2 * h * (1 + b)  # two norms per layer (LayerNorm has a bias too)
    total = V * h + L * (attn + mlp + norms) + h + (0 if d.tied else V * h)
    total += d.positions * h + d.type_vocab * h
    if d.encoder_layers:  # encoder stack; each decoder layer also has cross-attention
        total += d.encoder_layers * (attn + mlp + norms) + L * (attn + 2 * h)
    return int(total)


# ---------------------------------------------------------------------------------------------------------
# Estimates. Every formula used is listed in FORMULAS and copied into the report.

FORMULAS = [
    "P = parameter count: exact sum of tensor sizes from safetensors/GGUF headers when present, else from the "
    "config: V*d (embeddings) [+ V*d untied head] + L*(attention d*(h+2*kv)*hd + h*hd*d, MLP 3*d*f gated or "
    "2*d*f, 2 norms*d) + d, times E experts for the MLP of MoE models; multimodal: + vision tower "
    "L_v*(4*d_v^2 + 2*d_v*f_v) + projector d_v*d + d*d",
    "weights(dtype) = P * bytes(dtype); bytes: fp32 4, fp16/bf16 2, int8 1.0625 (Q8_0: 8.5 bit), "
    "int4 0.5625 (Q4_0: 4.5 bit); resident at inference: minus V*d*bytes when safetensors are loaded in their "
    "stored dtype (mapped, not copied) and the input embedding is not the output head (untied, or an encoder): "
    "only the prompt's rows of it are ever read",
    "kv_cache = 2 (K and V) * L * kv_heads * head_dim * S * B * bytes_kv; bytes_kv = 4 for fp32, else 2 "
    "(state-space models: L * B * d_inner * (d_state + d_conv) * 4, independent of S)",
    "activations (inference, prefill of S tokens) = B * S * (4*d + 2*kv*hd + 3*f) * bytes_act + B * V * 4 (logits "
    "of the last position, fp32); assumes fused SDPA attention (eager attention adds B*h*S*S*bytes_act)",
    "load_transient = stored weight bytes when a 32/16-bit dtype differs from the stored one (the file is "
    "mapped while converted copies are made), else 0; int8/int4 assume pre-quantized weights (GGUF, bitsandbytes)",
    "tokenizer = size of tokenizer.json * 3.4 when its class hands the file to the Rust library (TokenizersBackend, "
    "PreTrainedTokenizerFast), * 11.4 when transformers first builds vocabulary and merges as Python objects "
    "(GemmaTokenizer, BertTokenizer, ...: ~8 bytes of Python objects per byte of JSON, plus the Rust copy)",
    "inference(dtype) = weights + kv_cache + activations + load_transient + tokenizer + runtime overhead (145 MB, "
    "calibrated by bench/bench_check_memory.py on SmolLM2-135M and our tiny/demo models: lazily imported "
    "tokenizer/model/generation code, allocator and thread pools)",
    "CPU RAM needed = inference + 250 MB (python + torch + transformers imported); GPU memory needed = inference "
    "- runtime overhead + 500 MB (CUDA context, cuBLAS workspace)",
    "train_activations = L * Bt * St * (10*d + 4*f) * bytes_act + 3 * Bt * St * V * 4 (logits, log-softmax and their "
    "gradient in fp32); with gradient checkpointing the first term becomes L * Bt * St * d * bytes_act + one layer",
    "full fine-tuning = 16 * P (fp32 weights 4 + gradients 4 + AdamW m,v 8) + train_activations + runtime overhead",
    "LoRA = P * bytes(base dtype) + 16 * P_lora + train_activations + L * Bt * St * sum(out of adapted projections) "
    "* bytes_act (adapter outputs) + 136 MB (peft import) + runtime overhead; P_lora = L * r * sum over adapted "
    "projections of (in + out) (q,k,v,o,gate,up,down)",
    "disk = model files + installed copy (the GGUF import stores P * 4 bytes) + environment (shared venv 20 MB, "
    "fresh CPU venv 1.6 GB, fresh CUDA venv 6.5 GB)",
]


def stored_weights(src: Source, det: Detection, headers: dict) -> dict:
    """Exact parameter count and stored bytes, from headers; else None (filled from formulas later)."""
    if det.gguf is not None:
        t = det.gguf["tensors"]
        return {"params": sum(x[3] for x in t), "bytes": sum(x[4] for x in t), "source": "GGUF tensor table",
                "dtypes": sorted({x[2] for x in t}), "format": "gguf"}
    if headers:
        params, nbytes, dtypes = 0, 0, {}
        for tensors in headers.values():
            for dtype, shape in tensors.values():
                n = math.prod(shape) if shape else 1
                params += n
                nbytes += n * SAFETENSORS_BYTES.get(dtype, 4)
                dtypes[dtype] = dtypes.get(dtype, 0) + n
        main = max(dtypes, key=dtypes.get) if dtypes else None
        return {"params": params, "bytes": int(nbytes), "source": "safetensors headers",
                "dtypes": sorted(dtypes, key=dtypes.get, reverse=True), "main_dtype": main, "format": "safetensors"}
    weights = {f: s for f, s in src.files.items() if f.endswith(WEIGHT_SUFFIXES)}
    if det.loader == "faster-whisper":  # CTranslate2's own model.bin: a flat binary, not a pickle
        return {"params": None, "bytes": weights.get("model.bin"), "source": None, "dtypes": [],
                "format": "ctranslate2"}
    fmt = None
    if any(f.endswith(PICKLE_SUFFIXES) for f in weights):
        fmt = "pytorch-pickle"
    return {"params": None, "bytes": sum(weights.values()) or None, "source": None, "dtypes": [], "format": fmt}


def _act_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def kv_cache_bytes(d: Dims, seq: int, batch: int, dtype: str) -> int:
    if d.attention == "ssm":
        if not (d.layers and d.ssm_inner):
            return 0
        return int(d.layers * batch * d.ssm_inner * ((d.ssm_state or 16) + (d.ssm_conv or 4)) * 4)
    if not (d.layers and d.kv_heads and d.head_dim):
        return 0
    return int(2 * d.layers * d.kv_heads * d.head_dim * seq * batch * _act_bytes(dtype))


def inference_activation_bytes(d: Dims, seq: int, batch: int, dtype: str) -> int:
    h, f, V = d.hidden or 0, d.ffn or 0, d.vocab or 0
    kvd = (d.kv_heads or 0) * (d.head_dim or 0)
    if d.attention == "ssm":
        f = 2 * (d.ssm_inner or 0)
    return int(batch * seq * (4 * h + 2 * kvd + 3 * f) * _act_bytes(dtype) + batch * V * 4)


def tokenizer_bytes(json_bytes: int | None, tokenizer_class: str | None) -> int:
    """Memory of the loaded tokenizer's data, from the size of tokenizer.json and the class that loads it."""
    if not json_bytes:
        return 0
    kind = "rust" if tokenizer_class in RUST_TOKENIZER_CLASSES or not tokenizer_class else "python"
    return int(json_bytes * TOKENIZER_BYTES_PER_JSON_BYTE[kind])


def mapped_embedding_bytes(d: Dims, dtype: str, stored_dtype: str | None, mapped: bool) -> int:
    """The part of the weights a run never makes resident. A safetensors file loaded without a dtype conversion is
    mapped, not copied, so only the pages a run touches count in RSS: an input embedding that is not also the
    output head (untied, or an encoder) is read only at the rows of the prompt's tokens."""
    if not (mapped and stored_dtype == dtype and dtype in TORCH_DTYPE and d.vocab and d.hidden):
        return 0
    if d.tied and d.kv_cache:  # a tied decoder's head reads the whole matrix at every token
        return 0
    return int(d.vocab * d.hidden * DTYPE_BYTES[dtype])


def estimate_inference(P: int, d: Dims, dtype: str, seq: int, batch: int, stored_dtype: str | None,
                       tokenizer: int = 0, mapped: bool = False) -> dict:
    """Memory of loading the model in `dtype` and generating up to `seq` tokens (see FORMULAS); `tokenizer`: the
    tokenizer's data (tokenizer_bytes); `mapped`: the weights are safetensors that a same-dtype load maps."""
    weights = int(P * DTYPE_BYTES[dtype])
    never_read = mapped_embedding_bytes(d, dtype, stored_dtype, mapped)
    kv = kv_cache_bytes(d, seq, batch, dtype) if d.kv_cache else 0
    act = inference_activation_bytes(d, seq, batch, dtype)
    transient = 0
    # int8/int4 assume pre-quantized weights (a GGUF file, a bitsandbytes checkpoint): nothing is converted
    if stored_dtype and stored_dtype != dtype and dtype in TORCH_DTYPE:
        transient = int(P * DTYPE_BYTES.get(stored_dtype, 4))
    total = weights - never_read + kv + act + transient + tokenizer + RUNTIME_OVERHEAD_BYTES
    return {"weights": weights, "mapped_not_read": never_read, "kv_cache": kv, "activations": act,
            "load_transient": transient, "tokenizer": tokenizer, "runtime_overhead": RUNTIME_OVERHEAD_BYTES,
            "total": total}


def lora_params(d: Dims, rank: int) -> int:
    h, f, L = d.hidden or 0, d.ffn or 0, d.layers or 0
    if d.attention == "ssm":  # in_proj and out_proj
        return int(L * rank * ((h + 2 * d.ssm_inner) + (d.ssm_inner + h)))
    q = (d.heads or 0) * (d.head_dim or 0)
    kv = (d.kv_heads or 0) * (d.head_dim or 0)
    per_layer = (h + q) + 2 * (h + kv) + (q + h)  # q, k, v, o
    per_layer += (2 * (h + f) + (f + h)) if d.gated else 2 * (h + f)  # gate, up, down / fc1, fc2
    return int(L * rank * per_layer)


def lora_activation_bytes(d: Dims, seq: int, batch: int, act_bytes: int) -> int:
    """The adapter branches' outputs, B*S*out per adapted projection, alive until they are added to the base output."""
    h, f, L = d.hidden or 0, d.ffn or 0, d.layers or 0
    if d.attention == "ssm":
        return int(L * batch * seq * (2 * (d.ssm_inner or 0) + h) * act_bytes)
    q = (d.heads or 0) * (d.head_dim or 0)
    kv = (d.kv_heads or 0) * (d.head_dim or 0)
    outs = q + 2 * kv + h + ((2 * f + h) if d.gated else (f + h))
    return int(L * batch * seq * outs * act_bytes)


def train_activation_bytes(d: Dims, seq: int, batch: int, act_bytes: int, checkpointing: bool = False) -> int:
    h, f, L, V = d.hidden or 0, d.ffn or 0, d.layers or 0, d.vocab or 0
    if d.attention == "ssm":
        f = 2 * (d.ssm_inner or 0)
    per_layer = batch * seq * (10 * h + 4 * f) * act_bytes
    layers = (L * batch * seq * h * act_bytes + per_layer) if checkpointing else L * per_layer
    return int(layers + 3 * batch * seq * V * 4)


def estimate_training(P: int, d: Dims, cfg: CheckConfig, act_dtype: str, base_dtype: str) -> dict:
    B, S = cfg.train_batch_size, cfg.train_seq_len
    ab = _act_bytes(act_dtype)
    act = train_activation_bytes(d, S, B, ab)
    act_ckpt = train_activation_bytes(d, S, B, ab, checkpointing=True)
    pl = lora_params(d, cfg.lora_rank)
    full = {"weights": 4 * P, "gradients": 4 * P, "optimizer": 8 * P, "activations": act,
            "runtime_overhead": RUNTIME_OVERHEAD_BYTES}
    lora = {"weights": int(P * DTYPE_BYTES[base_dtype]), "lora_params": pl, "lora_states": 16 * pl,
            "activations": act + lora_activation_bytes(d, S, B, ab), "peft": PEFT_IMPORT_BYTES,
            "runtime_overhead": RUNTIME_OVERHEAD_BYTES}
    for e in (full, lora):
        e["total"] = sum(v for k, v in e.items() if k != "lora_params")
        e["total_with_grad_checkpointing"] = e["total"] - act + act_ckpt
    return {"batch_size": B, "seq_len": S, "activation_dtype": act_dtype, "full": full,
            "lora": {"rank": cfg.lora_rank, "base_dtype": base_dtype, **lora}}


def _dtype_key(name: str | None) -> str | None:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "F32": "fp32", "F16": "fp16",
            "BF16": "bf16"}.get(name or "")


def estimates(src: Source, det: Detection, cfg: CheckConfig, stored: dict, hw: dict,
              serve_context: int | None = None, serve_sequences: int = 4) -> dict:
    """Parameters, disk and memory. Inference is sized at check.seq_len, else at the context a server runs the
    model with: its own context, capped at serve_context (serve.max_context) for a decoder."""
    d = dims_of(det)
    # encoders run one forward pass over the whole input: there is no KV cache to keep
    d.kv_cache = det.task not in ENCODER_TASKS
    formula = params_from_config(d) if det.task != "text-to-image" else None
    if formula and isinstance(det.full_config.get("vision_config"), dict):
        formula += vision_params_from_config(det.full_config["vision_config"], d.hidden)
    P = stored["params"] or formula
    source = stored["source"] or ("config formula" if formula else None)
    if P is None and stored["bytes"]:  # no headers, no usable config: infer from file size (assume 2 bytes each)
        P, source = int(stored["bytes"] / 2), "file size / 2 (assumes fp16/bf16 weights)"
    context = d.context or DEFAULT_CONTEXT
    files_bytes = sum(src.files.values())
    installed = files_bytes  # a GGUF is installed as it came (install.gguf_hf_copy adds an fp32 copy)
    disk = {"model_files": files_bytes, "installed_model": installed, "environment": ENV_DISK_BYTES,
            "total_shared_env": installed + ENV_DISK_BYTES["shared (--system-site-packages)"],
            "free": hw["disk"]["free_bytes"], "path": hw["disk"]["path"]}
    disk["fits"] = disk["total_shared_env"] <= hw["disk"]["free_bytes"]
    if P is None:  # nothing to count: a config-only folder of a type without a formula (e.g. diffusers)
        return {"params": {"total": None, "source": None, "from_config_formula": None}, "dims": d.to_dict(),
                "context_length": context, "context_assumed": d.context is None, "inference": None,
                "weights_bytes": None, "disk": disk,
                "unknown": "no safetensors/GGUF headers, no weight files and no formula for this model type"}
    seq = cfg.seq_len or (min(context, serve_context) if serve_context and d.kv_cache else context)
    if stored.get("main_dtype"):
        stored_dtype = _dtype_key(stored["main_dtype"])
    elif det.gguf is not None:
        stored_dtype = None  # quantized blocks: any dtype is a conversion (the GGUF import makes fp32)
    else:
        stored_dtype = _dtype_key(det.full_config.get("torch_dtype") or det.full_config.get("dtype"))
    tok_cfg = src.read_json("tokenizer_config.json") if "tokenizer_config.json" in src.files else None
    tok = tokenizer_bytes(src.files.get("tokenizer.json"), (tok_cfg or {}).get("tokenizer_class"))
    mapped = det.gguf is None and any(f.endswith(".safetensors") for f in src.files)
    inference = {dt: estimate_inference(P, d, dt, seq, cfg.batch_size, stored_dtype, tok, mapped)
                 for dt in DTYPE_BYTES}
    out = {
        "params": {"total": int(P), "source": source, "from_config_formula": formula},
        "dims": d.to_dict(),
        "context_length": context, "context_assumed": d.context is None,
        "inference": {"seq_len": seq, "batch_size": cfg.batch_size, "stored_dtype": stored_dtype,
                      "by_dtype": inference},
        "weights_bytes": {dt: e["weights"] for dt, e in inference.items()},
    }
    if det.task == "text-generation" and d.hidden and d.layers and d.vocab:
        weights = {q: quantized_weight_bytes(int(P), d, q) for q in QUANT_BITS}
        if det.gguf is not None:  # the file as it is, then what re-quantizing it would give
            weights = {"as stored": stored["bytes"], **{q: w for q, w in weights.items() if q != "f16"}}
        gguf_tok = 0 if tok else (d.vocab or 0) * GGUF_TOKENIZER_BYTES_PER_TOKEN
        out["llama_cpp"] = llama_cpp_estimates(d, weights, min(context, serve_context or context), serve_sequences,
                                               tok or gguf_tok)
    if det.task == "text-generation" and d.hidden and d.layers:
        cpu_act = activation_dtype(training_precision("auto", "cpu", hw)[0])
        out["training"] = {"cpu": estimate_training(P, d, cfg, cpu_act, "fp32"),
                           "gpu": estimate_training(P, d, cfg, "bf16", "bf16")}
    out["disk"] = disk
    return out


# ---------------------------------------------------------------------------------------------------------
# Serving through llama.cpp: what `06_install.py --quantize` would store and what the server then holds.

# Bits per weight of llama.cpp's quantizations: (rows whose length is a multiple of 256, other rows). The k-quants work
# in 256-value super-blocks; a row of another length falls back to a legacy type (Q5_1 / Q5_0 in the Q5_K_M / Q4_K_M
# mixes). The embedding (and a tied output head) stays Q8_0 in every mix, an untied output head gets Q6_K.
QUANT_BITS = {"f16": (16.0, 16.0), "q8_0": (8.5, 8.5), "q5_k_m": (5.7, 6.0), "q4_k_m": (4.9, 5.5)}
EMBED_BITS, HEAD_BITS = 8.5, 6.5625
# What a 07_serve process holds besides the model when llama.cpp decodes: python, torch and transformers imported, the
# serving code, llama.cpp's own buffers and allocator slack. Calibrated by bench/bench_check_llamacpp.py on
# SmolLM2-135M Q4_1 (07_serve --prompt, peak RSS 846 MB).
LLAMA_CPP_RUNTIME_BYTES = 345 * MiB
LLAMA_CPP_UBATCH = 512  # tokens per llama_decode of a prompt: the chat engine's batch (lib.serving.llamacpp reads it)
# A tokenizer that transformers rebuilds from a GGUF's token list (no tokenizer.json beside it) holds about 1 KB of
# Python objects per token (measured on SmolLM2's 49,152 tokens: 48.8 MB).
GGUF_TOKENIZER_BYTES_PER_TOKEN = 993


def quantized_weight_bytes(P: int, d: Dims, qtype: str) -> int:
    """The weights of a llama.cpp GGUF of quantization `qtype` (see QUANT_BITS)."""
    aligned, other = QUANT_BITS[qtype]
    bits = aligned if (d.hidden or 0) % 256 == 0 else other
    embed = (d.vocab or 0) * (d.hidden or 0)
    head = 0 if d.tied else embed
    body = max(0, P - embed - head)
    embed_bits = 16.0 if qtype == "f16" else EMBED_BITS
    head_bits = 16.0 if qtype == "f16" else HEAD_BITS
    return int((body * bits + embed * embed_bits + head * head_bits) / 8)


def llama_cpp_estimates(d: Dims, weights: dict[str, int], context: int, sequences: int, tokenizer: int) -> dict:
    """Memory of serving through llama.cpp with each of `weights` ({name: bytes}): the weights (mapped and all read),
    an f16 KV cache for `sequences` replies of `context` tokens on every layer (allocated and cleared up front;
    sliding-window layers, which need less, are not told apart), the attention scores, the tokenizer and the runtime.

    The chat engine runs without flash attention (lib.serving.llamacpp.new_context), so a prompt's ubatch of 512
    tokens holds its fp32 scores and f16 mask against a whole reply's context for every head. llama.cpp's compute
    buffer reuses the memory of the ubatch's fp32 logits for them (measured on SmolLM2-135M, 9 heads, vocabulary
    49,152: 99 MiB up to 4,096 tokens of context, as with flash attention, then 126 MiB at 6,144 and 166 MiB at
    8,192), so what the scores need beyond the logits is added."""
    kv = int(2 * (d.layers or 0) * (d.kv_heads or 0) * (d.head_dim or 0) * context * sequences * 2)
    scores = max(0, LLAMA_CPP_UBATCH * (context * (4 * (d.heads or 0) + 2) - 4 * (d.vocab or 0)))
    out = {}
    for name, w in weights.items():
        total = w + kv + scores + tokenizer + LLAMA_CPP_RUNTIME_BYTES
        out[name] = {"weights": int(w), "kv_cache": kv, "attention_scores": scores, "tokenizer": tokenizer,
                     "runtime": LLAMA_CPP_RUNTIME_BYTES, "total": total}
    return {"context": context, "sequences": sequences, "by_quant": out}


# ---------------------------------------------------------------------------------------------------------
# Sizes as text.


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GB", GiB), ("MB", MiB), ("KB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GB" else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


def fmt_params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
