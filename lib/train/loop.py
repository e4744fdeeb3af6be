"""The one training loop, shared by pretraining (phase 1) and SFT (phase 2).

The shape is nanoGPT's: a pure `get_lr(progress)`, eval and checkpoint on schedule, gradient-accumulation micro-steps,
clip, step, one fixed-format log line per interval. What it adds for home users:
- stop conditions: max steps / tokens / epochs and a wall-clock budget ("train for 30 minutes"); the cosine schedule
  follows whichever is nearest, so a time-budgeted run still ends at min_lr;
- checkpoints every N steps and on SIGINT/SIGTERM, and automatic resume (even after `kill -9`) that continues
  bit-for-bit as if never interrupted: model, optimizer, RNG states and data position are all restored;
- evaluation (loss, perplexity, bits per byte), sampled continuations, early stopping, keep best and last;
- an `on_eval` hook (SFT's overfitting detector) that may stop the run;
- precision picked from what the hardware really does fast (bf16 autocast only where the CPU has bf16 units);
- distribution through HF accelerate (DDP on CPU with gloo, or GPUs; FSDP/DeepSpeed via `accelerate launch`).

Data sources implement `Batches`: `get(step, micro, rank, world)` returns the micro-batch for that position, so a
resumed run sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import torch

from lib.config import Config, TrainConfig
from lib.errors import UserError
from lib.hardware import training_precision
from lib.stages import stage_hash
from lib.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_weights
from lib.train.tracking import Tracker


class Batches(Protocol):
    tokens_per_epoch: int  # target tokens in one pass over the data

    def get(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """Micro-batch `micro` of optimizer step `step` for process `rank`: {"x", "y", optional "mask"} (B, T)."""

    def eval_batches(self, n: int) -> Iterator[dict[str, torch.Tensor]]:
        """A fixed sequence of n validation batches (the same at every eval)."""


# -----------------------------------------------------------------------------------------------------------
# Precision


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Matmul FLOP/s this device reaches right now, for an honest MFU figure."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


# -----------------------------------------------------------------------------------------------------------
# Schedule and stop conditions


def get_lr(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from lr to min_lr as `progress` goes 0 → 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 → 0
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def planned_steps(cfg: TrainConfig, tokens_per_step: int, tokens_per_epoch: int) -> Optional[int]:
    """The step limit implied by max_steps / max_tokens / max_epochs (None if only a time budget is set)."""
    limits = []
    if cfg.max_steps is not None:
        limits.append(cfg.max_steps)
    if cfg.max_tokens is not None:
        limits.append(math.ceil(cfg.max_tokens / tokens_per_step))
    if cfg.max_epochs is not None:
        limits.append(max(1, math.ceil(cfg.max_epochs * tokens_per_epoch / tokens_per_step)))
    return min(limits) if limits else None


def progress_of(step: int, total_steps: Optional[int], elapsed_s: float, cfg: TrainConfig) -> float:
    """How far through the run we are: the furthest of the step limit and the time budget."""
    p = 0.0
    if total_steps:
        p = max(p, step / total_steps)
    if cfg.time_budget_min:
        p = max(p, elapsed_s / (cfg.time_budget_min * 60))
    return p


def work_dir(cfg: Config, stage: str) -> Path:
    """Checkpoints and logs of a training stage: beside the artifacts, not a declared output (survives failures)."""
    return Path(cfg.artifacts_dir) / "checkpoints" / stage / stage_hash(cfg, stage)


def make_accelerator(precision: str, cpu_only: bool):
    """An accelerate Accelerator with the precision the hardware does fast; returns (accelerator, note)."""
    from accelerate import Accelerator  # heavy (~1 s); only a training run needs it

    device_type = "cuda" if torch.cuda.is_available() and not cpu_only else "cpu"
    mixed, note = training_precision(precision, device_type)
    accelerator = Accelerator(mixed_precision=mixed, cpu=device_type == "cpu")
    asked = [k for k in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{k}", "").lower() in ("1", "true")]
    if asked and device_type == "cpu":  # accelerate shards on GPUs only; say so instead of pretending
        note += (f"; {asked[0]} needs CUDA GPUs, so these {accelerator.num_processes} CPU processes train as "
                 "plain data parallel (DDP over gloo)")
    return accelerator, note


# -----------------------------------------------------------------------------------------------------------
# The loop


BEST = "best.safetensors"
LAST = "last.safetensors"


@dataclass
class FitResult:
    steps: int
    tokens: int
    best_val_loss: Optional[float]
    last_val: dict
    stop_reason: str
    elapsed_s: float
    precision: str
    best_path: Optional[Path] = None  # weights of the best eval (safetensors), None if no eval ran
    last_path: Optional[Path] = None  # weights of the last step, gathered whole from every process

    @property
    def weights_path(self) -> Path:
        """The weights to publish: the best eval's, else the last step's (whole, also after sharded training)."""
        return self.best_path or self.last_path
    history: list = field(default_factory=list)


class _StopSignal:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (so it can checkpoint and exit)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # second Ctrl+C: give up immediately
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (dim >= 2), none on norms, biases and other vectors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model, data: Batches, n_batches: int, accelerator) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in data.eval_batches(n_batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            _, loss = model(batch["x"], targets=batch["y"], loss_mask=batch.get("mask"))
        total += loss.item()
        count += 1
    model.train()
    return total / max(count, 1)


def fit(model: torch.nn.Module, train: Batches, val: Optional[Batches], cfg: TrainConfig, work_dir: Path, *,
        seed: int, accelerator, precision_note: str, world_batch_tokens: int, flops_per_token: float,
        bytes_per_token: Optional[float] = None, sample_fn: Optional[Callable[[torch.nn.Module], list[str]]] = None,
        on_eval: Optional[Callable[[list[dict]], str]] = None, config_name: str = "pretrain") -> FitResult:
    """Train `model` until a stop condition; resume from work_dir's latest checkpoint if there is one.

    work_dir lives outside the stage's declared outputs, so a failed or killed run keeps it and a rerun resumes.
    It holds the checkpoints, best.safetensors and the logs (metrics.jsonl, TensorBoard events, samples, loss.png).
    world_batch_tokens: tokens per optimizer step across all processes (for tok/s, max_tokens and epochs).
    on_eval(history) -> "continue" | "stop" | any other text to log (e.g. "moderate overfitting").
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=False)
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds is not None:  # DeepSpeed wants the micro-batch size, which it usually reads off a DataLoader we don't use
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    # checkpoints go through torch's distributed state-dict API, which knows DDP and FSDP wrappers but not
    # accelerate's optimizer wrapper
    raw_optimizer = getattr(optimizer, "optimizer", optimizer)

    total_steps = planned_steps(cfg, world_batch_tokens, train.tokens_per_epoch)
    state = {"tokens": 0, "elapsed_s": 0.0, "best_val_loss": None, "bad_evals": 0, "history": []}
    ckpt = latest_checkpoint(work_dir)
    step = 0
    if ckpt is not None:
        loaded = load_checkpoint(ckpt, model, raw_optimizer, accelerator)
        step = loaded.pop("step")
        state.update(loaded)
        accelerator.print(f"resuming from {ckpt} (step {step}, {state['tokens']:,} tokens, "
                          f"{state['elapsed_s']:.0f}s trained so far)")

    tracker = Tracker(work_dir, enabled=is_main, start_step=step, total_steps=total_steps, time_budget_min=cfg.time_budget_min,
                      history=state["history"])
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    peak = measure_peak_flops(accelerator.device, compute_dtype)
    tracker.info(f"precision: {precision_note}; device {accelerator.device} x{world}; "
                 f"{world_batch_tokens:,} tokens/step; matmul peak {peak / 1e9:.0f} GFLOP/s"
                 + (f"; planned steps {total_steps}" if total_steps else "")
                 + (f"; time budget {cfg.time_budget_min} min" if cfg.time_budget_min else ""))

    stop_reason = None
    last_val: dict = {}
    t_start = time.perf_counter() - state["elapsed_s"]
    t_log, tokens_log = time.perf_counter(), state["tokens"]
    model.train()
    last_good = ckpt

    def save(current_step: int):  # every process takes part: sharded state is gathered, the main process writes
        nonlocal last_good
        accelerator.wait_for_everyone()
        state["elapsed_s"] = time.perf_counter() - t_start
        last_good = save_checkpoint(work_dir, current_step, model, raw_optimizer, state, is_main=is_main,
                                    accelerator=accelerator)
        accelerator.wait_for_everyone()

    def run_eval(current_step: int) -> Optional[str]:
        nonlocal last_val
        if val is None:
            return None
        loss = evaluate(model, val, cfg.eval_batches, accelerator)
        loss = accelerator.reduce(torch.tensor(loss, device=accelerator.device), reduction="mean").item()
        record = {"step": current_step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
                  "train_loss": tracker.recent_train_loss()}
        if bytes_per_token:
            record["val_bpb"] = loss / math.log(2) / bytes_per_token
        improved = state["best_val_loss"] is None or loss < state["best_val_loss"]
        if improved:
            state["best_val_loss"] = loss
            state["bad_evals"] = 0
            save_weights(model, work_dir / BEST, is_main=is_main, accelerator=accelerator)
        else:
            state["bad_evals"] += 1
        state["history"].append(record)
        decision = on_eval(state["history"]) if on_eval else None
        if decision:
            record["decision"] = decision
        samples = sample_fn(accelerator.unwrap_model(model)) if (sample_fn and is_main) else []
        tracker.eval(record, samples)
        last_val = record
        if decision == "stop":
            return f"stopped by {on_eval.__name__ if hasattr(on_eval, '__name__') else 'eval hook'} at step {current_step}"
        if cfg.patience is not None and state["bad_evals"] >= cfg.patience:
            return f"early stopping: val loss did not improve for {cfg.patience} evals"
        return None

    with _StopSignal() as stop:
        while True:
            elapsed = time.perf_counter() - t_start
            if total_steps is not None and step >= total_steps:
                stop_reason = f"reached {total_steps} steps"
            elif cfg.time_budget_min is not None and elapsed >= cfg.time_budget_min * 60:
                stop_reason = f"time budget of {cfg.time_budget_min} min used"
            elif cfg.stop_at_step is not None and step >= cfg.stop_at_step:
                stop_reason = f"stopped at step {step} (stop_at_step; the schedule is the full run's)"
            if stop_reason:
                break

            lr = get_lr(step, progress_of(step, total_steps, elapsed, cfg), cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss_sum = 0.0
            try:
                for micro in range(cfg.grad_accum):
                    batch = {k: v.to(accelerator.device, non_blocking=True)
                             for k, v in train.get(step, micro, rank, world).items()}
                    sync = micro == cfg.grad_accum - 1
                    with (accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()):
                        with accelerator.autocast():
                            _, loss = model(batch["x"], targets=batch["y"], loss_mask=batch.get("mask"))
                        accelerator.backward(loss / cfg.grad_accum)
                    loss_sum += loss.detach().float().item()
            except torch.OutOfMemoryError:
                raise UserError(_oom_message(cfg, config_name)) from None
            except RuntimeError as e:
                if "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower():
                    raise UserError(_oom_message(cfg, config_name)) from None
                raise

            train_loss = loss_sum / cfg.grad_accum
            if world > 1:  # log the loss of the global batch, comparable with a single-process run
                train_loss = accelerator.reduce(torch.tensor(train_loss, device=accelerator.device), "mean").item()
            if not math.isfinite(train_loss):
                where = f"the last good checkpoint {last_good} is kept" if last_good else "no checkpoint was written yet"
                raise UserError(
                    f"{config_name}: the training loss became {train_loss} at step {step}; stopped ({where}). "
                    f"Lower {config_name}.lr (now {cfg.lr}), raise {config_name}.warmup_steps or set "
                    f"{config_name}.grad_clip, then rerun: it resumes from the last good checkpoint.")
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["tokens"] += world_batch_tokens

            if step % cfg.log_every == 0 or step == 1:
                now = time.perf_counter()
                tok_s = (state["tokens"] - tokens_log) / max(now - t_log, 1e-9)
                t_log, tokens_log = now, state["tokens"]
                tracker.step(step, train_loss, lr, tok_s, tok_s * flops_per_token / (peak * world),
                             now - t_start, state["tokens"])
            else:
                tracker.observe_loss(train_loss)

            if step % cfg.eval_every == 0:
                stop_reason = run_eval(step)
            if step % cfg.ckpt_every == 0 or stop_reason:
                save(step)
            if stop.received is not None:
                save(step)
                tracker.info(f"received signal {stop.received}: checkpoint saved at step {step}; rerun to resume")
                tracker.close(ended="stopped")
                raise KeyboardInterrupt
            if stop_reason:
                break

    if not last_val or last_val.get("step") != step:
        reason = run_eval(step)
        stop_reason = stop_reason or reason
    save(step)
    save_weights(model, work_dir / LAST, is_main=is_main, accelerator=accelerator)
    tracker.info(f"done: {stop_reason}; {step} steps, {state['tokens']:,} tokens, "
                 f"{time.perf_counter() - t_start:.0f}s")
    tracker.close()
    return FitResult(steps=step, tokens=state["tokens"], best_val_loss=state["best_val_loss"], last_val=last_val,
                     stop_reason=stop_reason, elapsed_s=time.perf_counter() - t_start, precision=precision_note,
                     best_path=work_dir / BEST if state["best_val_loss"] is not None else None,
                     last_path=work_dir / LAST, history=state["history"])


def _oom_message(cfg: TrainConfig, name: str) -> str:
    return (f"{name}: a batch of {cfg.batch_size} x {cfg.seq_len} tokens does not fit in memory. Lower "
            f"{name}.batch_size (e.g. to {max(1, cfg.batch_size // 2)} with {name}.grad_accum={cfg.grad_accum * 2} "
            f"to keep the same tokens per step), lower {name}.seq_len, or set {name}.grad_checkpointing: true.")
