"""The run's report card (stage 08): one self-contained HTML page (images embedded), the same as Markdown with PNG
files, report.json with every figure, and a short summary on the terminal.

It only reads what the stages wrote (manifests, stats, metrics, the Snakemake benchmark files) and runs the final
models for a few figures of its own: the perplexity of the sentences in `report.sentences` and samples for
`report.prompts` at temperatures 0.3, 0.8 and 1.5.

Not here: training or evaluating anything else; the submission bundle (lib/report/bundle.py).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import platform
import unicodedata
from collections import Counter
from pathlib import Path

from lib.artifacts import MANIFEST, git_commit, package_versions, read_json, require_stage, stage_output
from lib.chat import encode_chat
from lib.config import Config, dump_yaml
from lib.data.tokenizer import load_tokenizer
from lib.hardware import probe_hardware
from lib.model.generate import SamplingParams, generate
from lib.model.hf_io import load_hf
from lib.report.evaluate import compare, score_text
from lib.stages import stage_dir, stage_hash, stages_of
from lib.train.tracking import fmt_duration

# the stages a run consists of: not the install (`snakemake report` never installs) nor this report itself
KINDS = ("data", "training", "export", "check")  # the stages a report card covers (those its config runs)
TEMPERATURES = (0.3, 0.8, 1.5)


def _manifest(cfg: Config, stage: str) -> dict | None:
    path = stage_dir(cfg, stage) / MANIFEST
    return read_json(path) if path.is_file() else None


def _benchmark(cfg: Config, stage: str) -> dict | None:
    """Wall time and peak RSS of the stage's whole process, from Snakemake's benchmark file (when run by it)."""
    f = Path(cfg.artifacts_dir) / "logs" / stage / f"{stage_hash(cfg, stage)}.benchmark.tsv"
    if not f.is_file():
        return None
    rows = list(csv.DictReader(f.read_text().splitlines(), delimiter="\t"))
    return {"wall_s": float(rows[-1]["s"]), "peak_rss_mb": float(rows[-1]["max_rss"])} if rows else None


def _stage_row(cfg: Config, stage: str, manifest: dict | None) -> dict:
    """Wall time (Snakemake's measure of the whole job when it ran the stage, else the stage's own) and peak RSS
    (the larger of the two: a short job can end between Snakemake's samples)."""
    bench = _benchmark(cfg, stage) or {}
    own = manifest or {}
    rss = [v for v in (bench.get("peak_rss_mb"), own.get("peak_rss_mb")) if v is not None]
    return {"stage": stage, "hash": stage_hash(cfg, stage), "done": manifest is not None,
            "wall_s": bench.get("wall_s", own.get("wall_time_s")), "peak_rss_mb": max(rss) if rss else None}


def scripts_seen(data_dir: Path, max_docs: int = 2000) -> dict[str, float]:
    """Share of letters per Unicode script (LATIN, CYRILLIC, ...) in the first documents of the val split."""
    counts: Counter = Counter()
    seen = 0
    for shard in sorted(data_dir.glob("val-*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            for ch in json.loads(line)["text"]:
                if ch.isalpha():
                    counts[unicodedata.name(ch, "UNKNOWN").split()[0]] += 1
            seen += 1
            if seen >= max_docs:
                break
    total = sum(counts.values()) or 1
    return {k: round(v / total, 4) for k, v in counts.most_common(6)}


def _curves(metrics: Path, title: str, out: Path) -> Path | None:
    """train/val loss, lr and tokens/s of one phase as a PNG."""
    if not metrics.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    axes[0].set_title(f"{title}: loss")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set_title("learning rate")
    axes[2].plot([r["step"] for r in train], [r.get("tok_s", 0) for r in train])
    axes[2].set_title("tokens / s")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _model_figures(cfg: Config, pretrain_dir: Path, final_dir: Path) -> dict:
    """Perplexity of report.sentences under both models; samples of the final model at each temperature."""
    import torch


    out: dict = {"perplexity": [], "samples": []}
    models = {"phase 1": (load_hf(pretrain_dir), load_tokenizer(pretrain_dir)),
              "final": (load_hf(final_dir), load_tokenizer(final_dir))}
    with torch.inference_mode():
        for sentence in cfg.report.sentences:
            row = {"sentence": sentence}
            for name, (model, tok) in models.items():
                ids = [tok.eos_token_id, *tok.encode(sentence, add_special_tokens=False)]
                _, loss = model(torch.tensor([ids[:-1]]), targets=torch.tensor([ids[1:]]))
                row[name] = round(math.exp(min(loss.item(), 50)), 2)
            out["perplexity"].append(row)
        model, tok = models["final"]
        stops = [i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int)]
        for prompt in cfg.report.prompts:
            ids = encode_chat(tok, [{"role": "user", "content": prompt}])
            for t in TEMPERATURES:
                new = generate(model, ids, SamplingParams(max_new_tokens=cfg.report.sample_tokens, temperature=t,
                                                          seed=cfg.seed, stop_token_ids=stops))
                out["samples"].append({"prompt": prompt, "temperature": t,
                                       "reply": tok.decode(new, skip_special_tokens=True).strip(),
                                       "ended_turn": len(new) < cfg.report.sample_tokens})
    return out


def collect(cfg: Config, out_dir: Path) -> dict:
    """Every figure of the report card, as a JSON-ready dict (PNGs written into out_dir)."""
    check_dir = require_stage(cfg, "05_check", "Run the pipeline first: snakemake --cores all")
    m = {s: _manifest(cfg, s) for s in stages_of(*KINDS)}
    hw = probe_hardware(cfg.artifacts_dir)
    pre, sft, export = m["03_pretrain"], m["04_sft"], m["04_export"]
    data_dir = stage_dir(cfg, "01_data")
    final_eval = pre.get("final_eval", {})
    created = sorted(mf["created"] for mf in m.values() if mf and mf.get("created"))
    report = {
        "run": {"name": cfg.name, "model": cfg.export.name, "date": created[0][:16].replace("T", " ") if created else None},
        "environment": {
            "cpu": hw["cpu"]["name"], "threads": hw["cpu"]["threads"], "cpu_bf16": hw["cpu"]["bf16"],
            "ram_gb": round(hw["ram"]["total_bytes"] / 2**30, 1),
            "gpus": [f"{g['name']} ({g['vram_total_bytes'] / 2**30:.0f} GB)" for g in hw["gpus"]],
            "os": hw["os"], "python": platform.python_version(), "git_commit": git_commit(),
            "packages": package_versions(),
        },
        "stages": [_stage_row(cfg, s, m[s]) for s in stages_of(*KINDS, cfg=cfg)],
        "data": {"documents": m["01_data"].get("documents"), "chars": m["01_data"].get("chars"),
                 "removed": m["01_data"].get("removed"),
                 "sources": read_json(data_dir / "stats.json").get("sources") if (data_dir / "stats.json").is_file()
                 else [],
                 "scripts": scripts_seen(data_dir)},
        "tokenizer": {"vocab_size": m["02_tokenizer"].get("vocab_size"), "source": m["02_tokenizer"].get("source"),
                      "val_bytes_per_token": m["02_tokens"].get("val_bytes_per_token")},
        "model": {"parameters": pre.get("parameters"), "shape": pre.get("model")},
        "pretrain": {k: pre.get(k) for k in ("steps", "tokens", "epochs", "stop_reason", "precision", "train_seconds")},
        "final": {"val_loss": final_eval.get("val_loss"), "val_ppl": final_eval.get("val_ppl"),
                  "val_bpb": final_eval.get("val_bpb")},
        "sft": {k: sft.get(k) for k in ("mode", "steps", "stop_reason", "best_val_loss")}
        | {"end_of_turn_rate": (sft.get("end_of_turn") or {}).get("share_ended_turn")},
        "prefs": _prefs_figures(cfg, m["04_prefs"]),
        "export": {"max_abs_logit_diff": (export.get("hf") or {}).get("max_abs_logit_diff"),
                   "gguf": [{"file": g["file"], "greedy_match": (g.get("check") or {}).get("greedy_match")}
                            for g in export.get("gguf") or []]},
        "check": read_json(check_dir / "report.json").get("verdict"),
        "coursework": {"phase 1": pre.get("coursework"), "phase 2": sft.get("coursework")},
        "config": dump_yaml(cfg),
    }
    report.update(_model_figures(cfg, stage_dir(cfg, "03_pretrain"), stage_dir(cfg, "04_export") / "hf"))
    report["eval"] = _benchmarks(cfg, stage_dir(cfg, "03_pretrain"), stage_dir(cfg, "04_export") / "hf")
    report["plots"] = [p.name for p in (_curves(stage_dir(cfg, "03_pretrain") / "metrics.jsonl", "phase 1 (pretrain)",
                                               out_dir / "pretrain.png"),
                                        _curves(stage_dir(cfg, "04_sft") / "metrics.jsonl", "phase 2 (SFT)",
                                                out_dir / "sft.png"),
                                        cfg.prefs.enabled and _curves(stage_dir(cfg, "04_prefs") / "metrics.jsonl",
                                                                      "phase 3 (preferences)", out_dir / "prefs.png"))
                          if p]
    return report


def _benchmarks(cfg: Config, pretrain_dir: Path, final_dir: Path) -> dict | None:
    """report.eval_tasks through lm-evaluation-harness, on the phase-1 and the final model (zero-shot)."""
    if not cfg.report.eval_tasks:
        return None
    return compare([("phase 1", pretrain_dir, None), ("final", final_dir, None)], cfg.report.eval_tasks,
                   cfg.report.eval_limit, seed=cfg.seed)


PAIR_FIGURES = {"reward_accuracy": ("held-out reward accuracy", ""), "reward_margin": ("reward margin", "nats × β"),
                "chosen_logps": ("log-prob of chosen replies", "nats"),
                "rejected_logps": ("log-prob of rejected replies", "nats"),
                "kl_to_reference": ("KL to the phase-2 model", "nats/token")}


def _prefs_figures(cfg: Config, m: dict | None) -> dict | None:
    """Phase 3 before and after: the held-out pair figures, end of turn and reply length, the same prompts' replies."""
    if not cfg.prefs.enabled or not m:
        return None
    before, after = m.get("before") or {}, m.get("after") or {}
    rows = [[label, unit, (before.get("pairs") or {}).get(k), (after.get("pairs") or {}).get(k)]
            for k, (label, unit) in PAIR_FIGURES.items()]
    for k, label, unit in (("end_of_turn_rate", "held-out replies that end their turn", ""),
                           ("mean_reply_tokens", "mean reply length", "tokens")):
        rows.append([label, unit, (before.get("held_out") or {}).get(k), (after.get("held_out") or {}).get(k)])
    replies = [{"prompt": b["prompt"], "before": b["reply"], "after": a["reply"]}
               for b, a in zip((before.get("replies") or {}).get("answers", []),
                               (after.get("replies") or {}).get("answers", []))]
    sources = (m.get("data") or {}).get("sources") or []
    return {"method": m.get("method"), "beta": m.get("beta"), "mode": m.get("mode"), "steps": m.get("steps"),
            "tokens": m.get("tokens"), "train_seconds": m.get("train_seconds"), "stop_reason": m.get("stop_reason"),
            "pairs": ", ".join(f"{s['type']} {s['pairs']:,}" for s in sources), "figures": rows, "replies": replies,
            "held_out_prompts": (after.get("held_out") or {}).get("prompts")}


# ---------------------------------------------------------------------------------------------------------
# Rendering: one list of sections, written as HTML and as Markdown.


def _fmt(v, unit: str = "") -> str:
    """A value as a reader wants it: grouped digits, 4 significant figures, ✓/✗ for yes/no, – for unknown, a unit."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "✓" if v else "✗"
    if isinstance(v, float):
        text = f"{v:,.4g}"
    elif isinstance(v, int):
        text = f"{v:,}"
    elif isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items()) or "–"
    elif isinstance(v, list):
        return ", ".join(_fmt(x) for x in v) or "–"
    else:
        return str(v)
    return f"{text} {unit}".rstrip()


def _share(v) -> str:
    return "–" if v is None else f"{v:.0%}"


def _duration(seconds) -> str:
    return "–" if seconds is None else fmt_duration(seconds)


def _millions(n) -> str:
    return "–" if n is None else f"{n / 1e6:.2f} M"


# A section: (title, header row or None, rows) or (title, None, preformatted text).
Section = tuple[str, "list[str] | None", "list[list[str]] | str"]


def _coursework_rows(cw: dict) -> list[list[str]]:
    rows = []
    for phase in ("phase 1", "phase 2"):
        rules = cw.get(phase) or {}
        if not rules.get("enabled"):
            continue
        rows.append([phase, "rules checked before training", _fmt(rules.get("checked") == "passed")])
        rows += [[phase, name.replace("_", " "), _fmt(value)] for name, value in rules.items()
                 if name not in ("enabled", "checked")]
    return rows


def sections(r: dict) -> list[Section]:
    """The report card in reading order: tables with a header row where they have columns, ✓/✗ for checks,
    numbers with their units; the resolved config last, as YAML."""
    e, data = r["environment"], r["data"]
    verdict = r["check"] or {}
    def per_split(v) -> str:
        return f"{v.get('train', 0):,} train · {v.get('val', 0):,} val" if isinstance(v, dict) else _fmt(v)
    cw_rows = _coursework_rows(r["coursework"])
    p = r.get("prefs")
    out: list[Section] = [
        ("Summary", None, [
            ["run", f"{r['run']['name']} (model {r['run']['model']}), started {r['run']['date'] or '–'}"],
            ["final val loss", _fmt(r["final"]["val_loss"], "nats/token")],
            ["perplexity", _fmt(r["final"]["val_ppl"])],
            ["bits per byte", _fmt(r["final"]["val_bpb"], "bits/byte")],
            ["parameters", _millions(r["model"]["parameters"])],
            ["SFT replies that end their turn", _share(r["sft"]["end_of_turn_rate"])],
            *([["phase 3 held-out reward accuracy", _fmt(r["prefs"]["figures"][0][3])]] if r.get("prefs") else []),
            ["runs on this machine (05_check)", "✓" if verdict.get("runnable") else f"✗ {_fmt(verdict.get('problems'))}"],
            ["coursework rules", "not enabled" if not cw_rows else _fmt(all(row[2] != "✗" for row in cw_rows))]]),
        ("Machine and software", None,
         [["CPU", f"{e['cpu']} ({e['threads']} threads)"], ["CPU bf16 matrix units", _fmt(bool(e["cpu_bf16"]))],
          ["RAM", _fmt(e["ram_gb"], "GB")], ["GPUs", ", ".join(e["gpus"]) or "none"], ["OS", e["os"]],
          ["python", e["python"]], ["git commit", _fmt(e["git_commit"])]]
         + [[k, v] for k, v in e["packages"].items() if k != "python"]),
        ("Stages", ["stage", "done", "hash", "wall time", "peak RSS"],
         [[s["stage"], _fmt(s["done"]), s["hash"], _duration(s["wall_s"]), _fmt(s["peak_rss_mb"], "MB")]
          for s in r["stages"]]),
        ("Data", None, [["documents", per_split(data["documents"])], ["characters", per_split(data["chars"])],
                        ["scripts seen (share of letters)",
                         ", ".join(f"{k.title()} {v:.0%}" for k, v in (data["scripts"] or {}).items()) or "–"]]),
        ("Data sources", ["source", "read", "kept", "characters kept"],
         [[s.get("label", "?"), _fmt(s.get("read")), _fmt(s.get("kept")), _fmt(s.get("kept_chars"))]
          for s in data["sources"] or []]),
        ("Documents removed", ["reason", "documents"],
         [[k.replace("_", " "), _fmt(v)] for k, v in (data["removed"] or {}).items()]),
        ("Tokenizer and model", None, [
            ["vocabulary", _fmt(r["tokenizer"]["vocab_size"], "tokens")],
            ["tokenizer", _fmt(r["tokenizer"].get("source"))],
            ["bytes per token (val)", _fmt(r["tokenizer"]["val_bytes_per_token"])]]
         + [[k.replace("_", " "), _fmt(v)] for k, v in (r["model"]["shape"] or {}).items()]),
        ("Training", ["phase", "steps", "tokens", "time", "stop reason", "precision / mode"], [
            ["1 pretrain", _fmt(r["pretrain"]["steps"]), _fmt(r["pretrain"].get("tokens")),
             _duration(r["pretrain"].get("train_seconds")), _fmt(r["pretrain"]["stop_reason"]),
             _fmt(r["pretrain"]["precision"])],
            ["2 SFT", _fmt(r["sft"]["steps"]), "–", "–", _fmt(r["sft"]["stop_reason"]), _fmt(r["sft"]["mode"])]]
         + ([["3 preferences", _fmt(p["steps"]), _fmt(p["tokens"]), _duration(p["train_seconds"]),
              _fmt(p["stop_reason"]), f"{(p['method'] or '').upper()} β {_fmt(p['beta'])}, {_fmt(p['mode'])}"]]
            if p else [])),
        *([(f"Phase 3: preference tuning ({p['pairs']} pairs)", ["figure", "before", "after"],
             [[label, _fmt(b, unit), _fmt(a, unit)] for label, unit, b, a in p["figures"]]),
            ("Replies before and after phase 3 (greedy)", ["prompt", "before", "after"],
             [[x["prompt"], x["before"] or "(empty)", x["after"] or "(empty)"] for x in p["replies"]])] if p else []),
        *([("Benchmarks (lm-evaluation-harness, zero-shot; score ± standard error)",
             ["task", "metric", "items", "chance", *r["eval"]["models"]],
             [[task, next(iter(rows.values())).get("metric", "acc"), _fmt(next(iter(rows.values())).get("n")),
               _fmt(next(iter(rows.values())).get("chance")), *[score_text(rows[m]) for m in r["eval"]["models"]]]
              for task, rows in r["eval"]["tasks"].items()])]
           if r.get("eval") else []),
        ("Perplexity of your sentences", ["sentence", "phase 1", "final"],
         [[p["sentence"], _fmt(p["phase 1"]), _fmt(p["final"])] for p in r["perplexity"]]),
        ("Samples", ["prompt", "temperature", "reply"],
         [[s["prompt"], _fmt(s["temperature"]), s["reply"] or "(empty)"] for s in r["samples"]]),
        ("Export checks", ["check", "result"],
         [["HF export: max |logit difference| to the trained model", _fmt(r["export"]["max_abs_logit_diff"])]]
         + [[f"GGUF {g['file']}: greedy output matches", _fmt(g["greedy_match"])] for g in r["export"]["gguf"]]),
    ]
    if cw_rows:
        out.append(("Coursework rules", ["phase", "rule", "value"], cw_rows))
    out.append(("Resolved config", None, r["config"]))
    return out


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;"
       "text-align:left;vertical-align:top}tr:first-child th{background:#f3f3f3}pre{background:#f7f7f7;padding:1em;"
       "overflow:auto}img{max-width:100%}")


def render_html(r: dict, out_dir: Path) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Models at Home — report card</title>"
             f"<style>{CSS}</style></head><body><h1>Models at Home — report card</h1>"]
    for title, header, body in sections(r):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if isinstance(body, str):
            parts.append(f"<pre>{html.escape(body)}</pre>")
            continue
        rows = ([("th", header)] if header else []) + [("td", row) for row in body]
        parts.append("<table>" + "".join("<tr>" + "".join(f"<{t}>{html.escape(str(c))}</{t}>" for c in row) + "</tr>"
                                         for t, row in rows) + "</table>")
        if title == "Training":
            for name in r["plots"]:
                data = base64.b64encode((out_dir / name).read_bytes()).decode()
                parts.append(f"<img alt='{name}' src='data:image/png;base64,{data}'>")
    return "".join(parts) + "</body></html>\n"


def render_markdown(r: dict) -> str:
    lines = ["# Models at Home — report card", ""]
    for title, header, body in sections(r):
        lines += [f"## {title}", ""]
        if isinstance(body, str):
            lines += ["```yaml", body.rstrip(), "```", ""]
            continue
        width = max(len(row) for row in [header or [], *body]) or 1
        rows = [header or [""] * width, *body]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in rows[0]) + " |")
        lines.append("|" + "---|" * width)
        lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows[1:]]
        lines.append("")
        if title == "Training":
            lines += [f"![{name}]({name})" for name in r["plots"]] + [""]
    return "\n".join(lines)


def summary(r: dict, out: Path) -> str:
    f, v = r["final"], r["check"] or {}
    return (f"report card: {out / 'report.html'}\n"
            f"  val loss {_fmt(f['val_loss'])}, perplexity {_fmt(f['val_ppl'])}, {_fmt(f['val_bpb'])} bits/byte; "
            f"{_millions(r['model']['parameters'])} parameters; SFT end-of-turn rate {_share(r['sft']['end_of_turn_rate'])}; "
            f"05_check: {'runnable here' if v.get('runnable') else 'NOT runnable'}")


def run_report(cfg: Config) -> Path:
    """Stage 08: write artifacts/08_report/<hash>/ (report.html, report.md, report.json, PNGs); print a summary."""
    final = stage_dir(cfg, "08_report")
    with stage_output(cfg, "08_report") as (out, extra):
        r = collect(cfg, out)
        (out / "report.json").write_text(json.dumps(r, indent=2, ensure_ascii=False, default=str) + "\n")
        (out / "report.html").write_text(render_html(r, out), encoding="utf-8")
        (out / "report.md").write_text(render_markdown(r), encoding="utf-8")
        extra["final"] = r["final"]
        extra["eval"] = r.get("eval")
    print(summary(r, final))
    return final
