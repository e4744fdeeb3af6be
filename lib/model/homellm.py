"""HomeLLM: our decoder-only transformer, with Llama's parameter names and maths.

What it is for: the model that pretraining and SFT train and that `lib.model.generate` runs with a KV cache. Its
parameter names are Llama's, so lib/model/hf_io.py writes it as a plain Hugging Face Llama directory that transformers,
llama.cpp's converter and every other Llama tool load unchanged. What it is not: a general HF model zoo.

    args = model_args(cfg.model, vocab_size=8192)     # ModelConfig (preset + overrides) -> ModelArgs
    model = HomeLLM(args)
    _, loss = model(idx, targets)                       # idx, targets: (B, T) int64

`python -m lib.model.homellm` prints the presets and their parameter counts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lib.config import ModelConfig
from lib.errors import UserError
from lib.model.dims import Dims

# ---------------------------------------------------------------------------------------------------------
# Presets and resolved arguments.

# Structural fields only; everything a preset leaves out comes from ModelConfig's defaults (ffn_dim = 8/3 dim
# rounded up to 64, n_kv_heads = n_heads, tied embeddings). Parameter counts, from `python -m lib.model.homellm`: "body" =
# the blocks and the final norm (what the preset's name means), "total" = body + the tied embedding/LM head at
# vocab 8192 (our BPE default) / 32000 (a Llama-2-sized vocabulary):
#   preset       dim  layers heads kv   ffn   ctx      body   total@8192  total@32000
#   tiny          64       2     4  2   192   128     0.10M        0.62M        2.15M   (tests)
#   demo         256       4     4  4   704   256     3.21M        5.31M       11.41M   (config/default.yaml)
#   512-8-8      512       8     8  8  1408  1024    25.70M       29.89M       42.08M
#   768-12-12    768      12    12 12  2048  1024    84.95M       91.25M      109.53M
#   1024-16-16  1024      16    16 16  2752  2048   202.41M      210.80M      235.18M
# demo: on a 2-core AVX2 CPU (fp32: no bf16 units) a step of 16 x 256 tokens takes 1.13 s at vocab 8192
# (bench/bench_train_step.py --preset demo --batch 16), and the pipeline's 8-minute budget ran 484 steps at the
# default config's vocab 4096; 2000 such steps would need ~35 min on this CPU.
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128),
    "demo": dict(dim=256, n_layers=4, n_heads=4, max_seq_len=256),
    "512-8-8": dict(dim=512, n_layers=8, n_heads=8, max_seq_len=1024),
    "768-12-12": dict(dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "1024-16-16": dict(dim=1024, n_layers=16, n_heads=16, max_seq_len=2048),
}


@dataclass(frozen=True)
class ModelArgs:
    """Every architectural number, resolved (no None): what HomeLLM is built from and what config.json stores."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # usually dim // n_heads; HF checkpoints may set it explicitly
    ffn_dim: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0

    def dims(self) -> Dims:
        """These numbers in the vocabulary 05_check's formulas use for any architecture."""
        return Dims(hidden=self.dim, layers=self.n_layers, heads=self.n_heads, kv_heads=self.n_kv_heads,
                    head_dim=self.head_dim, ffn=self.ffn_dim, vocab=self.vocab_size, context=self.max_seq_len,
                    tied=self.tie_embeddings)


def default_ffn_dim(dim: int) -> int:
    """SwiGLU hidden size: 8/3 * dim (same parameter count as a 4*dim GELU MLP), rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * dim / 3 / 64)


def model_args(cfg: ModelConfig, vocab_size: int) -> ModelArgs:
    """Resolve a ModelConfig (preset + explicit fields) into ModelArgs; UserError names the bad `model.<key>`."""
    if cfg.preset is not None and cfg.preset not in PRESETS:
        raise UserError(f"model.preset: unknown preset {cfg.preset!r}; available: {', '.join(PRESETS)} "
                        "(or null to give dim, n_layers, n_heads and max_seq_len yourself)")
    base = dict(PRESETS[cfg.preset]) if cfg.preset is not None else {}
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        if getattr(cfg, key) is not None:  # an explicit field beats the preset
            base[key] = getattr(cfg, key)
    missing = [k for k in ("dim", "n_layers", "n_heads", "max_seq_len") if k not in base]
    if missing:
        raise UserError("model: " + ", ".join(f"model.{k}" for k in missing) + " required when model.preset is null "
                        f"(or choose a preset: {', '.join(PRESETS)})")
    dim, n_heads = base["dim"], base["n_heads"]
    n_kv_heads = base.get("n_kv_heads") or n_heads
    if dim % n_heads:
        raise UserError(f"model.n_heads: must divide model.dim ({dim}); got {n_heads}")
    if (dim // n_heads) % 2:
        raise UserError(f"model.n_heads: dim / n_heads must be even for rotary embeddings; got {dim} / {n_heads}")
    if n_kv_heads > n_heads or n_heads % n_kv_heads:
        raise UserError(f"model.n_kv_heads: must divide model.n_heads ({n_heads}); got {n_kv_heads}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise UserError(f"vocab_size: expected a positive integer from the tokenizer, got {vocab_size!r}")
    return ModelArgs(vocab_size=vocab_size, dim=dim, n_layers=base["n_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
                     head_dim=dim // n_heads, ffn_dim=base.get("ffn_dim") or default_ffn_dim(dim),
                     max_seq_len=base["max_seq_len"], rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps,
                     tie_embeddings=cfg.tie_embeddings, dropout=cfg.dropout)


# ---------------------------------------------------------------------------------------------------------
# The transformer. Parameter names follow transformers' LlamaForCausalLM exactly, so a state_dict is a Llama one.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Llama's order: x * rsqrt(mean(x^2) + eps) in fp32, cast back to the activation dtype, then scale by the
        # weight. (F.rms_norm without a weight runs exactly those ops, minus the Python overhead of issuing them.)
        dtype = x.dtype
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, each (max_len, head_dim) in fp32. The frequencies are duplicated (cat(freqs, freqs)) as
    Llama does; the sin table's first half is negated, for apply_rope."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hd/2,)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, hd)
    sin = emb.sin()
    sin[:, : head_dim // 2] *= -1
    return emb.cos(), sin


def apply_rope(x, cos, sin_signed):
    """x: (B, h, T, hd); cos, sin_signed: (T, hd). Llama's x * cos + rotate_half(x) * sin with rotate_half(x) =
    cat(-x2, x1), written as roll(x) * cat(-sin, sin): the same numbers with fewer ops."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def project(layer: nn.Module, x):
    """layer(x) for a Linear layer, with a faster route for a single token on a multi-core CPU (decoding).

    A one-row matmul reads the whole weight for two FLOPs per weight, so it is bound by memory bandwidth, and
    torch's one-row CPU kernel streams the weight from one core. Split by output rows into one part per thread and
    run as a batched matmul, the parts are read by all cores at once (decoding ~1.4x faster at 512-8-8 on a 2-core
    CPU, bench/bench_decode.py). Same products, same result up to fp32 rounding. Anything but a bare nn.Linear
    (e.g. a LoRA-wrapped layer) is called as it is.
    """
    if (type(layer) is not nn.Linear or x.device.type != "cpu" or x.numel() != x.shape[-1]
            or not layer.weight.is_contiguous()):
        return layer(x)
    n, k = layer.weight.shape
    parts = torch.get_num_threads()
    while n % parts:
        parts -= 1
    if parts == 1:
        return layer(x)
    # x @ W_part^T for every part: (parts, 1, k) @ (parts, k, n / parts) -> (parts, 1, n / parts)
    y = torch.bmm(x.reshape(1, 1, k).expand(parts, 1, k), layer.weight.view(parts, n // parts, k).transpose(1, 2))
    return y.reshape(*x.shape[:-1], n)


class _CausalAttentionCPU(torch.autograd.Function):
    """Causal softmax(q k^T * scale) v: torch's flash-attention kernel forward, and a backward written out as batched
    matmuls and elementwise maths, for torch.compile to fuse (Attention uses it only while being compiled).

    The backward is FlashAttention's: P recomputed from the saved log-sum-exp, dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dO * O)), dQ = dS K * scale, dK = dS^T Q * scale, with the scores and P in fp32 and the
    matmul inputs in the activation dtype. On a 2-core AMX CPU in bf16 (B x H = 64, T = 256, head 64), compiled, it
    takes 14.6 ms forward + backward where torch's CPU flash-attention backward takes 20-21 ms, at the same error
    against an fp32 reference (relative 0.4% vs 0.3%)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        T, scale = q.shape[-2], ctx.scale
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, h, T, T)
        p = torch.where(causal, (scores - lse.unsqueeze(-1)).exp(), 0.0)
        d_v = torch.matmul(p.to(q.dtype).transpose(-1, -2), d_out)
        d_p = torch.matmul(d_out, v.transpose(-1, -2)).float()
        d_s = (p * (d_p - (d_out.float() * out.float()).sum(-1, keepdim=True))).to(q.dtype)
        return torch.matmul(d_s, k) * scale, torch.matmul(d_s.transpose(-1, -2), q) * scale, d_v, None


# the written-out backward holds a few (B, h, T, T) fp32 tensors: above this many scores, SDPA's tiled one is used
_CAUSAL_CPU_MAX_SCORES = 1 << 24


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.dropout = args.dropout
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, kv=None, start_pos: int = 0, last_only: bool = False):
        """x: (B, T, dim). kv: this layer's preallocated (k, v) cache buffers (B, n_kv, max_len, hd), or None.
        last_only: keys and values for all T positions, but the output (B, 1, dim) only for the last one."""
        B, T, _ = x.shape
        Tq = 1 if last_only else T
        q = project(self.q_proj, x[:, T - Tq:]).view(B, Tq, self.n_heads, self.head_dim).transpose(1, 2)
        k = project(self.k_proj, x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = project(self.v_proj, x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos[T - Tq:], sin[T - Tq:]), apply_rope(k, cos, sin)  # q: (B, nh, Tq, hd)
        # one query row sees every key (is_causal would align it with the first key, not the last)
        mask, causal = None, Tq > 1
        if kv is not None:
            k_buf, v_buf = kv
            end = start_pos + T
            k_buf[:, :, start_pos:end] = k
            v_buf[:, :, start_pos:end] = v
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]  # (B, nkv, end, hd)
            if start_pos > 0 and Tq > 1:
                # a chunk after cached tokens: query i (absolute position start_pos + i) sees keys 0..start_pos + i
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
                causal = False
        written_out = (torch.compiler.is_compiling() and x.device.type == "cpu" and torch.is_grad_enabled()
                       and causal and mask is None and not (self.dropout and self.training)
                       and B * self.n_heads * T * T <= _CAUSAL_CPU_MAX_SCORES)
        if written_out:
            groups = self.n_heads // self.n_kv_heads  # grouped-query attention: each kv head serves `groups` heads
            k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (k, v))
            y = _CausalAttentionCPU.apply(q, k, v, self.head_dim ** -0.5)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=self.n_kv_heads != self.n_heads)  # (B, nh, Tq, hd)
        y = y.transpose(1, 2).reshape(B, Tq, self.n_heads * self.head_dim)
        return F.dropout(project(self.o_proj, y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dropout = args.dropout
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x):
        h = F.silu(project(self.gate_proj, x)) * project(self.up_proj, x)
        return F.dropout(project(self.down_proj, h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, kv=None, start_pos: int = 0, last_only: bool = False):
        """x: (B, T, dim) -> (B, T, dim), or (B, 1, dim) with last_only (the last layer of a prefill, whose other
        rows nobody reads once their keys and values are cached: ~10% of a 512-8-8 prefill saved)."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, kv, start_pos, last_only)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The `model.` part of a Llama checkpoint: embedding, blocks, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class HomeLLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.grad_checkpointing = False
        self.compiled = False  # compile_for_training() was called
        self.hf_config: dict = {}  # the config.json a loaded model came from (eos ids etc.); empty when built here
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd), fp32
        self.register_buffer("rope_sin", sin, persistent=False)  # first half negated, see apply_rope
        if self.lm_head.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Normal(0, 0.02) everywhere; the projections that write into the residual stream (o_proj, down_proj) get
        std 0.02 / sqrt(2 * n_layers) so the residual's variance does not grow with depth (GPT-2's scheme).
        Deterministic given torch's seed."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, std / math.sqrt(2 * self.args.n_layers))
            else:
                p.normal_(0.0, std)

    # ------------------------------------------------------------------ forward

    def forward(self, idx, targets=None, loss_mask=None, *, kv_cache=None, start_pos: int = 0, last_only: bool = False):
        """idx: (B, T) token ids. Returns (logits, loss).

        Without targets: logits (B, T, vocab) — only the last position (B, 1, vocab) with last_only — and loss None.
        With targets (B, T): the mean cross-entropy over positions whose target is not -100 and whose loss_mask
        (B, T, 0/1) is 1; logits are then None, because the loss is computed chunk by chunk without ever holding
        the full (B, T, vocab) logits (the largest tensor of a training step). kv_cache: per-layer (k, v) buffers
        from lib.model.generate.KVCache; idx then holds the tokens at positions start_pos .. start_pos + T - 1.
        """
        B, T = idx.shape
        assert start_pos + T <= self.args.max_seq_len, f"position {start_pos + T} > max_seq_len {self.args.max_seq_len}"
        x = self.model.embed_tokens(idx)  # (B, T, dim)
        cos = self.rope_cos[start_pos:start_pos + T]  # (T, hd)
        sin = self.rope_sin[start_pos:start_pos + T]
        if torch.is_autocast_enabled(x.device.type):
            # Llama computes the rotary tables in fp32 and casts them to the dtype of q/k (the autocast dtype)
            cos, sin = cos.to(torch.get_autocast_dtype(x.device.type)), sin.to(torch.get_autocast_dtype(x.device.type))
        else:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, block in enumerate(self.model.layers):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            elif kv_cache is None and not last_only:
                x = block(x, cos, sin)
            else:  # decoding: the eager block (a compiled one would recompile for every new length)
                last = last_only and i == len(self.model.layers) - 1
                x = block.forward(x, cos, sin, None if kv_cache is None else kv_cache[i], start_pos, last_only=last)
        x = self.model.norm(x)  # (B, T, dim), or (B, 1, dim) with last_only
        if targets is None:
            return project(self.lm_head, x[:, -1:] if last_only else x), None
        if loss_mask is not None:
            targets = targets.masked_fill(loss_mask == 0, -100)
        loss = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(B * T),
                                    fused=self.compiled)
        return None, loss

    def compile_for_training(self):
        """torch.compile each block in place (one graph that every layer reuses; state_dict names stay Llama's) and
        the loss's per-chunk softmax and gradient. Compiled on the first step (seconds; torch caches the kernels on
        disk, so a rerun compiles faster). Decoding with a KV cache keeps the eager blocks."""
        for block in self.model.layers:
            block.compile(dynamic=False)
        self.compiled = True
        return self

    def set_grad_checkpointing(self, enabled: bool = True):
        """Recompute each block's activations in the backward pass: far less activation memory, ~30% more compute."""
        self.grad_checkpointing = enabled

    # ------------------------------------------------------------------ sizes

    def num_params(self, body_only: bool = False) -> int:
        """Unique parameters (a tied LM head counts once). body_only: blocks and final norm, no embedding/LM head."""
        n = sum(p.numel() for p in self.parameters())
        if body_only:
            n -= self.model.embed_tokens.weight.numel()
            if not self.args.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def estimate_flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight that multiplies an activation (the body and the
        LM head; the embedding lookup is free) plus attention's QK^T and AV, 12 * layers * heads * head_dim * T
        (PaLM's appendix B, as nanoGPT counts it)."""
        a = self.args
        T = seq_len or a.max_seq_len
        matmul_weights = sum(p.numel() for p in self.model.layers.parameters() if p.dim() == 2) + a.vocab_size * a.dim
        return 6 * matmul_weights + 12 * a.n_layers * a.n_heads * a.head_dim * T


# ---------------------------------------------------------------------------------------------------------
# Loss: LM head + cross-entropy, chunked.


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over rows of CE(h @ W^T, target), computed `chunk` rows at a time.

    Gradients are computed in the forward pass, chunk by chunk (d loss / d logits = softmax - onehot), so only
    one chunk of logits (chunk, vocab) ever exists instead of the (B*T, vocab) logits, their fp32 upcast and the
    saved log-softmax. Same FLOPs as the plain version (one forward and two backward matmuls per chunk).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, n_valid, chunk, ce_chunk):
        # h: (N, D) valid rows only; weight: (V, D); targets: (N,) in [0, V); ce_chunk: _ce_chunk or its compiled form
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dtype = h.dtype  # the compute dtype: under autocast the caller passes bf16 activations
        w = weight.to(dtype)
        grad_h = torch.empty_like(h) if needs_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]  # (c, D), (c,)
            loss_sum, g = ce_chunk(hc @ w.t(), tc, needs_grad)
            total += loss_sum
            if needs_grad:
                torch.mm(g, w, out=grad_h[s:s + chunk])
                if dtype == torch.float32:
                    grad_w.addmm_(g.t(), hc)  # accumulate in place: no (V, D) temporary per chunk
                else:  # bf16 matmul, fp32 accumulation
                    grad_w += (g.t() @ hc).float()
        if needs_grad:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype, ctx.n_valid = weight.dtype, n_valid
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n_valid  # the 1/N of the mean, applied once here rather than to every logit
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None, None


def _ce_chunk(logits, targets, needs_grad: bool):
    """(sum of the rows' cross-entropies, d sum / d logits = softmax - onehot in the logits' dtype, or None) for one
    chunk of logits (c, V) in the compute dtype, computed in fp32 and in place over one fp32 copy of the logits."""
    logits32 = logits.float()
    lse = torch.logsumexp(logits32, dim=-1)  # (c,)
    loss_sum = (lse - logits32.gather(1, targets[:, None]).squeeze(1)).sum()
    if not needs_grad:
        return loss_sum, None
    g = logits32.sub_(lse[:, None]).exp_()  # (c, V)
    g[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return loss_sum, g.to(logits.dtype)


@functools.cache
def _ce_chunk_compiled():
    """_ce_chunk as fused C++/Triton kernels (torch.compile: one or two passes over the logits instead of seven), for
    models compiled for training (HomeLLM.compile_for_training). The row count may change between calls (SFT's masked
    rows), so after a second shape the kernels are compiled for any."""
    return torch.compile(_ce_chunk, dynamic=None)


def linear_cross_entropy(h, weight, targets, chunk: int = 512, fused: bool = False):
    """Mean CE of logits h @ weight^T against targets, ignoring targets == -100. h: (N, D), targets: (N,).
    fused: the per-chunk softmax and gradient torch.compile'd (the matmuls stay torch's).

    Returns 0 (with zero gradients) when no target is valid, rather than NaN, so a fully masked batch is harmless.
    """
    if torch.compiler.is_compiling():  # inside a whole-model torch.compile: eager (data-dependent shapes)
        return _eager_linear_cross_entropy()(h, weight, targets, chunk, fused)
    return _linear_cross_entropy(h, weight, targets, chunk, fused)


@functools.cache
def _eager_linear_cross_entropy():
    """The loss behind torch.compiler.disable, made on first need: the decorator imports torch._dynamo, which at
    import time cost every process 0.9 s of its start (serving, data stages, the post-install test)."""
    return torch.compiler.disable(_linear_cross_entropy)


def _linear_cross_entropy(h, weight, targets, chunk: int, fused: bool):
    targets = targets.long()  # gather needs int64; loaders may hand over int32 ids
    valid = targets != -100
    if not bool(valid.all()):  # SFT masks: skip the masked rows entirely (no logits for them)
        h, targets = h[valid], targets[valid]
    if torch.is_autocast_enabled(h.device.type):
        h = h.to(torch.get_autocast_dtype(h.device.type))
    n_valid = max(int(targets.numel()), 1)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, n_valid, chunk,
                                         _ce_chunk_compiled() if fused else _ce_chunk)


# ---------------------------------------------------------------------------------------------------------


def preset_table(vocab_sizes: tuple[int, ...] = (8192, 32000)) -> str:
    """A table of the presets with their parameter counts (built on the meta device: no memory, no time)."""
    lines = [f"{'preset':<12} {'dim':>5} {'layers':>6} {'heads':>5} {'kv':>3} {'ffn':>5} {'ctx':>5} {'body':>9}"
             + "".join(f" {'total@' + str(v):>12}" for v in vocab_sizes)]
    for name in PRESETS:
        counts = []
        for v in vocab_sizes:
            with torch.device("meta"):
                m = HomeLLM(model_args(ModelConfig(preset=name), v))
            counts.append(m.num_params())
        a = m.args
        lines.append(f"{name:<12} {a.dim:>5} {a.n_layers:>6} {a.n_heads:>5} {a.n_kv_heads:>3} {a.ffn_dim:>5} "
                     f"{a.max_seq_len:>5} {m.num_params(body_only=True) / 1e6:>8.2f}M"
                     + "".join(f" {c / 1e6:>11.2f}M" for c in counts))
    return "\n".join(lines)


if __name__ == "__main__":
    print(preset_table())
