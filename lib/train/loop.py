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
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from lib.artifacts import is_complete
from lib.config import Config, TrainConfig
from lib.errors import UserError
from lib.hardware import keep_freed_memory, training_precision
from lib.stages import stage_dir, stage_hash
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
    """Matmul FLOP/s this device reaches right now, for an honest MFU figure. On a 2-core AMX CPU in bf16 a 2048^3
    GEMM runs at ~2,000 GFLOP/s and a 1024^3 one at ~1,200, which would overstate the MFU by 1.7x."""
    n = 2048 if device.type == "cpu" else 8192
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


def reuse_or_train(cfg: Config, stage: str, train: Callable[[Config], Path], force: bool = False) -> Path:
    """A training stage's entry: its complete output as it is, or train(cfg), which resumes from the work dir's
    last checkpoint; with force the work dir is dropped first, so training starts over."""
    final = stage_dir(cfg, stage)
    if is_complete(final):
        if not force:
            print(f"{stage}: {final} is already complete; reusing it (use --force to train again)")
            return final
        shutil.rmtree(work_dir(cfg, stage), ignore_errors=True)
    return train(cfg)


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


@dataclass
class Run:
    """What fit() trains with besides the model and the data, grouped: the phase's settings, where its state lives,
    and how it measures and reports."""

    cfg: TrainConfig  # the phase's train section (`pretrain` or `sft.train`)
    work_dir: Path  # checkpoints, best/last weights and logs; outside the stage's outputs, so a rerun resumes
    accelerator: Any  # from make_accelerator: device, precision, processes
    seed: int
    world_batch_tokens: int  # tokens per optimizer step over all processes (tok/s, max_tokens, epochs)
    flops_per_token: float  # for MFU
    precision_note: str = ""  # why this precision, logged once
    bytes_per_token: Optional[float] = None  # for val bits per byte
    sample_fn: Optional[Callable[[torch.nn.Module], list[str]]] = None  # texts sampled at every eval
    on_eval: Optional[Callable[[list[dict]], str]] = None  # history -> "continue" | "stop" | a note to log
    eval_metrics: Optional[Callable[[torch.nn.Module], dict]] = None  # more figures for each eval's record
    config_name: str = "pretrain"  # the config key that errors name
    run_name: str = ""  # what the user calls the run (the config's name), shown by the studio while it trains


def fit(model: torch.nn.Module, train: Batches, val: Optional[Batches], run: Run) -> FitResult:
    """Train `model` until a stop condition; resume from run.work_dir's latest checkpoint if there is one.
    The shape is nanoGPT's: stop? -> lr -> micro-steps -> clip, step -> log -> eval -> checkpoint."""
    loop = _Loop(model, train, val, run)
    cfg, reason = run.cfg, None
    with _StopSignal() as stop:
        while (reason := loop.limit_reached()) is None:
            loop.set_lr()
            loss = loop.train_step()
            loop.log(loss)
            if loop.step % cfg.eval_every == 0:
                reason = loop.run_eval()
            if loop.step % cfg.ckpt_every == 0 or reason:
                loop.save()
            if stop.received is not None:
                loop.interrupted(stop.received)
            if reason:
                break
    return loop.finish(reason)


class _Loop:
    """fit()'s state and its steps. Every process runs the same calls (saves gather, the main process writes)."""

    def __init__(self, model, train: Batches, val: Optional[Batches], run: Run):
        acc, cfg = run.accelerator, run.cfg
        self.train, self.val, self.run, self.cfg, self.acc = train, val, run, cfg, acc
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        torch.manual_seed(run.seed)
        ds = getattr(acc.state, "deepspeed_plugin", None)
        # torch's fused AdamW: one kernel over all parameters (at 512-8-8 on a 2-core CPU the optimizer step took
        # 35 ms instead of 85 ms, bench/bench_train_step.py); the multi-tensor one where FSDP or DeepSpeed own them
        sharded = ds is not None or getattr(acc.state, "fsdp_plugin", None) is not None
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), fused=not sharded)
        if ds is not None:  # DeepSpeed wants the micro-batch size, which it usually reads off a DataLoader
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # checkpoints go through torch's distributed state-dict API, which knows DDP and FSDP wrappers but not
        # accelerate's optimizer wrapper
        self.raw_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)

        self.total_steps = planned_steps(cfg, run.world_batch_tokens, train.tokens_per_epoch)
        self.state = {"tokens": 0, "elapsed_s": 0.0, "best_val_loss": None, "bad_evals": 0, "history": []}
        self.step, self.last_good = 0, latest_checkpoint(run.work_dir)
        if self.last_good is not None:
            loaded = load_checkpoint(self.last_good, self.model, self.raw_optimizer, acc)
            self.step = loaded.pop("step")
            self.state.update(loaded)
            acc.print(f"resuming from {self.last_good} (step {self.step}, {self.state['tokens']:,} tokens, "
                      f"{self.state['elapsed_s']:.0f}s trained so far)")
        self.tracker = Tracker(run.work_dir, enabled=self.is_main, start_step=self.step, total_steps=self.total_steps,
                               time_budget_min=cfg.time_budget_min, history=self.state["history"],
                               run_name=run.run_name)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)
        # on CPU the same activations are freed and allocated again every step: keep them mapped (~17% of a step)
        allocator = f"; {keep_freed_memory()}" if acc.device.type == "cpu" else ""
        self.peak = measure_peak_flops(acc.device, dtype)
        self.tracker.info(f"precision: {run.precision_note}; device {acc.device} x{self.world}{allocator}; "
                          f"{run.world_batch_tokens:,} tokens/step; matmul peak {self.peak / 1e9:.0f} GFLOP/s"
                          + (f"; planned steps {self.total_steps}" if self.total_steps else "")
                          + (f"; time budget {cfg.time_budget_min} min" if cfg.time_budget_min else ""))
        self.last_val: dict = {}
        self.t_start = time.perf_counter() - self.state["elapsed_s"]
        self.t_log, self.tokens_log = time.perf_counter(), self.state["tokens"]
        self.model.train()

    def limit_reached(self) -> Optional[str]:
        cfg, step = self.cfg, self.step
        if self.total_steps is not None and step >= self.total_steps:
            return f"reached {self.total_steps} steps"
        if cfg.time_budget_min is not None and time.perf_counter() - self.t_start >= cfg.time_budget_min * 60:
            return f"time budget of {cfg.time_budget_min} min used"
        if cfg.stop_at_step is not None and step >= cfg.stop_at_step:
            return f"stopped at step {step} (stop_at_step; the schedule is the full run's)"
        return None

    def set_lr(self) -> None:
        elapsed = time.perf_counter() - self.t_start
        self.lr = get_lr(self.step, progress_of(self.step, self.total_steps, elapsed, self.cfg), self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the step's mean loss (over all processes)."""
        cfg, acc, model, name = self.cfg, self.acc, self.model, self.run.config_name
        loss_sum = 0.0
        try:
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(acc.device, non_blocking=True)
                         for k, v in self.train.get(self.step, micro, self.rank, self.world).items()}
                sync = micro == cfg.grad_accum - 1
                with (acc.no_sync(model) if not sync and self.world > 1 else contextlib.nullcontext()):
                    with acc.autocast():
                        _, loss = model(batch["x"], targets=batch["y"], loss_mask=batch.get("mask"))
                    acc.backward(loss / cfg.grad_accum)
                loss_sum += loss.detach().float().item()
        except torch.OutOfMemoryError:
            raise UserError(_oom_message(cfg, name)) from None
        except RuntimeError as e:
            if "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower():
                raise UserError(_oom_message(cfg, name)) from None
            raise
        train_loss = loss_sum / cfg.grad_accum
        if self.world > 1:  # log the loss of the global batch, comparable with a single-process run
            train_loss = acc.reduce(torch.tensor(train_loss, device=acc.device), "mean").item()
        if not math.isfinite(train_loss):
            where = (f"the last good checkpoint {self.last_good} is kept" if self.last_good
                     else "no checkpoint was written yet")
            raise UserError(
                f"{name}: the training loss became {train_loss} at step {self.step}; stopped ({where}). "
                f"Lower {name}.lr (now {cfg.lr}), raise {name}.warmup_steps or set {name}.grad_clip, then rerun: "
                "it resumes from the last good checkpoint.")
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.state["tokens"] += self.run.world_batch_tokens
        return train_loss

    def log(self, train_loss: float) -> None:
        step, tokens = self.step, self.state["tokens"]
        if step % self.cfg.log_every == 0 or step == 1:
            now = time.perf_counter()
            tok_s = (tokens - self.tokens_log) / max(now - self.t_log, 1e-9)
            self.t_log, self.tokens_log = now, tokens
            mfu = tok_s * self.run.flops_per_token / (self.peak * self.world)
            self.tracker.step(step, train_loss, self.lr, tok_s, mfu, now - self.t_start, tokens)
        else:
            self.tracker.observe_loss(train_loss)

    def save(self) -> None:
        """A checkpoint of this step. Every process takes part: sharded state is gathered, the main process writes."""
        self.acc.wait_for_everyone()
        self.state["elapsed_s"] = time.perf_counter() - self.t_start
        self.last_good = save_checkpoint(self.run.work_dir, self.step, self.model, self.raw_optimizer, self.state,
                                         is_main=self.is_main, accelerator=self.acc)
        self.acc.wait_for_everyone()

    def run_eval(self) -> Optional[str]:
        """Val loss (+ perplexity, bits per byte), best weights kept, samples logged; a reason to stop, or None."""
        run, state, step = self.run, self.state, self.step
        if self.val is None:
            return None
        loss = evaluate(self.model, self.val, self.cfg.eval_batches, self.acc)
        loss = self.acc.reduce(torch.tensor(loss, device=self.acc.device), reduction="mean").item()
        record = {"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
                  "train_loss": self.tracker.recent_train_loss()}
        if run.bytes_per_token:
            record["val_bpb"] = loss / math.log(2) / run.bytes_per_token
        if run.eval_metrics is not None and self.is_main:
            record.update(run.eval_metrics(self.acc.unwrap_model(self.model)))
        if state["best_val_loss"] is None or loss < state["best_val_loss"]:
            state["best_val_loss"], state["bad_evals"] = loss, 0
            save_weights(self.model, run.work_dir / BEST, is_main=self.is_main, accelerator=self.acc)
        else:
            state["bad_evals"] += 1
        state["history"].append(record)
        decision = run.on_eval(state["history"]) if run.on_eval else None
        if decision:
            record["decision"] = decision
        samples = run.sample_fn(self.acc.unwrap_model(self.model)) if (run.sample_fn and self.is_main) else []
        self.tracker.eval(record, samples)
        self.last_val = record
        if decision == "stop":
            return f"stopped by {getattr(run.on_eval, '__name__', 'eval hook')} at step {step}"
        if self.cfg.patience is not None and state["bad_evals"] >= self.cfg.patience:
            return f"early stopping: val loss did not improve for {self.cfg.patience} evals"
        return None

    def interrupted(self, signum: int) -> None:
        self.save()
        self.tracker.info(f"received signal {signum}: checkpoint saved at step {self.step}; rerun to resume")
        self.tracker.close(ended="stopped")
        raise KeyboardInterrupt

    def finish(self, reason: Optional[str]) -> FitResult:
        """The last eval (unless this step had one), a checkpoint, the last weights whole, the closing log line."""
        if not self.last_val or self.last_val.get("step") != self.step:
            eval_reason = self.run_eval()
            reason = reason or eval_reason
        self.save()
        work, state = self.run.work_dir, self.state
        save_weights(self.model, work / LAST, is_main=self.is_main, accelerator=self.acc)
        elapsed = time.perf_counter() - self.t_start
        self.tracker.info(f"done: {reason}; {self.step} steps, {state['tokens']:,} tokens, {elapsed:.0f}s")
        self.tracker.close()
        return FitResult(steps=self.step, tokens=state["tokens"], best_val_loss=state["best_val_loss"],
                         last_val=self.last_val, stop_reason=reason, elapsed_s=elapsed,
                         precision=self.run.precision_note,
                         best_path=work / BEST if state["best_val_loss"] is not None else None,
                         last_path=work / LAST, history=state["history"])


def _oom_message(cfg: TrainConfig, name: str) -> str:
    return (f"{name}: a batch of {cfg.batch_size} x {cfg.seq_len} tokens does not fit in memory. Lower "
            f"{name}.batch_size (e.g. to {max(1, cfg.batch_size // 2)} with {name}.grad_accum={cfg.grad_accum * 2} "
            f"to keep the same tokens per step), lower {name}.seq_len, or set {name}.grad_checkpointing: true.")
