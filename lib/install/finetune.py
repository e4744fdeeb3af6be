"""Fine-tuning an installed chat model from its own folder: `<install>/train.sh DATA [--name NAME]` runs LoRA SFT
(lib.train.sft, the pipeline's phase 2) on the install's weights with parameters chosen from the model's size, the
data's size and lengths and this machine's memory, each printed with its reason, and writes
`<install>/adapters/NAME/`: the LoRA adapter and its training report. `start.sh --adapter NAME` serves it.

    params = choose_params(n_params, dims, lengths, n_examples, ram_available)   # [(key, value, why)]
    folder = finetune_install(install, "my_chats.jsonl", name="friendly")

Not here: the training loop (lib.train), serving an adapter (lib.serving.loading.adapter_model_dir).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from lib.atomic import atomic_dir, atomic_write_json, atomic_write_text
from lib.check.formulas import DTYPE_BYTES, PEFT_IMPORT_BYTES, RUNTIME_OVERHEAD_BYTES, train_activation_bytes
from lib.config import Config, SftDataConfig
from lib.data.sft_data import load_sft_examples
from lib.data.tokenizer import load_tokenizer
from lib.errors import UserError
from lib.export.convert import gguf_to_hf
from lib.model.dims import Dims
from lib.models_dir import ADAPTERS, GGUF, INFO, MODEL
from lib.names import check_name
from lib.train.sft import run_sft
from lib.train.sft_batches import encode_examples

EFFECTIVE_BATCH = 16  # sequences per optimizer step: batch x accumulation
MEMORY_SHARE = 0.5  # of the available RAM a fine-tune plans to use (the rest: the OS, a running server, slack)


def choose_params(n_params: int, dims: Dims, lengths: list[int], n_examples: int, ram_available: int,
                  context: int) -> list[tuple[str, object, str]]:
    """LoRA SFT settings as [(config key, value, why)], from the model, the data and the memory there is."""
    out = []
    rank = 8 if n_params < 300e6 else 16 if n_params < 3e9 else 32
    out.append(("sft.lora.rank", rank, f"{n_params / 1e6:.0f}M parameters: rank {rank} "
                                       + ("(LoRA's usual default; enough to change style and format)" if rank == 8
                                          else "(a larger model has more to adapt per layer)")))
    out.append(("sft.lora.alpha", float(2 * rank), "2 x rank, the usual LoRA scaling"))
    lr = 2e-4
    out.append(("sft.train.lr", lr, "LoRA's common rate (peft and LLaMA-Factory examples use 1e-4 to 2e-4)"))
    out.append(("sft.train.min_lr", lr / 10, "cosine decay to a tenth"))
    p95 = int(np.percentile(lengths, 95)) if lengths else 256
    seq = min(context, max(64, 64 * math.ceil(p95 / 64)), 1024)
    out.append(("sft.train.seq_len", seq, f"95% of the examples are at most {p95} tokens (rounded up to 64; at most "
                                          f"1024 and the model's context {context})"))
    weights = n_params * DTYPE_BYTES["fp32"]
    budget = MEMORY_SHARE * ram_available - weights - PEFT_IMPORT_BYTES - RUNTIME_OVERHEAD_BYTES
    batch = next((b for b in (8, 4, 2, 1) if train_activation_bytes(dims, seq, b, 2) <= budget), 1)
    act = train_activation_bytes(dims, seq, batch, 2)
    out.append(("sft.train.batch_size", batch, f"activations of {batch} x {seq} tokens ~{act / 2**30:.2f} GB fit "
                                               f"half the available RAM ({ram_available / 2**30:.1f} GB) beside "
                                               f"the {weights / 2**30:.2f} GB of fp32 weights"))
    accum = max(1, EFFECTIVE_BATCH // batch)
    out.append(("sft.train.grad_accum", accum, f"{batch} x {accum} = {batch * accum} sequences per step"))
    epochs = 5 if n_examples < 200 else 3 if n_examples < 1000 else 2 if n_examples < 10000 else 1
    out.append(("sft.train.max_epochs", float(epochs), f"{n_examples} examples: {epochs} epoch(s); the overfitting "
                                                       "detector and early stopping end it sooner when val loss "
                                                       "turns up"))
    steps_per_epoch = max(1, n_examples // (batch * accum))
    every = max(5, steps_per_epoch // 4)
    out.append(("sft.train.eval_every", every, f"{steps_per_epoch} steps per epoch: an eval every quarter epoch"))
    out.append(("sft.train.patience", 3, "stop after 3 evals without a better val loss"))
    return out


def finetune_install(install: Path, data: str | Path, name: str | None = None, echo=print,
                     tensorboard: bool = False) -> Path:
    """Train a LoRA adapter for the installed chat model `install` on `data` (a file or folder in any format
    04_sft reads) and publish it as <install>/adapters/<name>/ (atomically). Returns that folder. With
    `tensorboard`, TensorBoard serves the run's logs on 127.0.0.1 while it trains."""
    install = Path(install).resolve()
    name = check_name(name or time.strftime("lora-%Y%m%d-%H%M%S"), "adapter name")
    final = install / ADAPTERS / name
    if final.exists():
        raise UserError(f"{final}: an adapter named {name} exists; pick another --name or delete that folder")
    work = install / ADAPTERS / ".work"
    plan = plan_finetune(install, data, work, echo)
    data, source, params, examples, base = (plan[k] for k in ("data", "source", "params", "examples", "base"))
    echo(format_plan(plan))

    cfg = Config(artifacts_dir=str(work / "artifacts"))
    cfg.sft.base_model = str(base)
    cfg.sft.data = [source]
    cfg.sft.lora.enabled, cfg.sft.lora.merge = True, False
    cfg.sft.train.max_steps = None
    cfg.sft.train.ckpt_every = 50
    cfg.sft.train.sample_tokens = 32
    for key, value, _ in params:
        section, *path, field = key.split(".")
        target = getattr(cfg, section)
        for p in path:
            target = getattr(target, p)
        setattr(target, field, value)
    t0 = time.time()
    board = start_tensorboard(work / "artifacts", echo) if tensorboard else None
    try:
        out = run_sft(cfg)
    finally:
        if board is not None:
            board.terminate()
            board.wait()
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    history = [h for h in manifest.get("history") or [] if "val_loss" in h]
    report = {
        "name": name, "install": install.name, "data": str(data), "examples": examples,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "base_weights": str(base),
        "settings": [{"key": k, "value": v, "why": w} for k, v, w in params],
        "val_loss_before": manifest.get("base_val_loss"), "val_loss_after": manifest.get("best_val_loss"),
        "steps": manifest.get("steps"), "stop_reason": manifest.get("stop_reason"),
        "train_seconds": manifest.get("train_seconds"), "wall_seconds": round(time.time() - t0, 1),
        "end_of_turn": (manifest.get("end_of_turn") or {}).get("share_ended_turn"), "history": history,
        "logs": "tensorboard/ (tensorboard --logdir adapters/NAME/tensorboard)",
    }
    with atomic_dir(final, mode=0o755) as tmp:
        shutil.copytree(out / "adapter", tmp / "adapter")
        if (out / "tensorboard").is_dir():
            shutil.copytree(out / "tensorboard", tmp / "tensorboard")
        for extra in ("metrics.jsonl", "loss.png"):
            if (out / extra).is_file():
                shutil.copy2(out / extra, tmp / extra)
        atomic_write_json(tmp / "training_report.json", report)
        atomic_write_text(tmp / "training_report.txt", format_report(report))
    shutil.rmtree(work, ignore_errors=True)
    echo(format_report(report))
    echo(f"adapter: {final}\nserve it: {install / 'start.sh'} --adapter {name}")
    return final


def plan_finetune(install: Path, data: str | Path, work: Path | None = None, echo=print) -> dict:
    """What train.sh will do, before it trains: the base weights, the examples found in `data` and the settings
    chosen for them with the reasons ({"install", "info", "data", "source", "base", "examples", "params"}).
    A UserError names what is wrong with the install or the data."""
    install = Path(install).resolve()
    info = json.loads((install / INFO).read_text(encoding="utf-8"))
    if info.get("kind", "chat") != "chat":
        raise UserError(f"{install}: train.sh fine-tunes chat models; this install is a {info.get('kind')} model")
    data = Path(data).expanduser().resolve()
    if not data.exists():
        raise UserError(f"{data}: no such file or folder (train.sh DATA: a JSONL/JSON/CSV/text file or a folder of "
                        "them, in any format 04_sft reads)")
    base = _base_weights(install, work or install / ADAPTERS / ".work", echo)
    tokenizer = load_tokenizer(base)
    source = SftDataConfig(type="files", path=str(data))
    cfg = Config()
    cfg.sft.data = [source]
    examples, _ = load_sft_examples(cfg.sft, str(data.parent))
    if not examples:
        raise UserError(f"{data}: no examples with an assistant reply found; see 04_sft's data formats")
    encoded, _ = encode_examples(tokenizer, examples, 1 << 30)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    check = info.get("check") or {}
    dims = Dims(**{k: v for k, v in ((check.get("estimates") or {}).get("dims") or {}).items()
                   if k in Dims.__dataclass_fields__})
    context = int(config.get("max_position_embeddings") or 2048)
    params = choose_params(int(info.get("params") or 0), dims, [len(e.ids) for e in encoded], len(examples),
                           psutil.virtual_memory().available, context)
    return {"install": install, "info": info, "data": data, "source": source, "base": base,
            "examples": len(examples), "params": params}


def format_plan(plan: dict) -> str:
    lines = [f"train.sh: LoRA fine-tuning of {plan['install'].name} on {plan['data']} ({plan['examples']} examples); "
             "chosen settings:"]
    lines += [f"  {key:<22} {value!s:<10} {why}" for key, value, why in plan["params"]]
    return "\n".join(lines)


def start_tensorboard(logdir: Path, echo, host: str = "127.0.0.1") -> subprocess.Popen:
    """TensorBoard over `logdir` (it finds the run's event files as they appear) on a free port of `host`."""
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    logdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    echo(f"tensorboard: http://{host}:{port}/ (stops when training ends; afterwards: tensorboard --logdir "
         "adapters/NAME/tensorboard)")
    return proc


def format_report(r: dict) -> str:
    before, after = r.get("val_loss_before"), r.get("val_loss_after")
    lines = [f"LoRA adapter {r['name']} for {r['install']}: {r['examples']} examples from {r['data']}",
             f"  val loss {before if before is None else round(before, 4)} -> "
             f"{after if after is None else round(after, 4)}; {r['steps']} steps ({r['stop_reason']}); "
             f"{r['wall_seconds']} s",
             "  settings:"]
    lines += [f"    {s['key']} = {s['value']}: {s['why']}" for s in r["settings"]]
    return "\n".join(lines) + "\n"


def _base_weights(install: Path, work: Path, echo) -> Path:
    """The install's HF weights to train on: model/ when it holds safetensors, else its GGUF dequantised (fp32)
    into the work folder once."""
    model = install / MODEL
    if any(model.glob("*.safetensors")):
        return model
    ggufs = sorted((install / GGUF).glob("*.gguf")) if (install / GGUF).is_dir() else []
    if not ggufs:
        raise UserError(f"{install}: no weights to fine-tune (neither model/*.safetensors nor gguf/*.gguf)")
    out = install / ADAPTERS / ".base-hf"  # kept: start.sh --adapter merges into it
    if not (out / "config.json").is_file():
        echo(f"train.sh: {ggufs[0].name} dequantised to fp32 HF weights to train on (once) ...")
        shutil.rmtree(out, ignore_errors=True)
        gguf_to_hf(ggufs[0], out)
    return out
