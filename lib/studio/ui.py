"""The training studio: Gradio tabs beside Chat in the app 07_serve.py starts (Runs, Train, Data).

- Runs: every stage directory under the artifacts dir with its status, config, figures and report; two or more
  training runs overlaid on one loss chart.
- Train: pick a config, change the common knobs (the parameter count and 05_check's memory estimate follow as you
  move them), start the pipeline (the Snakemake command is shown), stop it (the trainer checkpoints), resume it;
  the live view of the training run (loss, lr, tokens/s, ETA, samples) updates once a second from metrics.jsonl;
  fine-tune an installed chat model with LoRA as its train.sh does (the settings shown with their reasons first).
- Data: a corpus artifact's sources, removals, length histogram, random documents and bytes/token; the SFT data's
  detected format and examples rendered with the chat template, trained tokens marked.

Handlers are plain methods of `Studio` (tests call them without a browser); `build()` wires them into the current
gr.Blocks. Launching needs `can_launch` (loopback or an API key; lib.app decides).
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import gradio as gr
import pandas as pd
import yaml

from lib.check import fmt_bytes
from lib.config import Config, load_config
from lib.errors import UserError
from lib.install.finetune import plan_finetune
from lib.model.homellm import PRESETS
from lib.models_dir import MODEL, TRAIN, list_installed, models_dir_for
from lib.names import check_name
from lib.stages import STAGE
from lib.studio.configs import (
    CUSTOM,
    FIELDS,
    FROM_PHASE1,
    SOURCE_TYPES,
    config_name,
    estimate,
    form_overrides,
    form_values,
    list_configs,
    preset_dims,
    save_config,
    validated,
)
from lib.studio.explore import (
    corpus_overview,
    data_files,
    project_path,
    random_documents,
    sft_preview,
    source_preview,
    store_upload,
)
from lib.studio.launch import TARGETS, Launcher
from lib.studio.runs import (
    TRAINING_STAGES,
    MetricsFile,
    Run,
    checkpoint_step,
    find_runs,
    pipeline_runs,
    run_info,
)
from lib.train.tracking import fmt_duration

LIVE_PERIOD_S = 1.0  # the live view's refresh: one read of the new metrics lines per second, at most
PIPELINE_COLUMNS = ["run", "started", "stages done", "parameters", "phase-1 tokens", "wall time", "bits/byte",
                    "SFT val loss", "phase-3 reward acc.", "benchmarks (final model, acc.)", "status"]
RUN_COLUMNS = ["run", "stage", "folder", "status", "val loss", "bits/byte", "tok/s", "steps", "wall", "updated", "note"]
CSS = "mark.trained { background: #fde68a; } .sft-example { white-space: pre-wrap; font-family: monospace; " \
      "border: 1px solid #ddd; padding: 6px; margin: 6px 0; }"


def _fmt_seconds(s) -> str:
    return "" if s is None else fmt_duration(s)


def _curve(points: list[tuple]) -> pd.DataFrame:
    """(step, value, series) points as a frame with numeric columns, so the plot's axes are numbers."""
    return pd.DataFrame(points, columns=["step", "value", "series"]).astype({"step": "int64", "value": "float64"})


PALETTE = ("#2563eb", "#f97316", "#16a34a", "#dc2626", "#9333ea", "#0891b2", "#ca8a04", "#db2777")


def _legend(frame):
    """The properties that make Gradio's chart redraw with every series of `frame`: a color and a legend entry each.
    The chart fixes its color domain when it is drawn and redraws only when a property changes, not when new series
    arrive in the data; and a redraw started by properties that come with new data draws the data it had before.
    So the data goes first, then this: without it a val curve that starts after the train curve, or a second run in
    the overlay, is never drawn."""
    if not isinstance(frame, pd.DataFrame):
        return frame  # gr.skip()
    series = list(dict.fromkeys(frame["series"]))
    return gr.update(color_map={s: PALETTE[i % len(PALETTE)] for i, s in enumerate(series)}, colors_in_legend=series)


def _num(v, fmt="{:.4f}"):
    return "" if v is None else fmt.format(v)


class Studio:
    css = CSS  # the page's style for the studio's tabs (lib.app mounts it)

    def __init__(self, project_dir: str | Path, cfg: Config, can_launch: bool = True, hardware: dict | None = None):
        self.project = Path(project_dir).resolve()
        self.cfg = cfg
        # the config the server was started with (--config): the Train and Data tabs open on it
        started = Path(cfg.files[-1]).resolve() if cfg.files else None
        self.started_config = (str(started.relative_to(self.project))
                               if started is not None and started.is_relative_to(self.project) else None)
        artifacts = Path(cfg.artifacts_dir)
        self.artifacts = artifacts if artifacts.is_absolute() else self.project / artifacts
        self.launcher = Launcher(self.project, self.artifacts)
        self.can_launch, self.why_not = can_launch, ""
        if not can_launch:
            self.why_not = "Launching is off: this server is reachable from the network without an API key."
        elif not self.launcher.snakefile.is_file():  # an installed model's runtime/ copy: code, but no pipeline
            self.can_launch = False
            self.why_not = ("Launching is off: this is an installed model's copy of the code, without the pipeline "
                            "(no Snakefile); run 07_serve.py from the Models at Home checkout to train.")
        self.hardware = hardware
        self._metrics: dict[Path, MetricsFile] = {}
        self._live_keys: dict[str, tuple] = {}  # per browser session: what its plots show now
        self._live_series: dict[str, tuple] = {}  # per browser session: the series its loss chart has colors for
        self._live_shown: dict[str, tuple] = {}  # per browser session: (run, series) of the loss data last sent

    # -- runs ----------------------------------------------------------------------------------------------

    def runs(self, stages=None) -> list[Run]:
        return find_runs(self.artifacts, launching=self.launcher.active() is not None, stages=stages)

    def pipeline_table(self, runs: list[Run] | None = None) -> pd.DataFrame:
        """One row per pipeline run: its config's name, when it started, how far it got, its final figures."""
        rows = []
        for p in pipeline_runs(self.runs() if runs is None else runs):
            f = p.figures
            rows.append([p.name, p.started, f"{sum(r.status == 'complete' for r in p.stages)}/{len(p.stages)}",
                         _num(f["parameters"] and f["parameters"] / 1e6, "{:.2f}M"), _num(f["tokens"], "{:,}"),
                         _fmt_seconds(p.wall_s), _num(f["val_bpb"]), _num(f["sft_val_loss"]),
                         _num(f["reward_accuracy"]),
                         " · ".join(f"{t} {a:.3f}" for t, a in f["eval"].items() if a is not None) or "–", p.status])
        return pd.DataFrame(rows, columns=PIPELINE_COLUMNS)

    def runs_table(self, runs: list[Run] | None = None) -> pd.DataFrame:
        """The stage folders, as details of the runs above."""
        rows = []
        for r in self.runs() if runs is None else runs:
            f = r.figures
            rows.append([r.config_name or "?", STAGE[r.stage].title, r.id, r.status, _num(f.get("val_loss")),
                         _num(f.get("val_bpb")),
                         _num(f.get("tok_s"), "{:,.0f}"), f.get("steps", ""), _fmt_seconds(f.get("wall_s")),
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(r.updated)) if r.updated else "", r.message])
        return pd.DataFrame(rows, columns=RUN_COLUMNS)

    def run_choices(self, training_only: bool = False, runs: list[Run] | None = None) -> list[tuple[str, str]]:
        """(label, id): the picker shows runs by name and stage, and hands the folder id to the handlers."""
        return [(r.label, r.id) for r in (self.runs() if runs is None else runs)
                if not training_only or r.stage in TRAINING_STAGES]

    def _find(self, run_id: str | None) -> Run | None:
        return next((r for r in self.runs() if r.id == run_id), None)

    def run_details(self, run_id: str | None):
        """(summary markdown, config YAML, report HTML) of one run."""
        run = self._find(run_id)
        if run is None:
            return "Pick a run.", "", ""
        lines = [f"**{run.id}** — {run.status}" + (f": {run.message}" if run.message else "")]
        lines += [f"- {k}: {v:,.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in run.figures.items()
                  if v is not None and not isinstance(v, dict)]
        lines.append(f"- directory: `{run.path if run.status == 'complete' else run.work or run.path}`")
        config = (yaml.safe_dump(run.config, sort_keys=False) if run.config
                  else "# not finished: the stage's config is in its manifest once it completes")
        return "\n".join(lines), config, self._report_html(run)

    def _report_html(self, run: Run) -> str:
        """The run's report card (08_report), shown inline: the newest report built on top of this run."""
        reports = self.artifacts / "08_report"
        if not reports.is_dir():
            return ""
        for d in sorted(reports.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            page = d / "report.html"
            if not page.is_file():
                continue
            if run.stage == "08_report" and d.name != run.hash:
                continue
            if run.stage != "08_report" and run.hash not in page.read_text(encoding="utf-8", errors="replace"):
                continue
            return (f'<iframe title="report card" style="width:100%;height:640px;border:1px solid #ddd" '
                    f'sandbox="" srcdoc="{html.escape(page.read_text(encoding="utf-8"))}"></iframe>')
        return ""

    def _rows(self, run: Run) -> dict:
        path = run.metrics_path
        if path is None:
            return {"train": [], "eval": []}
        reader = self._metrics.setdefault(path, MetricsFile(path))
        return reader.read()

    def overlay(self, run_ids: list[str] | None) -> pd.DataFrame:
        """Loss curves (train and val) of the chosen runs on one chart."""
        points = []
        for run_id in run_ids or []:
            run = self._find(run_id)
            if run is None:
                continue
            rows = self._rows(run)
            points += [(r["step"], r["loss"], f"{run_id} train") for r in rows["train"]]
            points += [(r["step"], r["val_loss"], f"{run_id} val") for r in rows["eval"]]
        return _curve(points) if points else gr.skip()

    # -- live ----------------------------------------------------------------------------------------------

    def live_run(self) -> Run | None:
        """The training run to watch: the one running, else the most recently active one."""
        runs = self.runs(stages=TRAINING_STAGES)  # once a second: only the training stages are scanned
        return next((r for r in runs if r.status == "running"), runs[0] if runs else None)

    def live(self, session: str = "", force: bool = False):
        """(status, loss plot, lr plot, tok/s plot, samples); a session's plots are skipped when nothing new was
        written since it last got them."""
        run = self.live_run()
        if run is None:  # no empty frames for the plots: one without rows would set their axes to categories
            return "No training run yet: start one above.", gr.skip(), gr.skip(), gr.skip(), ""
        rows = self._rows(run)
        train, evals = rows["train"], rows["eval"]
        key = (run.id, run.status, len(train), len(evals))
        changed = force or key != self._live_keys.get(session)
        self._live_keys[session] = key
        info = run_info(run)
        total = info.get("total_steps")
        last = train[-1] if train else {}
        parts = [f"**{run.id}** — {run.status}", f"step {last.get('step', 0)}" + (f" / {total}" if total else "")]
        if last:
            parts.append(f"loss {last['loss']:.4f}")
            parts.append(f"{last.get('tok_s', 0):,.0f} tok/s")
            if run.status == "running" and last.get("eta_s") is not None:
                parts.append(f"ETA {_fmt_seconds(last['eta_s'])}")
        if evals:
            parts.append(f"val loss {evals[-1]['val_loss']:.4f}")
        parts.append(f"{len(train)} points")
        status = " · ".join(parts)
        if not changed or not train:
            return status, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        loss = _curve([(r["step"], r["loss"], "train") for r in train] + [(r["step"], r["val_loss"], "val")
                                                                          for r in evals])
        self._live_shown[session] = (run.id, ("train", "val") if evals else ("train",))
        lr = _curve([(r["step"], r["lr"], "lr") for r in train])
        tok = _curve([(r["step"], r.get("tok_s") or 0.0, "tokens/s") for r in train])
        samples = "\n".join(f"- step {e['step']}: `{s}`" for e in evals[-3:] for s in e.get("samples", []))
        return status, loss, lr, tok, samples or "_samples appear at each eval_"

    def live_legend(self, session: str = ""):
        """The loss chart's legend update when its series changed for this session (a val curve appeared, another
        run is shown), after the data went out; else nothing."""
        shown = self._live_shown.get(session)  # what live() last sent this session
        if shown is None or self._live_series.get(session) == shown:
            return gr.skip()
        self._live_series[session] = shown
        return _legend(pd.DataFrame({"series": list(shown[1])}))

    # -- launch --------------------------------------------------------------------------------------------

    def configs(self) -> list[str]:
        return list_configs(self.project)

    def _base(self, name: str) -> Config:
        if name not in self.configs():
            raise gr.Error(f"{name}: not one of the config files under {self.project / 'config'}")
        try:
            return load_config(self.project / name)
        except UserError as e:
            raise gr.Error(str(e)) from None

    def load_form(self, name: str) -> list:
        """The form's fields from a config file (in FIELDS order), and a save name."""
        values = form_values(self._base(name))
        return [values[k] for k, _ in FIELDS] + [f"{Path(name).stem}-studio"]

    def base_choices(self) -> list[str]:
        """What phase 2 can tune: this run's phase-1 model, or an installed model (its folder)."""
        try:
            installed = [e["path"] + "/model" for e in list_installed(models_dir_for(self.cfg.install))
                         if (Path(e["path"]) / MODEL / "config.json").is_file()]
        except (OSError, UserError):
            installed = []
        return [FROM_PHASE1, *installed]

    def upload(self, file) -> dict:
        """An uploaded file, copied into the project's data/ folder; the file picker then shows and selects it."""
        if file is None:
            return gr.skip()
        try:
            rel = store_upload(self.project, getattr(file, "name", file))
        except UserError as e:
            raise gr.Error(str(e)) from None
        gr.Info(f"saved as {rel}")
        return gr.update(choices=data_files(self.project), value=rel)

    def preview_source(self, kind: str, path: str | None, field: str) -> str:
        try:
            p = source_preview(self.project, kind, path, field or "text")
        except UserError as e:
            return f"**Cannot preview:** {e}"
        fmt = p["format"] or "unknown"
        head = (f"**{kind}{': ' + path if path else ''}** — {p['files']} file(s); the records look like **{fmt}** "
                "data" + (" (instruction/dialog: fit for SFT, not for a coursework's phase 1)"
                          if fmt not in ("text", "unknown") else " (plain text)"))
        rows = "\n".join(f"| {r['where']} | {r['text'].replace('|', '¦').replace(chr(10), ' ⏎ ')} |"
                         for r in p["records"])
        return f"{head}\n\n| where | first records |\n|---|---|\n{rows}"

    def add_source(self, key: str, text: str, kind: str, path: str | None, field: str, max_docs) -> str:
        """The YAML list of `key` with one more source, as the form describes it (checked like the config is)."""
        src: dict = {"type": kind}
        if kind == "files":
            if not path:
                raise gr.Error("Pick a file or folder first (or upload one).")
            project_path(self.project, path, "source path")
            src["path"] = path
        elif kind == "hf":
            if not path:
                raise gr.Error("Type the hub dataset's name in the path field.")
            src["name"] = path
        if key == "data.sources":  # SFT data has no text field or document limit: its format is detected
            if field and field != "text" and kind in ("files", "hf"):
                src["text_field"] = field
            if max_docs:
                src["max_docs"] = int(max_docs)
        try:
            current = yaml.safe_load(text or "") or []
        except yaml.YAMLError as e:
            raise gr.Error(f"{key}: the YAML above is not valid ({getattr(e, 'problem', e)}); fix it first") from None
        if not isinstance(current, list):
            raise gr.Error(f"{key}: the YAML above is not a list of sources")
        return yaml.safe_dump([*current, src], sort_keys=False, allow_unicode=True)

    def preset_changed(self, preset: str):
        dims = preset_dims(preset)
        if not dims:
            return gr.skip(), gr.skip(), gr.skip()
        return dims["dim"], dims["n_layers"], dims["n_heads"]

    def _overrides(self, name: str, values: list) -> list[str]:
        return form_overrides(self._base(name), dict(zip([k for k, _ in FIELDS], values)))

    def describe(self, name: str, *values) -> tuple[str, str]:
        """(estimate markdown, command preview) for the form as it stands."""
        try:
            overrides = self._overrides(name, list(values[:len(FIELDS)]))
            cfg = validated(self.project / name, overrides, self.project)
            e = estimate(cfg, self.hardware)
        except (UserError, gr.Error) as err:
            return f"**Not valid yet:** {err}", ""
        fits = "fits" if e["fits"] else "**does not fit**"
        text = (f"**{e['parameters'] / 1e6:.2f}M parameters** ({e['body_parameters'] / 1e6:.2f}M without the "
                f"embedding) · pretraining needs about **{fmt_bytes(e['train_bytes'])}** at batch "
                f"{cfg.pretrain.batch_size} × {cfg.pretrain.seq_len} tokens ({e['activation_dtype']} activations; "
                f"05_check's estimate), which {fits} in this machine's {fmt_bytes(e['ram_bytes'])} of RAM · "
                f"serving about {fmt_bytes(e['infer_bytes'])}\n\n"
                f"**Phase 2** ({e['sft_mode']} of {e['sft_params'] / 1e6:.2f}M parameters"
                f"{'' if cfg.sft.base_model is None else ' of ' + cfg.sft.base_model}) needs about "
                f"**{fmt_bytes(e['sft_bytes'])}** at batch {cfg.sft.train.batch_size} × {cfg.sft.train.seq_len} tokens, "
                f"which {'fits' if e['sft_bytes'] <= e['ram_bytes'] else '**does not fit**'}"
                + (f"\n\n**Phase 3** ({cfg.prefs.method.upper()}, {cfg.prefs.train.batch_size} pairs × "
                   f"{cfg.prefs.train.seq_len} tokens, with the frozen phase-2 model beside it) needs about "
                   f"**{fmt_bytes(e['prefs_bytes'])}**" if cfg.prefs.enabled else "\n\n**Phase 3** is off"))
        save_name = values[len(FIELDS)] if len(values) > len(FIELDS) else ""
        target = values[len(FIELDS) + 1] if len(values) > len(FIELDS) + 1 else "all"
        try:
            path = f"config/studio/{config_name(save_name)}.yaml" if overrides else name
        except UserError:
            path = "config/studio/<name>.yaml"
        edits = f"\n\nEdits: `{' '.join('--set ' + o for o in overrides)}`" if overrides else ""
        return text, f"`{self.launcher.display(path, target)}`{edits}"

    def start(self, name: str, *values):
        """Save the edited config (if edited) and start the pipeline on it."""
        if not self.can_launch:
            raise gr.Error(self.why_not)
        fields, save_name, target = list(values[:len(FIELDS)]), values[len(FIELDS)], values[len(FIELDS) + 1]
        try:
            overrides = self._overrides(name, fields)
            path = save_config(self.project, save_name, self.project / name, overrides) if overrides else Path(name)
            state = self.launcher.start(path, target)
        except UserError as e:
            raise gr.Error(str(e)) from None
        gr.Info(f"started: {state['command']}" + (f" (config saved as {path})" if overrides else ""))
        return self.launch_status()

    def stop(self):
        if not self.can_launch:
            raise gr.Error(self.why_not)
        if self.launcher.stop() is None:
            gr.Info("Nothing is running.")
        return self.launch_status()

    def resume(self):
        if not self.can_launch:
            raise gr.Error(self.why_not)
        last = self.launcher.last()
        if not last:
            raise gr.Error("Nothing to resume: no pipeline was started from the studio in this directory yet.")
        if last.get("kind") == "finetune":
            raise gr.Error("The last run was a fine-tune of an installed model: start it again with its own Start "
                           "button (a stopped fine-tune starts over; it takes minutes, not hours).")
        try:
            self.launcher.start(last["config"], last.get("target", "all"))
        except UserError as e:
            raise gr.Error(str(e)) from None
        return self.launch_status()

    # -- fine-tuning an installed model (its train.sh) -----------------------------------------------------

    def finetune_choices(self) -> list[tuple[str, str]]:
        """Installed chat models that have a train.sh: (label, folder)."""
        try:
            entries = list_installed(models_dir_for(self.cfg.install))
        except (OSError, UserError):
            return []
        return [(f"{e['name']} ({e.get('engine') or e.get('kind')})", e["path"]) for e in entries
                if e.get("kind") == "chat" and (Path(e["path"]) / TRAIN).is_file()]

    def _finetune_args(self, install: str | None, data: str | None) -> tuple[Path, Path]:
        if install not in {path for _, path in self.finetune_choices()}:
            raise gr.Error("Pick an installed chat model (06_install.py installs them; the list shows those with "
                           "a train.sh).")
        if not data:
            raise gr.Error("Pick the data to fine-tune on: a file or folder in the project (or upload one).")
        path = Path(data)
        return Path(install), path if path.is_absolute() else self.project / path

    def finetune_plan(self, install: str | None, data: str | None) -> str:
        """The settings train.sh will choose for this model and data, each with its reason (nothing is trained)."""
        folder, path = self._finetune_args(install, data)
        try:
            plan = plan_finetune(folder, path, echo=lambda _m: None)
        except UserError as e:
            raise gr.Error(str(e)) from None
        rows = "\n".join(f"| `{k}` | {v} | {html.escape(why)} |" for k, v, why in plan["params"])
        return (f"**{folder.name}** on `{path}`: {plan['examples']} examples\n\n| setting | value | why |\n"
                f"|---|---|---|\n{rows}")

    def finetune_start(self, install: str | None, data: str | None, name: str):
        """Start the install's train.sh (LoRA; the adapter lands in <install>/adapters/NAME/)."""
        if not self.can_launch:
            raise gr.Error(self.why_not)
        folder, path = self._finetune_args(install, data)
        name = (name or "").strip() or time.strftime("lora-%Y%m%d-%H%M%S")
        try:
            check_name(name, "adapter name")
            if (folder / "adapters" / name).exists():
                raise UserError(f"{folder.name} already has an adapter named {name}; pick another name")
            state = self.launcher.finetune(folder, path, name)
        except UserError as e:
            raise gr.Error(str(e)) from None
        gr.Info(f"started: {state['command']}")
        return self.launch_status()

    def launch_status(self) -> tuple[str, str]:
        """(status line, log tail) of the latest launch."""
        active = self.launcher.active()
        last = active or self.launcher.last()
        if not last:
            return "Nothing started from the studio yet.", ""
        if active:
            line = f"**running** (pid {active['pid']}): `{active['command']}`"
        else:
            line = f"**{self._ended(last)}**: `{last['command']}`"
        return line, self.launcher.log_tail()

    def _ended(self, last: dict) -> str:
        """How the latest launch ended, in the user's words: finished; stopped at step N (and where Resume goes on);
        or which stage failed and why."""
        code = last.get("returncode")
        if code == 0:
            return "finished" + (f": adapter {last['adapter']} is in {last['install']}/adapters/ (the Chat tab's "
                                 "model picker lists it)" if last.get("kind") == "finetune" else "")
        if last.get("kind") == "finetune":
            return ("stopped" if last.get("stopped") else f"failed (exit code {code})") + "; the log below says more"
        since = last.get("started", 0) - 1
        touched = [r for r in self.runs() if r.updated >= since]
        if last.get("stopped"):
            for r in touched:
                step = checkpoint_step(r.work) if r.status == "interrupted" and r.work is not None else None
                if step is not None:
                    return (f"stopped at step {step} of {STAGE[r.stage].title} — Resume continues from checkpoint "
                            f"step {step}")
            return "stopped before a checkpoint was written — Resume starts the unfinished stages again"
        failed = next((r for r in touched if r.status == "failed"), None)
        if failed is not None:
            return f"failed in {STAGE[failed.stage].title} ({failed.id}): {failed.message}"
        return f"failed (Snakemake exit code {code}); the log below says where"

    # -- data ----------------------------------------------------------------------------------------------

    def data_choices(self, runs: list[Run] | None = None) -> list[str]:
        return [r.id for r in (self.runs(stages=("01_data",)) if runs is None else runs)
                if r.stage == "01_data" and r.status == "complete"]

    def explore(self, data_id: str | None, seed: float | None = 0):
        """(summary, sources table, removed table, length histogram, documents) of a 01_data run."""
        run = self._find(data_id)
        if run is None or run.stage != "01_data":
            raise gr.Error("Pick a corpus (a complete 01_data run).")
        try:
            o = corpus_overview(run.path)
        except UserError as e:
            raise gr.Error(str(e)) from None
        splits = ", ".join(f"{k}: {v['documents']:,} documents, {v['chars']:,} characters" for k, v in o["splits"].items())
        bpt = "; ".join(f"tokenizer {t['tokenizer']} (vocab {t['vocab_size']:,}): {t['val_bytes_per_token']} bytes/token"
                        for t in o["tokenizers"]) or "no tokenizer has encoded this corpus yet"
        summary = f"**{run.id}** — {o['documents']:,} documents, {o['chars']:,} characters ({splits}).\n\n{bpt}"
        sources = pd.DataFrame(o["sources"])
        removed = pd.DataFrame([{"reason": k, "documents": v} for k, v in o["removed"].items()])
        hist = pd.DataFrame([{"characters": k, "documents": v} for k, v in o["histogram"].items()])
        s = int(seed or 0)
        docs = []
        for split in ("train", "val"):
            for text in random_documents(run.path, split, k=3, seed=s):
                docs.append(f"**{split}** · {html.escape(text)}")
        # buckets in length order (a bar chart sorts category labels as text otherwise)
        hist_plot = gr.update(value=hist, sort=list(o["histogram"]))
        return summary, sources, removed, hist_plot, "\n\n".join(docs) or "_no documents_"

    def explore_sft(self, name: str, seed: float | None = 0):
        cfg = self._base(name)
        try:
            p = sft_preview(cfg, k=3, seed=int(seed or 0), project_dir=self.project)
        except UserError as e:
            raise gr.Error(str(e)) from None
        lines = [f"**{p['count']:,} examples** from {len(p['sources'])} source(s):"]
        lines += [f"- sft.data[{s['index']}] {s['type']}: format **{s['format']}**, {s['records']:,} records, "
                  f"{s['examples']:,} examples, {s['skipped_no_reply']:,} skipped (no assistant reply)"
                  for s in p["sources"]]
        blocks = [f'<div class="sft-example"><small>{html.escape(e["where"])} — {e["tokens"]} tokens, {e["trained"]} '
                  f'trained{(", " + html.escape(e["note"])) if e["note"] else ""}</small><br>{e["html"]}</div>'
                  for e in p["examples"]]
        return "\n".join(lines), '<p>Highlighted: the tokens the loss trains on.</p>' + "".join(blocks)

    # -- layout --------------------------------------------------------------------------------------------

    def build(self, demo: gr.Blocks) -> None:
        """The studio's tabs, inside the caller's gr.Blocks / gr.Tabs."""
        configs = self.configs()
        first = self.started_config if self.started_config in configs else (configs[0] if configs else None)
        with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
            refresh = gr.Button("Refresh", elem_id="runs-refresh", size="sm")
            pipelines = gr.Dataframe(self.pipeline_table(), interactive=False, elem_id="pipeline-runs", wrap=True,
                                     label="Runs, side by side")
            table = gr.Dataframe(self.runs_table(), interactive=False, elem_id="runs-table", wrap=True,
                                 label="Their stage folders (artifacts/<stage>/<hash>)")
            with gr.Row():
                picked = gr.Dropdown(self.run_choices(), label="Run", elem_id="run-picker", scale=2)
            details = gr.Markdown(elem_id="run-details")
            config = gr.Code(language="yaml", label="Config of this stage", elem_id="run-config")
            report = gr.HTML(elem_id="run-report")
            compare = gr.Dropdown(self.run_choices(training_only=True), multiselect=True, label="Overlay the loss "
                                  "curves of two or more training runs", elem_id="run-compare")
            overlay = gr.LinePlot(x="step", y="value", color="series", title="loss", elem_id="overlay-plot",
                                  height=320)
        with gr.Tab("Train", id="train", elem_id="tab-train"):
            with gr.Row():
                base = gr.Dropdown(configs, value=first, label="Config", elem_id="config-picker", scale=2)
                target = gr.Dropdown(list(TARGETS), value="all", label="Run up to", elem_id="target-picker")
                save_name = gr.Textbox(f"{Path(first).stem}-studio" if first else "", label="Save the edited config as",
                                       elem_id="save-name",
                                       info="config/studio/<name>.yaml (only when something is edited)")
            values = form_values(self._base(first)) if first else {}
            inputs = []
            with gr.Row():
                for key, label in FIELDS[:4]:
                    if key == "model.preset":
                        inputs.append(gr.Dropdown([*PRESETS, CUSTOM], value=values.get(key), label=label,
                                                  elem_id="field-" + key.replace(".", "-")))
                    else:
                        inputs.append(gr.Number(values.get(key), label=label, precision=0, minimum=1,
                                                elem_id="field-" + key.replace(".", "-")))
            with gr.Row():
                for key, label in FIELDS[4:10]:
                    inputs.append(gr.Number(values.get(key), label=label, elem_id="field-" + key.replace(".", "-"),
                                            precision=None if key in ("pretrain.lr", "pretrain.time_budget_min") else 0))
            with gr.Accordion("Phase 1 data sources (YAML: the advanced view; the form below adds to it)", open=True):
                inputs.append(gr.Code(values.get("data.sources", ""), language="yaml", label=FIELDS[10][1],
                                      elem_id="field-data-sources", lines=4))
            gr.Markdown("### Phase 2: instruction tuning (SFT)")
            with gr.Row():
                inputs.append(gr.Dropdown(self.base_choices(), value=values.get("sft.base_model"),
                                          allow_custom_value=True, label=dict(FIELDS)["sft.base_model"],
                                          elem_id="field-sft-base_model", scale=2))
                inputs.append(gr.Number(values.get("sft.train.max_epochs"), label=dict(FIELDS)["sft.train.max_epochs"],
                                        elem_id="field-sft-train-max_epochs"))
                inputs.append(gr.Number(values.get("sft.train.lr"), label=dict(FIELDS)["sft.train.lr"],
                                        elem_id="field-sft-train-lr"))
                inputs.append(gr.Checkbox(bool(values.get("sft.lora.enabled")), label=dict(FIELDS)["sft.lora.enabled"],
                                          elem_id="field-sft-lora-enabled"))
                inputs.append(gr.Number(values.get("sft.lora.rank"), label=dict(FIELDS)["sft.lora.rank"], precision=0,
                                        minimum=0, elem_id="field-sft-lora-rank"))
            with gr.Accordion("SFT data (YAML: the advanced view; the form below adds to it)", open=False):
                inputs.append(gr.Code(values.get("sft.data", ""), language="yaml", label=dict(FIELDS)["sft.data"],
                                      elem_id="field-sft-data", lines=3))
            gr.Markdown("### Phase 3: preference tuning (DPO / ORPO; offline self-play pairs unless prefs.data says "
                        "otherwise)")
            with gr.Row():
                inputs.append(gr.Checkbox(bool(values.get("prefs.enabled", True)),
                                          label=dict(FIELDS)["prefs.enabled"], elem_id="field-prefs-enabled"))
                inputs.append(gr.Dropdown(["dpo", "orpo"], value=values.get("prefs.method", "dpo"),
                                          label=dict(FIELDS)["prefs.method"], elem_id="field-prefs-method"))
                inputs.append(gr.Number(values.get("prefs.beta"), label=dict(FIELDS)["prefs.beta"],
                                        elem_id="field-prefs-beta"))
                inputs.append(gr.Number(values.get("prefs.train.max_steps"), precision=0, minimum=0,
                                        label=dict(FIELDS)["prefs.train.max_steps"],
                                        elem_id="field-prefs-train-max_steps"))
            gr.Markdown("### Add a data source")
            with gr.Row():
                src_type = gr.Dropdown(list(SOURCE_TYPES), value="files", label="Source type", elem_id="src-type")
                src_path = gr.Dropdown(data_files(self.project), value=None, allow_custom_value=True, scale=2,
                                       label="File or folder in the project (or a hub dataset name, for hf)",
                                       elem_id="src-path")
                upload = gr.UploadButton("Upload into data/", file_count="single", elem_id="src-upload")
            with gr.Row():
                src_field = gr.Textbox("text", label="Text field (JSON, CSV, Parquet, hub)", elem_id="src-field")
                src_max = gr.Number(0, label="Max documents (0 = all)", precision=0, minimum=0, elem_id="src-max")
                src_show = gr.Button("Preview", elem_id="src-preview-btn")
                add_pre = gr.Button("Add to phase 1", elem_id="src-add-pretrain")
                add_sft = gr.Button("Add to SFT data", elem_id="src-add-sft")
            src_preview = gr.Markdown(elem_id="src-preview")
            estimate_md = gr.Markdown(elem_id="estimate")
            command_md = gr.Markdown(elem_id="command")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="start-btn", interactive=self.can_launch)
                stop = gr.Button("Stop", variant="stop", elem_id="stop-run-btn", interactive=self.can_launch)
                resume = gr.Button("Resume", elem_id="resume-btn", interactive=self.can_launch)
            if not self.can_launch:
                gr.Markdown(self.why_not, elem_id="launch-off")
            launch_md = gr.Markdown(self.launch_status()[0], elem_id="launch-status")
            with gr.Accordion("Pipeline log", open=False):
                log = gr.Textbox(self.launch_status()[1], lines=12, max_lines=12, show_label=False,
                                 elem_id="launch-log", autoscroll=True)
            with gr.Accordion("Fine-tune an installed model (LoRA, as its train.sh does)", open=False):
                with gr.Row():
                    ft_model = gr.Dropdown(self.finetune_choices(), label="Installed chat model", scale=2,
                                           elem_id="ft-model")
                    ft_data = gr.Dropdown(data_files(self.project), value=None, allow_custom_value=True, scale=2,
                                          label="Data (any format 04_sft reads)", elem_id="ft-data")
                    ft_name = gr.Textbox("", label="Adapter name", placeholder="lora-<date>", elem_id="ft-name")
                with gr.Row():
                    ft_show = gr.Button("Show the settings", elem_id="ft-plan-btn")
                    ft_start = gr.Button("Fine-tune", variant="primary", elem_id="ft-start-btn",
                                         interactive=self.can_launch)
                ft_plan = gr.Markdown(elem_id="ft-plan")
            gr.Markdown("### Live training")
            live_md = gr.Markdown(elem_id="live-status")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="value", color="series", title="loss", elem_id="live-loss",
                                        height=260)
                lr_plot = gr.LinePlot(x="step", y="value", color="series", title="learning rate", elem_id="live-lr",
                                      height=260)
                tok_plot = gr.LinePlot(x="step", y="value", color="series", title="tokens / s", elem_id="live-toks",
                                       height=260)
            samples = gr.Markdown(elem_id="live-samples")
            timer = gr.Timer(LIVE_PERIOD_S)
        with gr.Tab("Data", id="data", elem_id="tab-data"):
            with gr.Row():
                corpus = gr.Dropdown(self.data_choices(), label="Corpus (01_data)", elem_id="data-picker", scale=2)
                seed = gr.Number(0, label="Sample seed", precision=0, elem_id="data-seed")
                show = gr.Button("Explore", elem_id="explore-btn")
            summary = gr.Markdown(elem_id="data-summary")
            with gr.Row():
                sources = gr.Dataframe(label="Per source", interactive=False, elem_id="data-sources")
                removed = gr.Dataframe(label="Removed, by reason", interactive=False, elem_id="data-removed")
            hist = gr.BarPlot(x="characters", y="documents",
                              title="document length (characters)", elem_id="data-hist", height=260, sort=None)
            docs = gr.Markdown(elem_id="data-docs")
            gr.Markdown("### SFT data")
            with gr.Row():
                sft_cfg = gr.Dropdown(configs, value=first, label="Config", elem_id="sft-config", scale=2)
                sft_btn = gr.Button("Preview SFT examples", elem_id="sft-btn")
            sft_md = gr.Markdown(elem_id="sft-summary")
            sft_html = gr.HTML(elem_id="sft-examples")

        # wiring
        def refresh_runs():
            runs = self.runs()  # one scan for the tables and the three pickers
            return (self.pipeline_table(runs), self.runs_table(runs), gr.update(choices=self.run_choices(runs=runs)),
                    gr.update(choices=self.run_choices(training_only=True, runs=runs)),
                    gr.update(choices=self.data_choices(runs)))

        run_lists = [pipelines, table, picked, compare, corpus]
        refresh.click(refresh_runs, None, run_lists, queue=False)
        picked.change(self.run_details, picked, [details, config, report])
        compare.change(self.overlay, compare, overlay).then(lambda ids: _legend(self.overlay(ids)), compare, overlay)
        form = [base, *inputs, save_name, target]
        base.change(self.load_form, base, [*inputs, save_name]).then(self.describe, form, [estimate_md, command_md])
        inputs[0].change(self.preset_changed, inputs[0], inputs[1:4])
        for comp in [*inputs, save_name, target]:
            comp.change(self.describe, form, [estimate_md, command_md], trigger_mode="always_last",
                        show_progress="hidden")
        upload.upload(self.upload, upload, src_path)
        src_show.click(self.preview_source, [src_type, src_path, src_field], src_preview)
        add_pre.click(lambda *a: self.add_source("data.sources", *a), [inputs[10], src_type, src_path, src_field,
                                                                       src_max], inputs[10])
        add_sft.click(lambda *a: self.add_source("sft.data", *a), [inputs[-1], src_type, src_path, src_field, src_max],
                      inputs[-1])
        start.click(self.start, form, [launch_md, log]).then(refresh_runs, None, run_lists)
        stop.click(self.stop, None, [launch_md, log]).then(refresh_runs, None, run_lists)
        resume.click(self.resume, None, [launch_md, log])
        ft_show.click(self.finetune_plan, [ft_model, ft_data], ft_plan)
        ft_start.click(self.finetune_start, [ft_model, ft_data, ft_name], [launch_md, log])

        last_status = {"line": None}

        def tick(request: gr.Request):
            live = self.live(getattr(request, "session_hash", "") or "")
            line, tail = self.launch_status()
            runs_update = [gr.skip()] * len(run_lists)
            if line != last_status["line"]:  # a launch started or ended: the runs list changed
                last_status["line"] = line
                runs_update = list(refresh_runs())
            return (*live, line, tail, *runs_update)

        def legend(request: gr.Request):
            return self.live_legend(getattr(request, "session_hash", "") or "")

        timer.tick(tick, None, [live_md, loss_plot, lr_plot, tok_plot, samples, launch_md, log, *run_lists],
                   show_progress="hidden").then(legend, None, loss_plot, show_progress="hidden")
        show.click(self.explore, [corpus, seed], [summary, sources, removed, hist, docs])
        sft_btn.click(self.explore_sft, [sft_cfg, seed], [sft_md, sft_html])
        demo.load(self.describe, form, [estimate_md, command_md])
        # every page load reads the artifacts and config/ afresh: runs finished, and config files added, since the
        # server started are there without a Refresh or a restart
        demo.load(refresh_runs, None, run_lists, queue=False)
        demo.load(lambda: [gr.update(choices=self.configs())] * 2, None, [base, sft_cfg], queue=False)


def studio_note(cfg: Config) -> str:
    """What the chat tab says when no model is loaded yet."""
    return ("### No model yet\nThere is no trained model in "
            f"`{Path(cfg.artifacts_dir).resolve()}` and none was named with `--model`. Train one in the **Train** tab "
            "(start `config/smoke.yaml` for a first look in under a minute, or `config/default.yaml` for the demo "
            "model): this tab loads the model as soon as the run has one. Or install one: "
            "`python 06_install.py install PATH` / `python 07_serve.py --model PATH`.")
