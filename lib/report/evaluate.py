"""Benchmark scores through lm-evaluation-harness: the project's local tasks (offline, evals/*.yaml + JSONL) and the
harness's standard tasks (hellaswag, arc_easy, piqa, lambada_openai …, downloaded from the hub when it is reachable).

    scores = evaluate_model(Path("artifacts/04_export/<h>/hf"), ["home_kjv_cloze"])
    scores["home_kjv_cloze"]    # {"acc": 0.41, "acc_stderr": 0.028, "acc_norm": …, "metric": "acc", "chance": 0.25,
                                #  "n": 300}
    table = compare([("fp32", hf_dir), ("q8_0", gguf_file)], tasks)   # before/after, one row per task

A model is an HF directory (lm-eval's own `HFLM`, optionally with a LoRA adapter applied through peft) or a GGUF file
(`gguf_model` below: llama.cpp's log-probs through llama-cpp-python), so a LoRA adapter or a quantization is judged
against its source on the same items.
"""

from __future__ import annotations

import functools
import math
import os
from contextlib import contextmanager
from pathlib import Path

import yaml

from lib import ROOT
from lib.errors import UserError
from lib.hub import offline_reason, require_reachable
from lib.serving.llamacpp import LlamaCppModel

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


@functools.lru_cache(maxsize=2)
def _task_manager(standard: bool):
    """lm-eval's task index, built once per process. Its thousands of built-in task YAMLs are read only when a
    standard task is asked for: the project's own tasks go in as dicts and need no index (lm-eval builds the full
    one at every simple_evaluate call otherwise, 6-12 s each on a 2-core CPU: most of a tiny run's report stage)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=standard, metadata={})


def _meta(conf, key: str, default=None):
    return (conf.get("metadata") or {}).get(key, default) if isinstance(conf, dict) else default


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
    """{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, metric, chance, n}} for one model (zero-shot); `metric`
    names the score the task is read by. A task whose items do not fit the model's context gets {"error": why}
    instead of scores (a tiny coursework model with a 64-token context), the others are still scored."""
    from lm_eval import simple_evaluate

    configs = task_configs(tasks)
    manager = _task_manager(any(isinstance(c, str) for c in configs))
    scores = {}
    with _hub_offline_for(model):
        lm = _lm(model, adapter, batch_size, device)
        for name, conf in zip(tasks, configs):
            # the score a task is read by: acc, or acc_norm where the choices differ in length (its metadata says)
            row = {"chance": _meta(conf, "chance"), "metric": _meta(conf, "primary", "acc")}
            scores[name] = row
            try:
                out = simple_evaluate(model=lm, tasks=[conf], task_manager=manager, limit=limit, num_fewshot=0,
                                      bootstrap_iters=1000, log_samples=False, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
            except AssertionError:  # lm-eval's check that a continuation fits the model's context
                row["error"] = f"its items do not fit the model's context ({getattr(lm, 'max_length', '?')} tokens)"
                continue
            r = out["results"].get(name, {})
            row["n"] = (out.get("n-samples", {}).get(name) or {}).get("effective")
            for key in SCORES:
                if f"{key},none" in r:
                    row[key] = float(r[f"{key},none"])
                    err = r.get(f"{key}_stderr,none")
                    row[f"{key}_stderr"] = float(err) if isinstance(err, (int, float)) else None
    return scores


@contextmanager
def _hub_offline_for(model: Path):
    """A local model needs no hub: HF_HUB_OFFLINE while lm-eval loads it (it would look up model info otherwise)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    if Path(model).exists():
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def compare(models: list[tuple[str, Path, Path | None]], tasks: list[str], limit: int | None = None,
            seed: int = 1234) -> dict:
    """The same tasks for several models (label, model, adapter): {"models": labels, "tasks": {task: {label: row}}}."""
    results = {label: evaluate_model(path, tasks, limit, adapter, seed=seed) for label, path, adapter in models}
    return {"models": [m[0] for m in models],
            "tasks": {t: {label: results[label][t] for label in results} for t in tasks}}


def score_text(row: dict) -> str:
    """A task's score as read: "0.412 ± 0.028" (its metric, ± standard error)."""
    m = row.get("metric", "acc")
    if row.get("error"):
        return f"not scored: {row['error']}"
    return "–" if row.get(m) is None else f"{row[m]:.3f} ± {row.get(m + '_stderr') or 0:.3f}"


def format_table(table: dict) -> str:
    """The comparison as text: one row per task (its metric, chance level), the score ± stderr of each model."""
    labels = table["models"]
    lines = [" | ".join(["task", "metric", "chance", *labels]), " | ".join(["---"] * (3 + len(labels)))]
    for task, rows in table["tasks"].items():
        first = next(iter(rows.values()))
        cells = [task, first.get("metric", "acc"), "–" if first.get("chance") is None else f"{first['chance']:.2f}"]
        lines.append(" | ".join(cells + [score_text(rows[label]) for label in labels]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# GGUF models (a quantization, an install served by llama.cpp): log-likelihoods from llama.cpp itself.


def gguf_model(path: Path):
    """An lm-eval model over llama.cpp (lib.serving.llamacpp, the engine 07_serve uses): log p(continuation |
    context) summed over its tokens, and whether each of its tokens was the most likely one. Multiple-choice tasks
    need nothing else. (Built here: lm-eval's base class takes seconds to import, and only an evaluation needs it.)"""
    from lm_eval.api.model import LM

    class _GGUF(LM):
        def __init__(self, gguf: Path):
            super().__init__()
            self.llm = LlamaCppModel(gguf, n_seq=1)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out = []
            for req in requests:
                context, continuation = req.args
                ctx = self.llm.tokenize(context, bos=True)
                whole = self.llm.tokenize(context + continuation, bos=True)
                k = len(ctx) if whole[:len(ctx)] == ctx else len(ctx) - 1  # a merge across the boundary
                logps, greedy = self.llm.token_logprobs(whole, k)
                lp = sum(logps)
                out.append((lp if math.isfinite(lp) else -1e30, all(greedy)))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("GGUF models: multiple-choice tasks only")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("GGUF models: multiple-choice tasks only")

    return _GGUF(path)
