"""What the studio knows about runs: every stage directory under the artifacts dir, its status and its figures.

    runs = find_runs("artifacts")                 # newest first
    runs[0].id, runs[0].status, runs[0].figures   # "03_pretrain/ab12cd34ef56", "running", {"val_loss": ...}
    curves = MetricsFile(runs[0].metrics_path).read()   # re-reads only what was appended since the last call

Only reads: manifests (complete), the trainer's run.json in the checkpoint dir (who trains there, whether it
stopped on a signal), the stage's log under <artifacts>/logs (errors) and Snakemake's benchmark file.
Status, in this order:
- complete:    manifest.json exists (the contract of an artifact directory);
- running:     the trainer's process named in run.json is alive on this host, or, for a short stage, its staging
               directory exists while a pipeline launched here is running;
- failed:      the stage's log ends with an error (`error: ...` or a traceback);
- interrupted: anything else left behind (stopped by a signal, killed): rerunning the pipeline resumes it.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lib.artifacts import MANIFEST, read_json
from lib.stages import STAGE, stages_of
from lib.stages import STAGES as PIPELINE
from lib.train.checkpoint import latest_checkpoint
from lib.train.tracking import METRICS, RUN_INFO

STAGES = tuple(s.name for s in PIPELINE if s.kind != "install")  # the install lives in the models dir
TRAINING_STAGES = stages_of("training")
LOG_TAIL_BYTES = 16_384


@dataclass
class Run:
    stage: str
    hash: str
    status: str  # complete | running | interrupted | failed
    path: Path  # the artifact dir (exists iff complete)
    work: Path | None  # the trainer's checkpoint dir (training stages)
    updated: float  # newest mtime seen, for sorting
    config: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # val_loss, val_bpb, tok_s, wall_s, steps, parameters
    message: str = ""  # why it failed, where it stopped
    config_name: str = ""  # the run it belongs to, as the user calls it (the config's name)
    created: str = ""  # when it finished (its manifest's time)
    upstream: dict = field(default_factory=dict)  # stage -> hash of the folders it read

    @property
    def label(self) -> str:
        """The stage as a user sees it, the folder as a detail: "smoke · phase 1 (pretrain) (03_pretrain/5085…)"."""
        return f"{self.config_name or '?'} · {STAGE[self.stage].title} ({self.stage}/{self.hash[:6]})"

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.hash}"

    @property
    def metrics_path(self) -> Path | None:
        """The live metrics file while training (the checkpoint dir's), else the published copy."""
        for d in (self.work, self.path):
            if d is not None and (d / METRICS).is_file():
                return d / METRICS
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def trainer_alive(info: dict) -> bool:
    return (info.get("ended") is None and info.get("host") == socket.gethostname()
            and isinstance(info.get("pid"), int) and pid_alive(info["pid"]))


def log_error(log: Path) -> str | None:
    """The error a stage's log ends with, or None."""
    if not log.is_file():
        return None
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - LOG_TAIL_BYTES))
        lines = f.read().decode("utf-8", "replace").splitlines()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i].strip()
        if line.startswith("error: "):
            return line[len("error: "):]
        if line.startswith("Traceback (most recent call last)"):
            return next((ln.strip() for ln in reversed(lines[i:]) if ln.strip()), "a Python exception")
    return None


def _benchmark_wall(artifacts: Path, stage: str, h: str) -> float | None:
    f = artifacts / "logs" / stage / f"{h}.benchmark.tsv"
    if not f.is_file():
        return None
    rows = list(csv.DictReader(f.read_text().splitlines(), delimiter="\t"))
    try:
        return float(rows[-1]["s"]) if rows else None
    except (KeyError, ValueError):
        return None


def _figures(stage: str, manifest: dict, artifacts: Path, h: str) -> dict:
    out: dict = {}
    final = manifest.get("final_eval") or {}
    for key in ("val_loss", "val_bpb"):
        if key in final:
            out[key] = final[key]
    for key in ("steps", "parameters", "train_seconds", "tokens"):
        if key in manifest:
            out[key] = manifest[key]
    if manifest.get("train_seconds") and manifest.get("tokens"):
        out["tok_s"] = manifest["tokens"] / manifest["train_seconds"]
    wall = _benchmark_wall(artifacts, stage, h)
    out["wall_s"] = wall if wall is not None else manifest.get("wall_time_s")
    if stage == "01_data" and "documents" in manifest:
        out["documents"] = manifest["documents"]
    if manifest.get("eval"):  # the report card's benchmark scores of the final model
        out["eval"] = {task: rows.get("final", {}).get(rows.get("final", {}).get("metric", "acc"))
                       for task, rows in manifest["eval"]["tasks"].items()}
    pairs = (manifest.get("after") or {}).get("pairs") or {}
    if "reward_accuracy" in pairs:  # phase 3
        out["reward_accuracy"] = pairs["reward_accuracy"]
    return out


def _live_figures(metrics: Path | None) -> dict:
    """Figures of an unfinished training run from the end of its metrics file (the last train and eval records;
    only the tail is read, so a long run's file costs the same as a short one's)."""
    if metrics is None:
        return {}
    with open(metrics, "rb") as f:
        f.seek(max(0, metrics.stat().st_size - LOG_TAIL_BYTES))
        lines = f.read().decode("utf-8", "replace").splitlines()
    out: dict = {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:  # the first, partial line of the tail, or a line being written
            continue
        if row.get("kind") == "eval" and "val_loss" not in out:
            out.update({k: row[k] for k in ("val_loss", "val_bpb") if k in row})
        elif "loss" in row and "steps" not in out:
            out.update(steps=row["step"], tok_s=row.get("tok_s"), wall_s=row.get("elapsed_s"))
        if "steps" in out and "val_loss" in out:
            break
    return out


def find_runs(artifacts_dir: str | Path, launching: bool = False, stages=STAGES) -> list[Run]:
    """Every stage directory (complete or not) under artifacts_dir, newest first. `launching`: a pipeline started
    here is running (so a short stage's staging directory means it is running, not abandoned). `stages`: only
    these (None: all)."""
    artifacts = Path(artifacts_dir)
    runs: dict[tuple[str, str], Run] = {}
    for stage in stages or STAGES:
        hashes: set[str] = set()
        stage_root = artifacts / stage
        if stage_root.is_dir():
            for p in stage_root.iterdir():
                name = p.name
                if name.startswith("."):  # a staging dir: .<hash>.tmp-xxxx
                    name = name[1:].split(".tmp-", 1)[0]
                hashes.add(name)
        logs = artifacts / "logs" / stage
        if logs.is_dir():
            hashes.update(p.name[:-len(".log")] for p in logs.glob("*.log"))
        ckpts = artifacts / "checkpoints" / stage
        if ckpts.is_dir():
            hashes.update(p.name for p in ckpts.iterdir() if p.is_dir())
        for h in hashes:
            run = _run(artifacts, stage, h, launching)
            if run is not None:
                runs[(stage, h)] = run
    return sorted(runs.values(), key=lambda r: r.updated, reverse=True)


@dataclass
class PipelineRun:
    """One pipeline run as a user thinks of it: a config, when it started, its stages, wall time, final figures."""

    name: str  # the config's name ("default", "smoke", a saved studio config)
    stages: list[Run]  # its stage folders, in pipeline order

    @property
    def started(self) -> str:
        times = sorted(r.created for r in self.stages if r.created)
        return times[0][:16].replace("T", " ") if times else time.strftime(
            "%Y-%m-%d %H:%M", time.localtime(min(r.updated for r in self.stages)))

    @property
    def status(self) -> str:
        for s in ("running", "failed", "interrupted"):
            if any(r.status == s for r in self.stages):
                return s
        return "complete"

    @property
    def wall_s(self) -> float:
        return sum(r.figures.get("wall_s") or 0.0 for r in self.stages)

    @property
    def figures(self) -> dict:
        """The run's final figures: phase 1's bits per byte and val loss, phase 2's val loss (phase 3's is a
        preference loss, not comparable with it)."""
        by = {r.stage: r.figures for r in self.stages}
        pre, sft = by.get(stages_of("training")[0], {}), by.get(stages_of("training")[1], {})
        report = next((r.figures for r in self.stages if "eval" in r.figures), {})
        prefs = next((r.figures for r in self.stages if "reward_accuracy" in r.figures), {})
        return {"val_bpb": pre.get("val_bpb"), "val_loss": pre.get("val_loss"), "sft_val_loss": sft.get("val_loss"),
                "eval": report.get("eval") or {}, "reward_accuracy": prefs.get("reward_accuracy"),
                "parameters": pre.get("parameters"), "tokens": pre.get("tokens")}

    @property
    def label(self) -> str:
        bpb = self.figures["val_bpb"]
        return (f"{self.name}, started {self.started}, {_minutes(self.wall_s)}"
                + (f", {bpb:.2f} bits/byte" if bpb is not None else "") + f" — {self.status}")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def pipeline_runs(runs: list[Run]) -> list[PipelineRun]:
    """Stage folders grouped into pipeline runs, newest first. A finished stage belongs with the folders its
    manifest says it read; an unfinished one with the newest run of the same config name."""
    by_key = {(r.stage, r.hash): r for r in runs}
    parent = {k: k for k in by_key}

    def root(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for key, r in by_key.items():
        for stage, h in r.upstream.items():
            if (stage, h) in by_key:
                parent[root(key)] = root((stage, h))
    groups: dict = {}
    for key in by_key:
        groups.setdefault(root(key), []).append(by_key[key])
    finished = [g for g in groups.values() if any(r.created for r in g)]
    for g in [g for g in groups.values() if not any(r.created for r in g)]:
        home = max((f for f in finished if f[0].config_name and f[0].config_name == g[0].config_name),
                   key=lambda f: max(r.updated for r in f), default=None)
        (home.extend(g) if home is not None else finished.append(g))
    order = [s.name for s in PIPELINE]
    out = []
    for g in finished:
        names = [r.config_name for r in g if r.config_name]
        out.append(PipelineRun(name=max(set(names), key=names.count) if names else "?",
                               stages=sorted(g, key=lambda r: order.index(r.stage))))
    return sorted(out, key=lambda p: max(r.updated for r in p.stages), reverse=True)


def _run(artifacts: Path, stage: str, h: str, launching: bool) -> Run | None:
    path = artifacts / stage / h
    work = artifacts / "checkpoints" / stage / h
    work = work if work.is_dir() else None
    log = artifacts / "logs" / stage / f"{h}.log"
    stamps = [p.stat().st_mtime for p in (path, work, log) if p is not None and p.exists()]
    if work is not None and (work / METRICS).is_file():
        stamps.append((work / METRICS).stat().st_mtime)
    run = Run(stage=stage, hash=h, status="interrupted", path=path, work=work, updated=max(stamps, default=0.0))
    if (path / MANIFEST).is_file():
        manifest = read_json(path / MANIFEST)
        run.status, run.config = "complete", manifest.get("config", {})
        run.config_name, run.created = manifest.get("config_name", ""), manifest.get("created", "")
        run.upstream = manifest.get("upstream") or {}
        run.figures = _figures(stage, manifest, artifacts, h)
        return run
    info = {}
    if work is not None and (work / RUN_INFO).is_file():
        try:
            info = read_json(work / RUN_INFO)
        except (OSError, ValueError):
            info = {}
    run.figures = _live_figures(run.metrics_path)
    run.config_name = info.get("run_name", "")
    staging = path.parent.is_dir() and any(path.parent.glob(f".{h}.tmp-*"))
    if trainer_alive(info) or (launching and staging and stage not in TRAINING_STAGES):
        run.status = "running"
        return run
    error = log_error(log)
    if error:
        run.status, run.message = "failed", error
    elif work is None and not staging:  # only a log: its directory was deleted, or it never began
        return None
    else:
        how = "stopped" if info.get("ended") == "stopped" else "ended before finishing (killed?)"
        step = checkpoint_step(work) if work is not None else None
        where = f"; a rerun resumes from step {step}" if step is not None else "; a rerun starts it again"
        run.message = f"{how}{where}"
    return run


def checkpoint_step(work: Path) -> int | None:
    """The step of the checkpoint a rerun would resume from."""
    ckpt = latest_checkpoint(work)
    if ckpt is None:
        return None
    try:
        return int(read_json(ckpt / "state.json")["step"])
    except (OSError, ValueError, KeyError):
        return None


class MetricsFile:
    """Incremental reader of a metrics.jsonl that grows: each read() parses only the bytes appended since the
    last one (a file that shrank, as on resume, is read again from the start)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0
        self._rows: dict[str, list] = {"train": [], "eval": []}
        self._lock = threading.Lock()

    def read(self) -> dict[str, list]:
        with self._lock:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                return {"train": [], "eval": []}
            if size < self._offset:
                self._offset, self._rows = 0, {"train": [], "eval": []}
            if size > self._offset:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    chunk = f.read(size - self._offset)
                end = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next read
                for line in chunk[:end].decode("utf-8", "replace").splitlines():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if row.get("kind") == "eval":
                        self._rows["eval"].append(row)
                    elif "loss" in row:
                        self._rows["train"].append(row)
                self._offset += end
            return {k: list(v) for k, v in self._rows.items()}


def run_info(run: Run) -> dict:
    """The trainer's run.json (pid, total steps, time budget), {} when there is none."""
    if run.work is None or not (run.work / RUN_INFO).is_file():
        return {}
    try:
        return read_json(run.work / RUN_INFO)
    except (OSError, ValueError):
        return {}
