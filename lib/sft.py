"""Stage 04: instruction tuning (phase 2) — chat rendering, loss masks, batches, the overfitting detector, and the
stage itself (full fine-tuning or LoRA) on top of the shared loop in lib/train.py.

    final = run_sft(cfg)     # artifacts/04_sft/<hash>/: HF model dir (+ adapter/), metrics, manifest

What the model is trained on is exactly what `tokenizer.apply_chat_template(messages)` produces with the chat
template stored in the tokenizer (ChatML from stage 02). The loss covers only the assistant turns: their content and
the end-of-turn token `<|im_end|>`, so the model learns to stop. Reading and converting data formats is
lib/sft_data.py; exporting to GGUF/Ollama is lib/export.py.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from accelerate.utils import DistributedType

from lib.chat import end_of_turn_ids, prepare_tokenizer, prompt_ids, render
from lib.config import Config, SftConfig, stage_dir
from lib.errors import UserError
from lib.hub import endpoint, hub_call, offline_reason, require_reachable
from lib.sft_data import Example, load_sft_examples

# Fixed prompts of the end-of-turn check after training (and the default samples of the stage log).
CHECK_PROMPTS = ["Hi! How are you?", "What is your name?", "What did you do today?", "Do you like music?",
                 "Tell me about your weekend.", "What is your favourite food?", "Where do you live?",
                 "Can you recommend a good book?"]
CHECK_MAX_TOKENS = 64


# ---------------------------------------------------------------------------------------------------------
# Loss masks (the rendering itself is lib.chat's).


@dataclass
class Encoded:
    ids: np.ndarray  # (n,) int64 token ids
    mask: np.ndarray  # (n,) bool: token n is a training target (predicted from the tokens before it)
    turn_ends: list[int] = field(default_factory=list)  # token index just after each assistant turn's end token
    complete: bool = True  # the conversation ends with an assistant turn (nothing to trim)


# Rendering only a prefix of a long conversation saves most of the tokenizing: a few thousand characters are more
# than seq_len tokens of English. The prefix is checked afterwards, so the result is exact (see encode_conversations).
CHARS_PER_TOKEN_CAP = 6


def _prefix(messages: list[dict], max_chars: int) -> list[dict]:
    """The messages up to and including the one that takes the text past max_chars."""
    total = 0
    for i, m in enumerate(messages):
        total += len(m["content"]) + 16  # + the ChatML frame
        if total > max_chars:
            return messages[: i + 1]
    return messages


def encode_conversations(tokenizer, conversations: list[list[dict]], max_len: Optional[int] = None) -> list[Encoded]:
    """Tokenize rendered conversations (batched) and mark the assistant tokens.

    A token is trained iff its characters lie inside an assistant span. Offsets come from the tokenizer itself,
    so the ids are exactly those of tokenizing the whole rendered text — what apply_chat_template gives.
    With max_len, long conversations are rendered only up to CHARS_PER_TOKEN_CAP * max_len characters; a prefix
    that turns out to have max_len tokens or fewer is redone in full, so fit_length(result, max_len) is the same
    as without the cap."""
    if max_len is None:
        return _encode(tokenizer, conversations, [True] * len(conversations))
    prefixes = [_prefix(msgs, CHARS_PER_TOKEN_CAP * max_len) for msgs in conversations]
    cut = [len(p) < len(m) for p, m in zip(prefixes, conversations)]
    out = _encode(tokenizer, prefixes, [not c for c in cut])
    redo = [i for i, (c, e) in enumerate(zip(cut, out)) if c and len(e.ids) <= max_len]
    if redo:
        for i, e in zip(redo, _encode(tokenizer, [conversations[i] for i in redo], [True] * len(redo))):
            out[i] = e
    return out


def _encode(tokenizer, conversations: list[list[dict]], whole: list[bool]) -> list[Encoded]:
    rendered = [render(tokenizer, msgs) for msgs in conversations]
    encodings = tokenizer.backend_tokenizer.encode_batch([t for t, _ in rendered], add_special_tokens=False)
    out = []
    for (text, spans), enc, msgs, w in zip(rendered, encodings, conversations, whole):
        ids = np.asarray(enc.ids, dtype=np.int64)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        mask = np.zeros(len(ids), dtype=bool)
        turn_ends = []
        for s, e in spans:
            mask |= (starts >= s) & (ends <= e)
            turn_ends.append(int(np.searchsorted(ends, e, side="right")))
        # a rendered prefix is never "complete": what follows it was not rendered
        out.append(Encoded(ids, mask, turn_ends, complete=w and msgs[-1]["role"] == "assistant"))
    return out


def fit_length(enc: Encoded, max_len: int) -> tuple[Optional[Encoded], bool]:
    """Cut a conversation to at most max_len tokens without ever leaving an assistant turn without its end token:
    the cut goes after the last assistant turn that fits whole; a partial turn is dropped. Trailing non-assistant
    turns are trimmed too (they carry no loss). Returns (encoded or None if not even one turn fits, truncated)."""
    n = len(enc.ids)
    if n <= max_len and enc.complete:
        return enc, False
    fitting = [k for k in enc.turn_ends if k <= max_len]
    if not fitting:
        return None, True
    cut = max(fitting)
    return Encoded(enc.ids[:cut], enc.mask[:cut], [k for k in enc.turn_ends if k <= cut]), n > max_len


def encode_text(tokenizer, texts: list[str], max_len: int) -> list[Encoded]:
    """Plain text (continued pretraining): eos after each document, loss on every token, long documents cut into
    windows of max_len that overlap by one token, so every token is predicted exactly once."""
    eos = tokenizer.eos_token_id
    out = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = np.asarray(enc.ids + ([eos] if eos is not None else []), dtype=np.int64)
        for start in range(0, max(len(ids) - 1, 1), max_len - 1):
            piece = ids[start:start + max_len]
            if len(piece) >= 2:
                out.append(Encoded(piece, np.ones(len(piece), dtype=bool)))
    return out


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic train/val split by a hash of each example's content (stable when examples are added; duplicates
    land on the same side). At least one validation example when val_fraction > 0 and there are two or more."""
    if val_fraction <= 0 or len(examples) < 2:
        return list(examples), []

    def h(ex: Example) -> float:
        digest = hashlib.blake2b(f"{seed}:{ex.key()}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    scored = [(h(ex), i) for i, ex in enumerate(examples)]
    val_idx = {i for s, i in scored if s < val_fraction}
    if not val_idx:
        val_idx = {min(scored)[1]}
    if len(val_idx) == len(examples):
        val_idx.discard(max(scored)[1])
    return ([ex for i, ex in enumerate(examples) if i not in val_idx],
            [ex for i, ex in enumerate(examples) if i in val_idx])


@dataclass
class EncodeStats:
    examples: int = 0
    turns: int = 0  # assistant turns kept
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0  # conversations cut to seq_len (after their last whole assistant turn)
    dropped_too_long: int = 0  # not even the first assistant turn fits in seq_len

    def line(self, name: str) -> str:
        return (f"{name}: {self.examples:,} examples, {self.turns:,} assistant turns, {self.tokens:,} tokens "
                f"({self.trained_tokens:,} trained), {self.truncated:,} truncated, "
                f"{self.dropped_too_long:,} dropped as too long")


def encode_examples(tokenizer, examples: list[Example], max_len: int) -> tuple[list[Encoded], EncodeStats]:
    """Conversations and plain texts as token sequences of at most max_len, with stats."""
    convs = [ex.messages for ex in examples if ex.messages is not None]
    texts = [ex.text for ex in examples if ex.text is not None]
    stats = EncodeStats()
    out = []
    for enc in encode_conversations(tokenizer, convs, max_len) if convs else []:
        fitted, truncated = fit_length(enc, max_len)
        if fitted is None:
            stats.dropped_too_long += 1
            continue
        stats.truncated += truncated
        stats.turns += len(fitted.turn_ends)
        out.append(fitted)
    out += encode_text(tokenizer, texts, max_len) if texts else []
    stats.examples = len(out)
    stats.tokens = sum(len(e.ids) for e in out)
    stats.trained_tokens = sum(int(e.mask[1:].sum()) for e in out)
    return out, stats


def pack(sequences: list[Encoded], max_len: int, seed: int) -> list[Encoded]:
    """Concatenate whole examples (in a seeded shuffled order) into rows of at most max_len tokens. Attention is
    not blocked between examples of a row (like most packing trainers); the first token of each example is
    not a target, so no loss crosses an example boundary."""
    order = np.random.default_rng([seed, 4]).permutation(len(sequences))
    rows, ids, mask = [], [], []
    for i in order:
        s = sequences[i]
        if ids and sum(map(len, ids)) + len(s.ids) > max_len:
            rows.append(Encoded(np.concatenate(ids), np.concatenate(mask)))
            ids, mask = [], []
        m = s.mask.copy()
        m[0] = False
        ids.append(s.ids)
        mask.append(m)
    if ids:
        rows.append(Encoded(np.concatenate(ids), np.concatenate(mask)))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Batches for lib.train.fit.


class SftBatches:
    """Micro-batches of whole examples, padded to the longest in the batch. `get` is a pure function of
    (step, micro, rank, world): example i of the run is entry i mod n of a seeded permutation of epoch i // n, so a
    resumed run sees the same batches. `repeat` lists every example that many times per epoch."""

    def __init__(self, rows: list[Encoded], batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 repeat: int = 1):
        assert rows, "no rows"
        self.rows, self.batch_size, self.grad_accum = rows, batch_size, grad_accum
        self.seed, self.pad_id, self.repeat = seed, pad_id, repeat
        self.n = len(rows) * repeat
        # "tokens" are counted in example slots of the mean length, so that steps x tokens/step = epochs x
        # tokens/epoch exactly (the loop derives max_epochs from these two numbers)
        self.mean_len = max(1, round(sum(len(r.ids) for r in rows) / len(rows)))
        self.tokens_per_epoch = self.n * self.mean_len
        self._perm: dict[int, np.ndarray] = {}

    def _index(self, i: int) -> int:
        epoch = i // self.n
        if epoch not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            self._perm[epoch] = np.random.default_rng([self.seed, 41, epoch]).permutation(self.n)
        return int(self._perm[epoch][i % self.n]) % len(self.rows)

    def collate(self, rows: list[Encoded]) -> dict[str, torch.Tensor]:
        T = max(len(r.ids) for r in rows)
        ids = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=bool)
        for b, r in enumerate(rows):
            ids[b, :len(r.ids)] = r.ids
            mask[b, :len(r.ids)] = r.mask
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        # position t predicts token t+1: the mask belongs to the target
        return {"x": ids_t[:, :-1], "y": ids_t[:, 1:], "mask": mask_t[:, 1:]}

    def get(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        B = self.batch_size
        first = ((step * self.grad_accum + micro) * world + rank) * B
        return self.collate([self.rows[self._index(i)] for i in range(first, first + B)])

    def eval_batches(self, n: int) -> Iterator[dict[str, torch.Tensor]]:
        """The first n*B examples in their fixed order (fewer batches if there are fewer examples)."""
        B = self.batch_size
        for start in range(0, min(n * B, len(self.rows)), B):
            yield self.collate(self.rows[start:start + B])


# ---------------------------------------------------------------------------------------------------------
# The overfitting detector (lib.train.fit's on_eval hook).


def _slope(values: list[float]) -> float:
    x = np.arange(len(values), dtype=np.float64)
    return float(np.polyfit(x, np.asarray(values, dtype=np.float64), 1)[0])


def overfit_signals(history: list[dict], window: int, gap: float) -> tuple[bool, bool, str]:
    """(val loss rising over the last `window` evals, train/val gap above `gap`, a one-line explanation)."""
    vals = [r["val_loss"] for r in history[-window:]]
    rising = len(vals) >= window and _slope(vals) > 0 and vals[-1] > min(vals)
    last = history[-1]
    train = last.get("train_loss")
    g = last["val_loss"] - train if train is not None else None
    wide = g is not None and g > gap
    trend = f"val trend {_slope(vals):+.4f}/eval over {len(vals)} evals" if len(vals) >= 2 else "val trend n/a"
    return rising, wide, trend + (f", train/val gap {g:.3f} (limit {gap})" if g is not None else "")


def overfit_decision(history: list[dict], window: int, gap: float, patience: int) -> tuple[str, str]:
    """'continue', 'moderate overfitting' or 'stop', and why. A pure function of the eval history (so a resumed run
    decides the same): one sign of overfitting (val loss rising over the window, or a train/val gap above the
    limit) is moderate; both signs at `patience` consecutive evals stop the run (the best weights are kept)."""
    if not history:
        return "continue", "no evals yet"
    streak = 0
    for k in range(len(history), 0, -1):
        rising, wide, _ = overfit_signals(history[:k], window, gap)
        if not (rising and wide):
            break
        streak += 1
    rising, wide, why = overfit_signals(history, window, gap)
    if streak >= patience:
        return "stop", f"{why}; val loss rising with a wide gap for {streak} evals"
    if rising or wide:
        return "moderate overfitting", why
    return "continue", why


def make_overfit_detector(sft: SftConfig, log=print):
    def overfitting_detector(history: list[dict]) -> str:
        decision, why = overfit_decision(history, sft.overfit_window, sft.overfit_gap, sft.overfit_patience)
        log(f"overfit check: {why} -> {decision}")
        return decision

    return overfitting_detector


# ---------------------------------------------------------------------------------------------------------
# Base model: our HomeLLM for Llama directories; any other transformers causal LM behind the same interface.


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
    from lib.artifacts import require_stage

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
    import json as _json

    conf = _json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if qlora:
        return _load_4bit(base_dir), "hf"
    if conf.get("model_type") == "llama":
        from lib.model import load_hf

        return load_hf(base_dir), "homellm"
    from transformers import AutoModelForCausalLM

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
    from peft import LoraConfig as PeftLoraConfig
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
    import json as _json

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    model, _ = load_base(base_dir)
    inner = model.hf if isinstance(model, HFCausalLM) else model
    conf = _json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
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
# Generation for samples and the end-of-turn check.


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
            from lib.generate import SamplingParams, generate

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


def chat_sampler(tokenizer, prompts: list[str], max_new_tokens: int, seed: int, system_prompt: Optional[str]):
    """sample_fn for lib.train.fit: each prompt as a user turn, the model's reply sampled (logged at every eval)."""
    stops = end_of_turn_ids(tokenizer)

    def sample(model) -> list[str]:
        out = []
        for p in prompts:
            new, _ = reply_ids(model, prompt_ids(tokenizer, p, system_prompt), max_new_tokens, stops, 0.8, seed)
            out.append(f"{p} -> {tokenizer.decode(new, skip_special_tokens=True)}")
        return out

    return sample


def end_of_turn_check(model, tokenizer, prompts: list[str], system_prompt: Optional[str],
                      max_new_tokens: int = CHECK_MAX_TOKENS) -> dict:
    """Greedy replies to fixed prompts and the share that end their turn (emit <|im_end|>/eos) within
    max_new_tokens instead of rambling on."""
    stops = end_of_turn_ids(tokenizer)
    answers, ended = [], 0
    for p in prompts:
        new, stopped = reply_ids(model, prompt_ids(tokenizer, p, system_prompt), max_new_tokens, stops)
        ended += stopped
        answers.append({"prompt": p, "reply": tokenizer.decode(new, skip_special_tokens=True), "ended_turn": stopped,
                        "tokens": len(new)})
    empty = sum(1 for a in answers if not a["reply"].strip())
    return {"share_ended_turn": ended / len(prompts), "share_empty_replies": empty / len(prompts),
            "max_new_tokens": max_new_tokens, "answers": answers}


# ---------------------------------------------------------------------------------------------------------
# The stage.


def check_coursework_phase2(cfg: Config) -> dict:
    """Coursework rules for phase 2, checked before training; the result goes into the manifest."""
    rules = cfg.coursework
    if not rules.enabled:
        return {"enabled": False}
    t, problems = cfg.sft.train, []
    if rules.max_epochs_phase2 is not None:
        # sft.repeat lists every example `repeat` times per epoch: those are real passes over the data too
        passes = None if t.max_epochs is None else t.max_epochs * cfg.sft.repeat
        if passes is None or passes > rules.max_epochs_phase2:
            problems.append(f"sft.train.max_epochs must be set and sft.train.max_epochs x sft.repeat <= "
                            f"coursework.max_epochs_phase2 ({rules.max_epochs_phase2}); got {t.max_epochs} x "
                            f"{cfg.sft.repeat}")
    if rules.phase1_random_init and cfg.sft.base_model is not None:
        problems.append(f"sft.base_model is {cfg.sft.base_model!r}, but a coursework's phase 2 tunes its own phase-1 "
                        "model (coursework.phase1_random_init); leave sft.base_model unset")
    if rules.cpu_only and (cfg.sft.lora.qlora or t.precision == "fp16"):
        problems.append("sft.lora.qlora / sft.train.precision fp16 are GPU modes, but coursework.cpu_only is set")
    if problems:
        raise UserError("coursework rules violated:\n  " + "\n  ".join(problems))
    return {"enabled": True, "max_epochs_phase2": rules.max_epochs_phase2, "max_epochs": t.max_epochs,
            "repeat": cfg.sft.repeat, "base": "phase-1 model", "cpu_only": rules.cpu_only, "checked": "passed"}


def build_datasets(cfg: Config, tokenizer, log=print) -> tuple[SftBatches, Optional[SftBatches], dict]:
    """Load, split, encode (and pack) the SFT data; print and return the stats."""
    sft, t = cfg.sft, cfg.sft.train
    examples, sources = load_sft_examples(sft, cfg.base_dir)
    train_ex, val_ex = split_examples(examples, sft.val_fraction, cfg.seed)
    max_len = t.seq_len + 1  # x and y are the first and last seq_len tokens
    train_enc, train_stats = encode_examples(tokenizer, train_ex, max_len)
    val_enc, val_stats = encode_examples(tokenizer, val_ex, max_len)
    for s in sources:
        log(f"sft data: sft.data[{s['index']}] {s['type']} as {s['format']}: {s['records']:,} records, "
            f"{s['examples']:,} examples, {s['skipped_no_reply']:,} skipped (no assistant reply)")
    log(train_stats.line("train"))
    log(val_stats.line("val"))
    if not train_enc:
        raise UserError(f"sft.data: no training example fits in sft.train.seq_len={t.seq_len} tokens (every one was "
                        f"dropped as too long: {train_stats.dropped_too_long}); raise sft.train.seq_len")
    if not val_enc:
        log(f"warning: no validation example (sft.val_fraction={sft.val_fraction}, {val_stats.dropped_too_long} dropped "
            "as too long): no evals, no overfitting detector, the last step's weights are kept")
    if sft.packing:
        train_enc = pack(train_enc, max_len, cfg.seed)
        val_enc = pack(val_enc, max_len, cfg.seed) if val_enc else val_enc
        log(f"packing: {len(train_enc):,} train rows of <= {max_len} tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = SftBatches(train_enc, t.batch_size, t.grad_accum, cfg.seed, pad, sft.repeat)
    val = SftBatches(val_enc, t.batch_size, 1, cfg.seed, pad) if val_enc else None
    stats = {"sources": sources, "train": vars(train_stats), "val": vars(val_stats),
             "packed_rows": len(train_enc) if sft.packing else None}
    return train, val, stats


def write_generation_config(out: Path, tokenizer) -> None:
    from lib.artifacts import atomic_write_json

    atomic_write_json(out / "generation_config.json", {
        "_from_model_config": False, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": end_of_turn_ids(tokenizer),
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id})


def save_model_dir(model, out: Path, tokenizer) -> None:
    """An HF directory: weights + config.json, tokenizer files with the chat template, generation_config.json."""
    from lib.tokenizer import save_tokenizer

    if not isinstance(model, HFCausalLM):
        from lib.model import save_hf

        save_hf(model, out, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    else:
        model.hf.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    write_generation_config(out, tokenizer)


def run_sft(cfg: Config) -> Path:
    from safetensors.torch import load_file

    from lib.artifacts import stage_output
    from lib.pretrain import make_accelerator, work_dir
    from lib.tokenizer import load_tokenizer
    from lib.tracking import METRICS, PLOT, SAMPLES, TB_DIR
    from lib.train import fit

    sft, t = cfg.sft, cfg.sft.train
    rules = check_coursework_phase2(cfg)
    if sft.lora.qlora:
        check_qlora()
    base_dir = resolve_base_model(cfg)
    tokenizer = prepare_tokenizer(load_tokenizer(base_dir), str(base_dir))
    accelerator, note = make_accelerator(t.precision, cfg.coursework.enabled and cfg.coursework.cpu_only)
    log = accelerator.print
    train, val, data_stats = build_datasets(cfg, tokenizer, log)

    torch.manual_seed(cfg.seed)
    model, kind = load_base(base_dir, qlora=sft.lora.qlora)
    vocab = model.args.vocab_size if kind == "homellm" else model.hf.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise UserError(f"{base_dir}: the tokenizer has {len(tokenizer)} tokens but the model only {vocab} embedding "
                        "rows; the tokenizer does not belong to this model")
    max_seq = model.args.max_seq_len if kind == "homellm" else getattr(model.hf.config, "max_position_embeddings", None)
    if max_seq is not None and t.seq_len > max_seq:
        raise UserError(f"sft.train.seq_len: {t.seq_len} is longer than the base model's context ({max_seq} tokens); "
                        f"lower sft.train.seq_len")
    n_params = model.num_params()
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    peft_model, lora_info = (apply_lora(model, sft.lora, n_params) if sft.lora.enabled or sft.lora.qlora
                             else (None, None))
    mode = "qlora" if sft.lora.qlora else "lora" if peft_model is not None else "full"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"sft: base {base_dir} ({n_params / 1e6:.2f}M parameters), {mode} fine-tuning: {trainable:,} trainable"
        + (f" (LoRA rank {lora_info['rank']}, alpha {lora_info['alpha']:g}, on {', '.join(lora_info['target_modules'])})"
           if lora_info else ""))

    world = accelerator.num_processes
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and mode != "full":
        raise UserError(f"sft.lora: LoRA/QLoRA is not supported under {accelerator.distributed_type.value} here; "
                        "launch with config/accelerate/ddp.yaml (LoRA's few trainable weights need no sharding) "
                        "or set sft.lora.enabled: false for full fine-tuning")
    work = work_dir(cfg, "04_sft")
    prompts = t.sample_prompts or CHECK_PROMPTS[:1]
    result = fit(model, train, val, t, work, seed=cfg.seed, accelerator=accelerator, precision_note=note,
                 world_batch_tokens=t.batch_size * t.grad_accum * world * train.mean_len,
                 flops_per_token=model.estimate_flops_per_token(t.seq_len),
                 sample_fn=chat_sampler(tokenizer, prompts, t.sample_tokens, cfg.seed, sft.system_prompt),
                 on_eval=make_overfit_detector(sft, log) if val is not None else None, config_name="sft.train")
    final = stage_dir(cfg, "04_sft")
    if not accelerator.is_main_process:
        return final
    if sharded:  # the processes each hold a shard: publish from the weights file fit gathered whole
        model, _ = load_base(base_dir)
        model.load_state_dict(load_file(str(result.weights_path)))
    else:
        model = accelerator.unwrap_model(model)
        if result.best_path is not None:  # the weights of the best eval, not the last step
            model.load_state_dict(load_file(str(result.best_path)))
    model = model.float() if mode != "qlora" else model

    with stage_output(cfg, "04_sft") as (out, extra):
        if peft_model is not None:
            peft_model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
            peft_model.save_pretrained(str(out / "adapter"), safe_serialization=True)
            if sft.lora.merge:
                if mode == "lora":
                    merged = peft_model.merge_and_unload()  # W + B @ A * alpha / rank, adapters removed
                    if isinstance(model, HFCausalLM):
                        model.hf = merged
                    else:
                        model = merged
                else:  # QLoRA: merge into the full-precision base, not into its 4-bit copy
                    model = merge_adapter(base_dir, out / "adapter")
                save_model_dir(model, out, tokenizer)
            else:  # the adapter alone: the export stage merges it into the base
                from lib.tokenizer import save_tokenizer

                save_tokenizer(tokenizer, out)
                write_generation_config(out, tokenizer)
        else:
            save_model_dir(model, out, tokenizer)
        for name in (METRICS, SAMPLES, PLOT):
            if (work / name).exists():
                shutil.copy2(work / name, out / name)
        if (work / TB_DIR).exists():
            shutil.copytree(work / TB_DIR, out / TB_DIR)

        check = end_of_turn_check(model, tokenizer, CHECK_PROMPTS, sft.system_prompt)
        for a in check["answers"]:
            log(f"  Q: {a['prompt']}\n  A: {a['reply']!r}{'' if a['ended_turn'] else '  [no end of turn]'}")
        log(f"end-of-turn check: {check['share_ended_turn']:.0%} of {len(CHECK_PROMPTS)} prompts ended their turn "
            f"within {check['max_new_tokens']} tokens ({check['share_empty_replies']:.0%} with an empty reply)")
        extra.update({
            "base_model": str(base_dir.resolve()), "base_kind": kind, "mode": mode, "lora": lora_info,
            "weights": ("adapter only (merged at export)" if peft_model is not None and not sft.lora.merge
                        else "merged" if peft_model is not None else "full") +
                       (", best val loss" if result.best_path else ", last step"),
            "parameters": n_params, "trainable_parameters": trainable, "data": data_stats,
            "steps": result.steps, "tokens": result.tokens, "epochs": result.tokens / train.tokens_per_epoch,
            "stop_reason": result.stop_reason, "precision": result.precision, "train_seconds": result.elapsed_s,
            "best_val_loss": result.best_val_loss, "final_eval": result.last_val, "history": result.history,
            "coursework": rules, "end_of_turn": check, "processes": world,
        })
    log(f"instruction-tuned model: {final}  (val loss {result.last_val.get('val_loss', float('nan')):.4f}; "
        f"{result.stop_reason}; {check['share_ended_turn']:.0%} of replies end their turn)")
    return final


def sft_stage(cfg: Config, force: bool = False) -> Path:
    """Stage 04_sft: reuse a complete output, or train (resuming from a checkpoint; from scratch with force)."""
    from lib.artifacts import is_complete
    from lib.pretrain import work_dir

    final = stage_dir(cfg, "04_sft")
    if is_complete(final):
        if not force:
            print(f"04_sft: {final} is already complete; reusing it (use --force to train again)")
            return final
        shutil.rmtree(work_dir(cfg, "04_sft"), ignore_errors=True)  # start over instead of resuming
    return run_sft(cfg)
