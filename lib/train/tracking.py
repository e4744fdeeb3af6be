"""What a training run reports: one fixed-format log line per interval, a progress bar, metrics.jsonl, TensorBoard
events, sampled continuations and a loss/lr plot at the end. Everything lands in the run's work dir, which survives
a crash, so a resumed run continues the same files (lines after the resume step are dropped first)."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Optional

from lib.atomic import atomic_file, atomic_write_json

METRICS = "metrics.jsonl"
RUN_INFO = "run.json"  # who is training here (pid, host) and how far it means to go: read by the studio
SAMPLES = "samples.txt"
PLOT = "loss.png"
TB_DIR = "tensorboard"


def fmt_duration(seconds: float) -> str:
    """"1h05m" or "4m07s"."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


EVAL_KEYS = ("step", "val_loss", "val_ppl", "val_bpb", "train_loss", "decision")

class Tracker:
    def __init__(self, work_dir: Path, enabled: bool, start_step: int, total_steps: Optional[int],
                 time_budget_min: Optional[float], history: list, run_name: str = ""):
        self.dir = Path(work_dir)
        self.run_name = run_name
        self.enabled = enabled
        self.total_steps = total_steps
        self.time_budget_s = time_budget_min * 60 if time_budget_min else None
        self.recent = deque(maxlen=50)
        self.history = history
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._truncate(start_step)
        self._write_run_info(start_step)
        self.metrics = open(self.dir / METRICS, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / TB_DIR), purge_step=start_step if start_step else None)
        except ImportError:  # tensorboard is in requirements.txt; keep training if a user removed it
            self.tb = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate(self, start_step: int) -> None:
        """Drop records written after the checkpoint we resume from (they will be written again)."""
        path = self.dir / METRICS
        if not path.exists():
            return
        keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
        path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")

    def _write_run_info(self, start_step: int, ended: Optional[str] = None) -> None:
        atomic_write_json(self.dir / RUN_INFO, {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "start_step": start_step,
            "total_steps": self.total_steps, "time_budget_s": self.time_budget_s, "ended": ended,
            "run_name": self.run_name})

    def _write(self, record: dict) -> None:
        self.metrics.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.metrics.flush()

    def info(self, text: str) -> None:
        if self.enabled:
            self._print(text)

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def observe_loss(self, loss: float) -> None:
        self.recent.append(loss)
        if self.bar is not None:
            self.bar.update(1)

    def recent_train_loss(self) -> Optional[float]:
        return sum(self.recent) / len(self.recent) if self.recent else None

    def step(self, step: int, loss: float, lr: float, tok_s: float, mfu: float, elapsed_s: float, tokens: int) -> None:
        self.observe_loss(loss)
        if not self.enabled:
            return
        eta = []
        if self.total_steps:
            eta.append((self.total_steps - step) * elapsed_s / max(step, 1))
        if self.time_budget_s:
            eta.append(self.time_budget_s - elapsed_s)
        eta_s = min(eta) if eta else float("nan")
        total = f"/{self.total_steps}" if self.total_steps else ""
        self._print(f"step {step:6d}{total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:8,.0f} tok/s | "
                    f"mfu {100 * mfu:5.1f}% | elapsed {fmt_duration(elapsed_s)} | eta {fmt_duration(eta_s) if math.isfinite(eta_s) else '?'}")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}", mfu=f"{100 * mfu:.1f}%")
        self._write({"step": step, "loss": loss, "lr": lr, "tok_s": tok_s, "mfu": mfu, "elapsed_s": elapsed_s,
                     "tokens": tokens, "eta_s": round(eta_s, 1) if math.isfinite(eta_s) else None,
                     "time": time.time()})
        if self.tb:
            self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/tok_s", tok_s, step)

    def eval(self, record: dict, samples: list[str]) -> None:
        """One eval's line, metrics.jsonl record, samples and TensorBoard scalars."""
        if not self.enabled:
            return
        parts = [f"eval step {record['step']}", f"val loss {record['val_loss']:.4f}", f"ppl {record['val_ppl']:.2f}"]
        if "val_bpb" in record:
            parts.append(f"bpb {record['val_bpb']:.4f}")
        extra = {k: v for k, v in record.items() if k not in EVAL_KEYS and isinstance(v, float)}
        parts += [f"{k.replace('_', ' ')} {v:.4g}" for k, v in extra.items()]  # a phase's own figures
        if record.get("decision"):
            parts.append(f"decision: {record['decision']}")
        self._print(" | ".join(parts))
        for text in samples:
            self._print(f"  sample: {text!r}")
        self._write({**record, "samples": samples, "kind": "eval"})
        with open(self.dir / SAMPLES, "a", encoding="utf-8") as f:
            for text in samples:
                f.write(f"[step {record['step']}] {text}\n")
        if self.tb:
            for key in ("val_loss", "val_ppl", "val_bpb"):
                if key in record:
                    self.tb.add_scalar(f"val/{key[4:]}", record[key], record["step"])
            for key, value in extra.items():
                self.tb.add_scalar(f"val/{key}", value, record["step"])

    def close(self, ended: str = "finished") -> None:
        """ended: "finished" or "stopped" (a signal: the run can resume), recorded in run.json."""
        if not self.enabled:
            return
        info = json.loads((self.dir / RUN_INFO).read_text(encoding="utf-8"))
        atomic_write_json(self.dir / RUN_INFO, {**info, "ended": ended})
        if self.bar is not None:
            self.bar.close()
        if self.tb:
            self.tb.close()
        self.metrics.close()
        plot_metrics(self.dir / METRICS, self.dir / PLOT)


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Loss (train and val) and learning rate against step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in Path(metrics_path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax1.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("step")
    fig.tight_layout()
    with atomic_file(png_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def copy_run_logs(work: Path, out: Path) -> None:
    """What a training stage publishes of its run besides the weights: metrics, samples, the loss plot, TensorBoard."""
    for name in (METRICS, SAMPLES, PLOT):
        if (work / name).exists():
            shutil.copy2(work / name, out / name)
    if (work / TB_DIR).exists():
        shutil.copytree(work / TB_DIR, out / TB_DIR)
