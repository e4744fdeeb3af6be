"""Stage 03: phase-1 causal-LM pretraining from random weights on the encoded corpus of stage 02.

Reads artifacts/02_tokens/<h>/{train,val}.bin through np.memmap (windows of seq_len+1 tokens), builds our HomeLLM
from the `model` section, runs the shared loop in lib/train/loop.py and publishes an HF-format model directory
(config.json + model.safetensors + tokenizer files) that stages 04-07 and transformers load as-is.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from lib.artifacts import read_json, require_stage, stage_output
from lib.config import Config
from lib.data.tokenizer import load_tokenizer
from lib.errors import UserError
from lib.hardware import training_compile
from lib.model.hf_io import save_hf
from lib.model.homellm import HomeLLM, model_args
from lib.stages import stage_dir
from lib.train.base_model import reply_ids
from lib.train.coursework import check_coursework_phase1
from lib.train.loop import Run, fit, make_accelerator, planned_steps, reuse_or_train, work_dir
from lib.train.tracking import copy_run_logs


class TokenWindows:
    """Training/eval windows over a flat token file. `get` is a pure function of (step, micro, rank), so resuming
    at step k yields exactly the batches an uninterrupted run sees, and 2 processes with batch B see the same
    windows as 1 process with batch 2B."""

    def __init__(self, path: Path, dtype: str, seq_len: int, batch_size: int, grad_accum: int, sampling: str,
                 seed: int, what: str):
        self.data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.seq_len, self.batch_size, self.grad_accum = seq_len, batch_size, grad_accum
        self.sampling, self.seed = sampling, seed
        if len(self.data) < seq_len + 2:
            raise UserError(f"{path}: the {what} split has only {len(self.data)} tokens, fewer than one window of "
                            f"seq_len+1 = {seq_len + 1}; add text, raise data.val_fraction, or lower the seq_len.")
        self.tokens_per_epoch = len(self.data)

    def _gather(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]  # (B, T+1)
        window = torch.from_numpy(self.data[idx].astype(np.int64))
        return {"x": window[:, :-1], "y": window[:, 1:]}

    def get(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        if self.sampling == "random":
            rng = np.random.default_rng([self.seed, step, micro])
            starts = rng.integers(0, len(self.data) - T - 1, size=B * world)[rank * B:(rank + 1) * B]
        else:
            n_windows = (len(self.data) - 1) // T
            first = ((step * self.grad_accum + micro) * world + rank) * B
            starts = ((first + np.arange(B)) % n_windows) * T
        return self._gather(starts)

    def eval_batches(self, n: int) -> Iterator[dict[str, torch.Tensor]]:
        """n batches of windows spread evenly over the file (the same every time)."""
        T = self.seq_len
        count = min(n * self.batch_size, (len(self.data) - 1) // T)
        starts = np.linspace(0, len(self.data) - T - 1, num=count).astype(np.int64)
        for i in range(0, count, self.batch_size):
            yield self._gather(starts[i:i + self.batch_size])


def sampler(tokenizer, prompts: list[str], max_new_tokens: int, seed: int):
    """A function that samples a continuation of each prompt (logged at every eval), with the same reply helper
    as SFT's samples and the export's reference (lib.train.base_model.reply_ids)."""
    stops = [tokenizer.eos_token_id]

    def sample(model) -> list[str]:
        out = []
        for prompt in prompts:
            new, _ = reply_ids(model, tokenizer.encode(prompt, add_special_tokens=False), max_new_tokens, stops, 0.8,
                               seed)
            out.append(prompt + tokenizer.decode(new, skip_special_tokens=True))
        return out

    return sample


def publish_model(model, tokenizer_dir: Path, out: Path, weights: Path | None, tokenizer) -> None:
    """Write an HF-format model directory: our weights under Llama names, the tokenizer files, generation config."""
    if weights is not None:
        model.load_state_dict(load_file(str(weights)))
    save_hf(model, out, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and f.name != "manifest.json":
            shutil.copy2(f, out / f.name)


def train_pretrain(cfg: Config) -> Path:
    tokens_dir = require_stage(cfg, "02_tokens", "Run: python 02_train_tokenizer.py --encode (or snakemake tokens).")
    tok_dir = require_stage(cfg, "02_tokenizer", "Run: python 02_train_tokenizer.py (or snakemake tokenizer).")
    meta = read_json(tokens_dir / "meta.json")
    tokenizer = load_tokenizer(tok_dir)
    if meta["vocab_size"] != len(tokenizer):
        raise UserError(f"{tokens_dir}/meta.json: the token files were encoded with a vocabulary of "
                        f"{meta['vocab_size']} but {tok_dir} has {len(tokenizer)} tokens; rerun the encode stage.")
    rules = check_coursework_phase1(cfg, require_stage(cfg, "01_data", "Run: python 01_prepare_data.py."), tok_dir)
    t = cfg.pretrain
    args = model_args(cfg.model, vocab_size=len(tokenizer))
    if t.seq_len > args.max_seq_len:
        raise UserError(f"pretrain.seq_len: {t.seq_len} is larger than the model's max_seq_len {args.max_seq_len}; "
                        f"lower pretrain.seq_len or raise model.max_seq_len.")

    accelerator, note = make_accelerator(t.precision, cfg.coursework.enabled and cfg.coursework.cpu_only)
    torch.manual_seed(cfg.seed)
    model = HomeLLM(args)  # phase 1 always starts from random weights
    if t.grad_checkpointing:
        model.set_grad_checkpointing(True)
    accelerator.print(f"model: {args} — {model.num_params() / 1e6:.2f}M parameters")
    world = accelerator.num_processes
    windows = dict(dtype=meta["dtype"], seq_len=t.seq_len, batch_size=t.batch_size, grad_accum=t.grad_accum,
                   sampling=t.sampling, seed=cfg.seed)
    train = TokenWindows(tokens_dir / "train.bin", what="train", **windows)
    val = TokenWindows(tokens_dir / "val.bin", what="val", **windows)
    world_batch_tokens = t.batch_size * t.seq_len * t.grad_accum * world
    compiled, compile_note = training_compile(t.compile, accelerator.device.type,
                                              planned_steps(t, world_batch_tokens, train.tokens_per_epoch), world)
    if compiled:
        model.compile_for_training()
    work = work_dir(cfg, "03_pretrain")
    result = fit(model, train, val, Run(
        t, work, accelerator, seed=cfg.seed, precision_note=f"{note}; {compile_note}",
        world_batch_tokens=world_batch_tokens,
        flops_per_token=model.estimate_flops_per_token(t.seq_len), bytes_per_token=meta["val_bytes_per_token"],
        sample_fn=sampler(tokenizer, t.sample_prompts, t.sample_tokens, cfg.seed) if t.sample_prompts else None,
        config_name="pretrain", run_name=cfg.name))
    final = stage_dir(cfg, "03_pretrain")
    if not accelerator.is_main_process:
        return final
    # publish from the weights file fit gathered whole (best eval, else last step): right after sharded training too
    model = HomeLLM(args).float()
    with stage_output(cfg, "03_pretrain") as (out, extra):
        publish_model(model, tok_dir, out, result.weights_path, tokenizer)
        copy_run_logs(work, out)
        extra.update({
            "model": {k: v for k, v in vars(args).items()}, "parameters": model.num_params(),
            "steps": result.steps, "tokens": result.tokens, "epochs": result.tokens / train.tokens_per_epoch,
            "stop_reason": result.stop_reason, "precision": result.precision, "train_seconds": result.elapsed_s,
            "best_val_loss": result.best_val_loss, "final_eval": result.last_val, "coursework": rules,
            "weights": "best val loss" if result.best_path else "last step", "processes": world,
            "compiled": compiled,  # what compile: auto decided; a submission bundle pins it for the re-run
        })
    print(f"pretrained model: {final}  (val loss {result.last_val.get('val_loss', float('nan')):.4f}, "
          f"bpb {result.last_val.get('val_bpb', float('nan')):.4f}; {result.stop_reason})")
    return final


def run_pretrain(cfg: Config, force: bool = False) -> Path:
    """Stage 03_pretrain: reuse a complete output, or train (resuming from a checkpoint; from scratch with force)."""
    return reuse_or_train(cfg, "03_pretrain", train_pretrain, force)
