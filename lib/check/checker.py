"""The check as a whole: check_model() runs source -> detect -> formulas -> verdict into one report dict; the report
as text and JSON; 05_check's stage."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from lib.artifacts import require_stage, stage_output
from lib.atomic import atomic_write_json, atomic_write_text
from lib.check.detect import detect
from lib.check.formulas import FORMULAS, estimates, fmt_bytes, fmt_params, stored_weights
from lib.check.source import open_source
from lib.check.verdict import CLOSE_TO_LIMIT, compatibility, recommend, requirements
from lib.config import CheckConfig, Config, ServeConfig
from lib.fingerprint import code_fingerprint
from lib.handlers import HANDLERS, planned_engine
from lib.hardware import probe_hardware
from lib.stages import stage_dir

REPORT_VERSION = 3  # 2: the verdict names the engine and endpoints; inference is sized at the served context
# 3: the verdict names the handler's kind (chat, embedding, classifier, reranker, speech)


# ---------------------------------------------------------------------------------------------------------
# The report.


def check_code() -> str | None:
    """Fingerprint of the code that writes the report (05_check.py and lib.check with what it imports): a saved
    report is reused only while it is the same (lib.install.installer.load_or_run_check)."""
    try:
        return code_fingerprint("05_check.py", "lib.check")
    except OSError:  # an install's runtime copy has no 05_check.py
        return None

def check_model(ref: str, cfg: CheckConfig | None = None, hardware: dict | None = None,
                disk_path: str | Path = "~", serve_context: int | None = None) -> dict:
    """Analyse a model reference (see module docstring) and return the report as a dict (JSON-ready).

    hardware: a probe_hardware() result to judge against (default: probe this machine); disk_path: where
    the model would be installed (free disk is measured there); serve_context: the longest context the server
    runs a model with (serve.max_context; default ServeConfig's), which sizes the KV cache. Raises UserError for a
    model that cannot be
    found, read or recognised.
    """
    cfg = cfg or CheckConfig()
    t0 = time.time()
    src = open_source(ref, cfg)
    det = detect(src)
    headers = src.safetensors_headers() if det.gguf is None else {}
    stored = stored_weights(src, det, headers)
    hw = hardware or probe_hardware(disk_path)
    est = estimates(src, det, cfg, stored, hw, serve_context or ServeConfig().max_context, ServeConfig().max_active)
    reqs = requirements(src, det)
    compat = compatibility(det, est, hw)
    rec = recommend(compat["inference"], det, hw)
    # what a CPU-only load (the install's post-test, a GPU-less server) should use
    cpu_rec = recommend([r for r in compat["inference"] if r["device"] == "cpu"], det, {**hw, "gpus": []})

    problems = list(det.problems)
    if stored["format"] == "pytorch-pickle":
        problems.append("weights are only in pickle format (.bin/.pt): refused for safety (pickle can run code); "
                        "use a safetensors version of the model")
    if est["inference"] is None:
        problems.append(f"memory cannot be estimated: {est['unknown']}")
    elif rec is None and det.loader:
        problems.append("does not fit this machine in any 16/32-bit dtype (see the compatibility table)")
    if not est["disk"]["fits"]:
        problems.append(f"not enough free disk at {est['disk']['path']}: needs "
                        f"{fmt_bytes(est['disk']['total_shared_env'])}")
    tok_cfg = src.read_json("tokenizer_config.json") or {}
    chat_template = bool((det.gguf or {}).get("chat_template") or tok_cfg.get("chat_template")
                         or any(f.endswith("chat_template.jinja") or f == "chat_template.json" for f in src.files))
    full = det.full_config
    has_gguf = src.kind == "gguf" or any(str(e).endswith(".gguf") for e in src.extras or [])
    served = planned_engine(det.task, full, has_gguf, rec["device"] if rec else "cpu", det.loader)
    return {
        "report_version": REPORT_VERSION, "code": check_code(),
        "ref": str(ref),
        "source": {"kind": src.kind, "path": str(src.gguf_file or src.root) if src.kind != "hub" else None,
                   "repo_id": src.repo_id, "revision": src.revision, "fingerprint": src.fingerprint(),
                   "extras": src.extras},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {
            "task": det.task, "family": det.family, "architecture": det.architecture, "detected_by": det.detected_by,
            "loader": det.loader, "model_type": full.get("model_type"),
            "components": {k: {"library": v["library"], "class": v["class"]} for k, v in det.components.items()},
            "context_length": est["context_length"], "vocab_size": est["dims"].get("vocab"),
            "chat_template": chat_template, "config_dtype": full.get("torch_dtype") or full.get("dtype"),
            "gguf": {k: v for k, v in det.gguf.items() if k not in ("tensors", "chat_template")} if det.gguf else None,
        },
        "files": {"count": len(src.files), "total_bytes": sum(src.files.values()), "weight_format": stored["format"],
                  "weight_dtypes": stored["dtypes"], "stored_weight_bytes": stored["bytes"],
                  "list": dict(sorted(src.files.items())[:200])},
        "requirements": reqs,
        "estimates": {**est, "formulas": FORMULAS},
        "hardware": hw,
        "compatibility": compat,
        "verdict": {
            "supported": det.loader is not None and not det.problems,
            "servable": served is not None,
            "kind": served["kind"] if served else None,
            "engine": served["engine"] if served else None,
            "endpoints": served["endpoints"] if served else [],
            "runnable": rec is not None and not problems,
            "recommended": rec,
            "cpu_torch_dtype": cpu_rec["torch_dtype"] if cpu_rec else None,
            "quantize": suggest_quantization(est, hw),
            "problems": problems,
        },
        "check_seconds": round(time.time() - t0, 2),
    }


def suggest_quantization(est: dict, hw: dict) -> dict | None:
    """For a causal LM: which `06_install.py --quantize` types fit this machine's RAM when llama.cpp serves them, and
    the largest that does (its best quality)."""
    llama = est.get("llama_cpp")
    if not llama:
        return None
    avail = hw["ram"]["available_bytes"] or 0
    fits = {q: x["total"] <= CLOSE_TO_LIMIT * avail for q, x in llama["by_quant"].items()}
    return {"fits": fits, "suggested": next((q for q in ("q8_0", "q5_k_m", "q4_k_m") if fits.get(q)), None)}


def format_report(r: dict) -> str:
    """The human-readable report (report.txt)."""
    m, e, hw, v, f, src = r["model"], r["estimates"], r["hardware"], r["verdict"], r["files"], r["source"]
    inf, params = e["inference"], e["params"]
    where = f"{src['repo_id']}@{(src['revision'] or '')[:12]}" if src["repo_id"] else src["path"]
    if params["total"]:
        size = f"{fmt_params(params['total'])} ({params['total']:,}; {params['source']})"
    else:
        size = f"unknown ({e['unknown']})"
    if f["weight_format"]:
        weights = (f"{f['weight_format']} {', '.join(map(str, f['weight_dtypes']))}, "
                   f"{fmt_bytes(f['stored_weight_bytes'])} stored")
    else:
        weights = "none (config files only)"
    lines = [f"Model check: {r['ref']}", "=" * 78,
             f"type         {m['task']} ({m['family']}, {m['architecture'] or '-'})",
             f"detected by  {m['detected_by']}",
             f"source       {src['kind']} {where}",
             f"parameters   {size}",
             f"context      {e['context_length']}" + (" (assumed: not in the config)" if e["context_assumed"] else ""),
             f"chat         {'chat template present' if m['chat_template'] else 'no chat template'}",
             f"weights      {weights}; files total {fmt_bytes(f['total_bytes'])}"]
    if m["components"]:
        lines.append("components   " + ", ".join(f"{k}={c['class']}" for k, c in m["components"].items()))

    lines += ["", "Requirements"]
    for lib in r["requirements"]["libraries"]:
        lines.append(f"  {lib['name']:<22} {lib['installed'] or 'MISSING':<12} {lib['why']}")
    for sp in r["requirements"]["special"]:
        state = sp["installed"] or ("missing (optional)" if sp["optional"] else "MISSING")
        lines.append(f"  {sp['name']:<22} {state:<12} {sp['why']}; {sp['difficulty']}")
    if r["requirements"]["quantization"]:
        lines.append(f"  quantization: {json.dumps(r['requirements']['quantization'])[:120]}")
    lines += [f"  warning: {w}" for w in r["requirements"]["warnings"]]

    if inf is not None:
        cols = ("weights", "kv_cache", "activations", "load_transient", "runtime_overhead", "total")
        lines += ["", f"Inference memory (batch {inf['batch_size']}, {inf['seq_len']} tokens; stored dtype "
                  f"{inf['stored_dtype'] or 'quantized/unknown'})",
                  f"  {'dtype':<6} " + " ".join(f"{c:>10}" for c in
                                               ("weights", "kv cache", "activ.", "load tmp", "overhead", "total"))]
        for dt, x in inf["by_dtype"].items():
            lines.append(f"  {dt:<6} " + " ".join(f"{fmt_bytes(x[c]):>10}" for c in cols))
    if e.get("llama_cpp"):
        lc, q = e["llama_cpp"], v.get("quantize") or {}
        lines += ["", f"Serving through llama.cpp ({lc['sequences']} replies x {lc['context']} tokens of f16 KV cache; "
                      f"06_install.py --quantize TYPE)",
                  f"  {'weights':<10} " + " ".join(f"{c:>10}" for c in ("file", "kv cache", "tokenizer", "total"))
                  + "  fits"]
        for name, x in lc["by_quant"].items():
            mark = "yes" if q.get("fits", {}).get(name) else "no"
            mark += " (suggested)" if name == q.get("suggested") else ""
            lines.append(f"  {name:<10} " + " ".join(f"{fmt_bytes(x[c]):>10}" for c in ("weights", "kv_cache",
                                                                                        "tokenizer", "total"))
                         + f"  {mark}")
    if "training" in e:
        cpu = e["training"]["cpu"]
        lines += ["", f"Training memory (batch {cpu['batch_size']} x {cpu['seq_len']} tokens, AdamW, "
                  f"LoRA rank {cpu['lora']['rank']})"]
        for key in ("cpu", "gpu"):
            t = e["training"][key]
            full, lora = t["full"], t["lora"]
            lines.append(f"  {key}: full {fmt_bytes(full['total'])} (grad ckpt "
                         f"{fmt_bytes(full['total_with_grad_checkpointing'])}), LoRA {fmt_bytes(lora['total'])} "
                         f"(base {lora['base_dtype']}, {fmt_params(lora['lora_params'])} adapter params), "
                         f"activations {t['activation_dtype']}")
    d = e["disk"]
    envs = ", ".join(f"{k} {fmt_bytes(b)}" for k, b in d["environment"].items())
    lines += ["", f"Disk: model files {fmt_bytes(d['model_files'])}, installed copy {fmt_bytes(d['installed_model'])}",
              f"      environment: {envs}", f"      free at {d['path']}: {fmt_bytes(d['free'])}"]

    gpus = "; ".join(f"{g['name']} {fmt_bytes(g['vram_total_bytes'])} ({fmt_bytes(g.get('vram_free_bytes'))} free)"
                     for g in hw["gpus"]) or "none"
    cpu_hw, ram = hw["cpu"], hw["ram"]
    lines += ["", "Hardware",
              f"  CPU   {cpu_hw['name']}: {cpu_hw['cores']} cores / {cpu_hw['threads']} threads"
              + (", native bf16" if cpu_hw["bf16"] else ""),
              f"  RAM   {fmt_bytes(ram['total_bytes'])} total, {fmt_bytes(ram['available_bytes'])} available",
              f"  GPU   {gpus}"]
    for title, key, col in (("inference", "inference", "dtype"), ("training", "training", "mode")):
        rows = r["compatibility"][key]
        if rows:
            lines += ["", f"Compatibility ({title})", f"  {'device':<8} {col:<6} {'run?':<5} {'needs':>10}  notes"]
            lines += [f"  {row['device']:<8} {row[col]:<6} {'yes' if row['fits'] else 'no':<5} "
                      f"{fmt_bytes(row['need_bytes']):>10}  {'; '.join(row['notes'])}" for row in rows]

    lines += ["", "Verdict"]
    if v["recommended"]:
        lines.append(f"  runs here: {v['recommended']['device']} {v['recommended']['dtype']}")
    if not v["servable"]:
        lines.append(f"  07_serve serves {', '.join(HANDLERS)} models; no handler takes a {m['task']} model "
                     f"({m['family']})")
    lines += [f"  problem: {p}" for p in v["problems"]]
    if v["runnable"] and v["servable"]:
        lines.append(f"  OK: installable with 06_install.py; handler {v.get('kind')}, served by the "
                     f"{v.get('engine')} engine at "
                     + ", ".join(v.get("endpoints") or []))
    lines += ["", "Formulas"] + [f"  - {x}" for x in FORMULAS]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.txt", format_report(report))
    return out_dir


def default_report_dir(artifacts_dir: str | Path, ref: str) -> Path:
    """Where 05_check saves the report of a model named on the command line (06_install looks there first)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(ref).replace("/", "_")).strip(".-_")[:100] or "model"
    if Path(str(ref)).expanduser().exists():  # a path: its last part, plus a short hash of the full path
        p = Path(str(ref)).expanduser().resolve()
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", p.stem if p.is_file() else p.name).strip(".-_")[:80] or "model"
        name = f"{base}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"
    return Path(artifacts_dir) / "05_check" / "models" / name


def run_check(cfg: Config, ref: str | None = None, out: str | Path | None = None,
              echo: Callable[[str], None] | None = print) -> Path:
    """05_check.py: check `ref` (None = this pipeline's export) and save report.txt + report.json.

    The pipeline's export goes to the 05_check stage dir (manifest written last); a model named on the command
    line to `out`, default <artifacts>/05_check/models/<name>/.
    """
    if ref is None:
        export = require_stage(cfg, "04_export", "Run the export stage first (snakemake export), or name a model: "
                                                 "05_check.py PATH|FILE.gguf|owner/name")
        report = check_model(str(export), cfg.check, disk_path=_install_disk(cfg), serve_context=cfg.serve.max_context)
        with stage_output(cfg, "05_check") as (tmp, extra):
            write_report(report, tmp)
            extra.update({"model": str(export), "verdict": report["verdict"]})
        out_dir = stage_dir(cfg, "05_check")
    else:
        report = check_model(ref, cfg.check, disk_path=_install_disk(cfg), serve_context=cfg.serve.max_context)
        out_dir = write_report(report, out or default_report_dir(cfg.artifacts_dir, ref))
    if echo:
        echo(format_report(report))
        echo(f"report: {out_dir / 'report.txt'} and report.json")
    return out_dir


def _install_disk(cfg: Config) -> Path:
    """Free disk is measured where models get installed."""
    return Path(cfg.install.models_dir).expanduser()
