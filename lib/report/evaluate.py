"""Benchmark scores through lm-evaluation-harness: the project's local tasks (offline, evals/*.yaml + JSONL) and the
harness's standard tasks (hellaswag, arc_easy, piqa, lambada_openai …, downloaded from the hub when it is reachable).

    scores = evaluate_model(Path("artifacts/04_export/<h>/hf"), ["home_kjv_cloze"])
    scores["home_kjv_cloze"]    # {"acc": 0.41, "acc_stderr": 0.028, "acc_norm": …, "chance": 0.25, "n": 300}
    table = compare([("fp32", hf_dir), ("q8_0", gguf_file)], tasks)   # before/after, one row per task

A model is an HF directory (lm-eval's own `HFLM`, optionally with a LoRA adapter applied through peft) or a GGUF file
(`gguf_model` below: llama.cpp's log-probs through llama-cpp-python), so a LoRA adapter or a quantization is judged
against its source on the same items.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from lib import ROOT
from lib.errors import UserError
from lib.hub import offline_reason, require_reachable

TASKS_DIR = ROOT / "evals"
SCORES = ("acc", "acc_norm")


def local_tasks() -> dict[str, Path]:
    """The project's own tasks: name -> YAML file."""
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


def _local_config(path: Path) -> dict:
    """A local task's YAML as lm-eval's task dict, its data files made absolute (they are relative to the YAML)."""
    conf = yaml.safe_load(path.read_text(encoding="utf-8"))
    files = conf.get("dataset_kwargs", {}).get("data_files", {})
    for split, name in files.items():
        files[split] = str((path.parent / name).resolve())
    return conf


def task_configs(names: list[str]) -> list[dict | str]:
    """What lm-eval is handed: local tasks as dicts; standard ones by name, once the hub is known to be reachable."""
    local = local_tasks()
    standard = [n for n in names if n not in local]
    if standard:
        hint = (f"the local tasks ({', '.join(local)}) run offline; standard tasks download their data from the hub")
        reason = offline_reason(datasets=True)
        if reason:
            raise UserError(f"eval tasks {', '.join(standard)}: {reason}, so they cannot be downloaded; {hint}")
        require_reachable(f"eval tasks {', '.join(standard)}:", hint)
    return [_local_config(local[n]) if n in local else n for n in names]


def _chance(name: str, conf) -> float | None:
    return (conf.get("metadata") or {}).get("chance") if isinstance(conf, dict) else None


def _lm(model: Path, adapter: Path | None, batch_size: int, device: str):
    """lm-eval's model object for an HF directory, or ours for a GGUF file."""
    if model.suffix == ".gguf":
        if adapter is not None:
            raise UserError(f"--adapter: {model} is a GGUF file; apply adapters to an HF directory")
        return gguf_model(model)
    if not (model / "config.json").is_file():
        raise UserError(f"{model}: not an HF model directory (no config.json) or a .gguf file")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model), peft=str(adapter) if adapter else None, batch_size=batch_size, device=device,
                dtype="float32", trust_remote_code=False)


def evaluate_model(model: Path, tasks: list[str], limit: int | None = None, adapter: Path | None = None,
                   batch_size: int = 8, device: str = "cpu", seed: int = 1234) -> dict[str, dict]:
    """{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, chance, n}} for one model (zero-shot)."""
    from lm_eval import simple_evaluate

    configs = task_configs(tasks)
    chance = {n: _chance(n, c) for n, c in zip(tasks, configs)}
    with _hub_offline_for(model):
        out = simple_evaluate(model=_lm(model, adapter, batch_size, device), tasks=configs, limit=limit,
                              num_fewshot=0, bootstrap_iters=1000, log_samples=False, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    scores = {}
    for name in tasks:
        r = out["results"].get(name, {})
        row = {"chance": chance[name], "n": (out.get("n-samples", {}).get(name) or {}).get("effective")}
        for key in SCORES:
            if f"{key},none" in r:
                row[key] = float(r[f"{key},none"])
                err = r.get(f"{key}_stderr,none")
                row[f"{key}_stderr"] = float(err) if isinstance(err, (int, float)) else None
        scores[name] = row
    return scores


class _hub_offline_for:
    """A local model needs no hub: HF_HUB_OFFLINE while lm-eval loads it (it would look up model info otherwise)."""

    def __init__(self, model: Path):
        self.local = Path(model).exists()

    def __enter__(self):
        self.old = os.environ.get("HF_HUB_OFFLINE")
        if self.local:
            os.environ["HF_HUB_OFFLINE"] = "1"

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = self.old


def compare(models: list[tuple[str, Path, Path | None]], tasks: list[str], limit: int | None = None,
            seed: int = 1234) -> dict:
    """The same tasks for several models (label, model, adapter): {"models": labels, "tasks": {task: {label: row}}}."""
    results = {label: evaluate_model(path, tasks, limit, adapter, seed=seed) for label, path, adapter in models}
    return {"models": [m[0] for m in models],
            "tasks": {t: {label: results[label][t] for label in results} for t in tasks}}


def format_table(table: dict) -> str:
    """The comparison as text: one row per task, acc ± stderr per model, chance level."""
    labels = table["models"]
    lines = [" | ".join(["task", "chance", *labels]), " | ".join(["---"] * (2 + len(labels)))]
    for task, rows in table["tasks"].items():
        first = next(iter(rows.values()))
        cells = [task, "–" if first.get("chance") is None else f"{first['chance']:.2f}"]
        for label in labels:
            r = rows[label]
            cells.append("–" if "acc" not in r else f"{r['acc']:.3f} ± {r.get('acc_stderr') or 0:.3f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# GGUF models (a quantization, an install served by llama.cpp): log-likelihoods from llama.cpp itself.


def gguf_model(path: Path):
    """An lm-eval model over llama-cpp-python: log p(continuation | context) summed over its tokens, and whether each
    of its tokens was the most likely one. Multiple-choice tasks need nothing else. (Built here: lm-eval's base
    class takes seconds to import, and only an evaluation needs it.)"""
    from lm_eval.api.model import LM

    class _GGUF(LM):
        def __init__(self, gguf: Path):
            super().__init__()
            from llama_cpp import Llama

            self.llm = Llama(model_path=str(gguf), n_ctx=2048, logits_all=True, verbose=False,
                             n_threads=os.cpu_count() or 1, seed=0)

        def _tokens(self, text: str, bos: bool) -> list[int]:
            return self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=False) if text else []

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            import numpy as np

            out = []
            for req in requests:
                context, continuation = req.args
                ctx = self._tokens(context, bos=True)
                whole = self._tokens(context + continuation, bos=True)
                k = len(ctx) if whole[:len(ctx)] == ctx else len(ctx) - 1  # a merge across the boundary
                cont = whole[k:]
                self.llm.reset()
                self.llm.eval(whole)
                logits = np.asarray(self.llm.scores[k - 1:len(whole) - 1], dtype=np.float64)
                logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
                lp = float(sum(logits[i, t] - logz[i] for i, t in enumerate(cont)))
                greedy = all(int(logits[i].argmax()) == t for i, t in enumerate(cont))
                out.append((lp if math.isfinite(lp) else -1e30, greedy))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("GGUF models: multiple-choice tasks only")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("GGUF models: multiple-choice tasks only")

    return _GGUF(path)
