"""Stage 04: instruction tuning (phase 2) — the overfitting detector, samples and the end-of-turn check, and the
stage itself (full fine-tuning or LoRA) on top of the shared loop in lib/train/loop.py.

    final = run_sft(cfg)     # artifacts/04_sft/<hash>/: HF model dir (+ adapter/), metrics, manifest

What the model is trained on is exactly what `tokenizer.apply_chat_template(messages)` produces with the chat
template stored in the tokenizer (ChatML from stage 02). The loss covers only the assistant turns: their content and
the end-of-turn token `<|im_end|>`, so the model learns to stop. Reading and converting data formats is
lib/data/sft_data.py; rows, masks and batches lib/train/sft_batches.py; the base model and LoRA lib/train/base_model.py; exporting
to GGUF/Ollama lib/export/exporter.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from lib.artifacts import require_stage, stage_output
from lib.chat import end_of_turn_ids, prepare_tokenizer, prompt_ids
from lib.config import Config, SftConfig
from lib.data.sft_data import load_sft_examples
from lib.data.tokenizer import load_tokenizer, save_tokenizer
from lib.errors import UserError
from lib.model.hf_io import save_model_dir, write_generation_config
from lib.stages import stage_dir
from lib.train.base_model import (
    HFCausalLM,
    apply_lora,
    check_qlora,
    load_base,
    merge_adapter,
    reply_ids,
    resolve_base_model,
)
from lib.train.coursework import check_coursework_phase2
from lib.train.loop import Run, evaluate, fit, make_accelerator, reuse_or_train, work_dir
from lib.train.sft_batches import SftBatches, encode_examples, pack, split_examples
from lib.train.tracking import copy_run_logs

# Fixed prompts of the end-of-turn check after training (and the default samples of the stage log).
CHECK_PROMPTS = ["Hi! How are you?", "What is your name?", "What did you do today?", "Do you like music?",
                 "Tell me about your weekend.", "What is your favourite food?", "Where do you live?",
                 "Can you recommend a good book?"]
CHECK_MAX_TOKENS = 64


# ---------------------------------------------------------------------------------------------------------
# The overfitting detector (lib.train.loop.fit's on_eval hook).


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
# Generation for samples and the end-of-turn check.


def chat_sampler(tokenizer, prompts: list[str], max_new_tokens: int, seed: int, system_prompt: Optional[str]):
    """sample_fn for lib.train.loop.fit: each prompt as a user turn, the model's reply sampled (logged at every eval)."""
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


def _phase1_dirs(cfg: Config) -> tuple[Path | None, Path | None]:
    """The phase-1 model's folder and the pipeline's tokenizer folder, for the coursework rules of a phase 2 that
    tunes the pipeline's own model."""
    if not cfg.coursework.enabled or cfg.sft.base_model is not None:
        return None, None
    return (require_stage(cfg, "03_pretrain", "Run: python 03_pretrain.py (or snakemake pretrained)."),
            require_stage(cfg, "02_tokenizer", "Run: python 02_train_tokenizer.py (or snakemake tokenizer)."))


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


def train_sft(cfg: Config) -> Path:

    sft, t = cfg.sft, cfg.sft.train
    rules = check_coursework_phase2(cfg, *_phase1_dirs(cfg))
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
    base_val = None
    if val is not None and not sharded:  # the base model's val loss: what the fine-tune is judged against
        base_val = evaluate(model.to(accelerator.device), val, t.eval_batches, accelerator)
        log(f"val loss before fine-tuning: {base_val:.4f}")
    result = fit(model, train, val, Run(
        t, work, accelerator, seed=cfg.seed, precision_note=note,
        world_batch_tokens=t.batch_size * t.grad_accum * world * train.mean_len,
        flops_per_token=model.estimate_flops_per_token(t.seq_len),
        sample_fn=chat_sampler(tokenizer, prompts, t.sample_tokens, cfg.seed, sft.system_prompt),
        on_eval=make_overfit_detector(sft, log) if val is not None else None, config_name="sft.train",
        run_name=cfg.name))
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
                save_tokenizer(tokenizer, out)
                write_generation_config(out, tokenizer)
        else:
            save_model_dir(model, out, tokenizer)
        copy_run_logs(work, out)

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
            "base_val_loss": base_val, "best_val_loss": result.best_val_loss, "final_eval": result.last_val,
            "history": result.history,
            "coursework": rules, "end_of_turn": check, "processes": world,
        })
    log(f"instruction-tuned model: {final}  (val loss {result.last_val.get('val_loss', float('nan')):.4f}; "
        f"{result.stop_reason}; {check['share_ended_turn']:.0%} of replies end their turn)")
    return final


def run_sft(cfg: Config, force: bool = False) -> Path:
    """Stage 04_sft: reuse a complete output, or train (resuming from a checkpoint; from scratch with force)."""
    return reuse_or_train(cfg, "04_sft", train_sft, force)
