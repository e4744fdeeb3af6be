"""A submission bundle a student hands in, and its verification by a teacher.

    bundle = make_bundle(cfg, config_files)        # artifacts/bundles/submission-<hash>.tar.gz
    ok = verify_bundle(bundle, workdir, quick_steps=None)

The bundle holds: the resolved config (with the local input files it reads, under inputs/), the report card, the
final model (HF folder and GGUF files), the tokenizer, the phase-1 and phase-2 weights with their loss curves, the
digest of every deterministic stage's output, the environment (python, pip freeze, CPU, GPU), a README with the
one command that reproduces it, and SHA256SUMS of every file.

`verify` extracts it safely (regular files and folders only, nothing outside the target, every file checked against
SHA256SUMS), re-runs the pipeline from it in a fresh directory with Snakemake and prints, per stage, identical or
different (the max weight difference and the loss-curve difference for training stages), then the final metrics
side by side. quick_steps=N re-runs the data, tokenizer and token stages and the first N pretraining steps only.
A stage trained on a time budget is not deterministic (its step count depended on the machine): the bundle pins
the step count it reached and verify reports that stage's curve without requiring identity.

Not here: the report itself (lib/report/card.py).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

from lib import ROOT
from lib.artifacts import MANIFEST, git_commit, read_json, require_stage
from lib.atomic import atomic_file
from lib.config import Config, load_config, to_dict
from lib.errors import UserError
from lib.fingerprint import files_of, sha256_file
from lib.hardware import probe_hardware
from lib.stages import STAGE, stage_dir, stage_hash, stages_of

FORMAT = 1
QUICK_STEPS = 20  # `verify --quick` without a number: the data stages and this many steps of phase 1
SUMS = "SHA256SUMS"
# The stages a bundle carries. What identity means for each: the bytes of the files its stage map entry names
# (Stage.identity); training stages compare weights and loss curves instead (their metrics carry wall-clock fields),
# and manifests carry timestamps.
BUNDLED = ("data", "training", "export")  # kinds; a config's own list is stages_of(*BUNDLED, cfg=cfg)


def stage_digest(stage: str, folder: Path) -> str:
    h = hashlib.sha256()
    for pattern in STAGE[stage].identity:
        for f in sorted(folder.glob(pattern)):
            h.update(f"{f.relative_to(folder)}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()[:16]


def loss_curve(metrics: Path) -> dict[str, list]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    return {"train": [(r["step"], r["loss"]) for r in rows if "loss" in r],
            "val": [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]}


# ---------------------------------------------------------------------------------------------------------
# Making a bundle.


def _pin_config(cfg: Config, inputs: dict[str, Path]) -> tuple[dict, list[str]]:
    """The resolved config a re-run needs: local inputs pointing into the bundle, the precision actually used, and
    time budgets replaced by the steps they reached."""
    c = to_dict(cfg)
    c["artifacts_dir"] = "artifacts"

    def bundle_input(path: str | None, key: str) -> str | None:
        if not path:
            return path
        p = Path(path).expanduser()
        p = p if p.is_absolute() else Path(cfg.base_dir) / p
        files = files_of(str(p))
        if not files:
            return path  # a hub id or a name: nothing local to take along
        inputs[key] = p
        return f"../inputs/{key}/{p.name}"  # the file, the folder, or the glob's last part, inside the bundle

    for i, src in enumerate(c["data"]["sources"]):
        if src["type"] == "files":
            src["path"] = bundle_input(src["path"], f"data{i}")
    for i, src in enumerate(c["sft"]["data"]):
        if src["type"] == "files":
            src["path"] = bundle_input(src["path"], f"sft{i}")
    for i, src in enumerate(c["prefs"]["data"]):
        if src["type"] == "files":
            src["path"] = bundle_input(src["path"], f"prefs{i}")
    c["sft"]["base_model"] = bundle_input(c["sft"]["base_model"], "base_model")
    c["tokenizer"]["pretrained"] = bundle_input(c["tokenizer"]["pretrained"], "tokenizer")
    budgeted = []
    sections = {"03_pretrain": c["pretrain"], "04_sft": c["sft"]["train"], "04_prefs": c["prefs"]["train"]}
    for stage in stages_of("training", cfg=cfg):
        section = sections[stage]
        m = read_json(stage_dir(cfg, stage) / MANIFEST)
        # the precision note starts with what ran ("fp32 (this CPU has no bf16 ...)", "bf16 autocast (...)")
        section["precision"] = str(m.get("precision") or "fp32").split()[0]
        if "compiled" in m:  # compiled kernels sum in another order than eager ones: the re-run takes the same path
            section["compile"] = bool(m["compiled"])
        if section.get("time_budget_min"):
            section["time_budget_min"] = None
            section["max_steps"] = m["steps"]
            budgeted.append(stage)
    c["install"]["models_dir"] = "models"
    return c, budgeted


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def make_bundle(cfg: Config, config_files: list[str], out: str | Path | None = None) -> Path:
    """Write the submission archive (deterministic for the same artifacts); returns its path."""
    report = require_stage(cfg, "08_report", "Run the whole pipeline first: snakemake --cores all")
    export = require_stage(cfg, "04_export", "Run the whole pipeline first: snakemake --cores all")
    inputs: dict[str, Path] = {}
    pinned, budgeted = _pin_config(cfg, inputs)
    files: dict[str, Path | bytes] = {"config/resolved.yaml": yaml.safe_dump(pinned, sort_keys=False, allow_unicode=True).encode()}
    for i, f in enumerate(config_files):
        files[f"config/original-{i}-{Path(f).name}"] = Path(f)
    for key, p in inputs.items():
        for f in files_of(str(p)):
            rel = f.relative_to(p) if p.is_dir() else Path(f.name)
            files[f"inputs/{key}/{p.name if p.is_dir() else ''}/{rel}".replace("//", "/")] = f
    for f in sorted(report.iterdir()):
        files[f"report/{f.name}"] = f
    for f in sorted(export.rglob("*")):
        if f.is_file():
            files[f"model/{f.relative_to(export)}"] = f
    tok = stage_dir(cfg, "02_tokenizer")
    for f in sorted(tok.iterdir()):
        files[f"tokenizer/{f.name}"] = f
    stages = {}
    for stage in stages_of(*BUNDLED, cfg=cfg):
        d = stage_dir(cfg, stage)
        files[f"stages/{stage}/manifest.json"] = d / MANIFEST
        entry = {"hash": stage_hash(cfg, stage), "deterministic": stage not in budgeted}
        if STAGE[stage].identity:
            entry["digest"] = stage_digest(stage, d)
        else:
            files[f"stages/{stage}/model.safetensors"] = d / "model.safetensors"
            files[f"stages/{stage}/metrics.jsonl"] = d / "metrics.jsonl"
        stages[stage] = entry
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    hw = probe_hardware(cfg.artifacts_dir)
    # only what does not change between two bundles of the same run: the same artifacts give the same archive
    machine = {"cpu": hw["cpu"], "ram_total_bytes": hw["ram"]["total_bytes"], "os": hw["os"],
               "gpus": [{k: g.get(k) for k in ("name", "vram_total_bytes", "compute_capability")} for g in hw["gpus"]]}
    meta = {"format": FORMAT, "created": read_json(report / MANIFEST)["created"], "git_commit": git_commit(),
            "stages": stages, "time_budgeted": budgeted, "final": read_json(report / MANIFEST).get("final"),
            "environment": {"python": platform.python_version(), "cpu": hw["cpu"]["name"],
                            "cpu_bf16": hw["cpu"]["bf16"], "gpus": [g["name"] for g in hw["gpus"]]}}
    files["bundle.json"] = json.dumps(meta, indent=2).encode()
    files["environment/pip-freeze.txt"] = freeze.encode()
    files["environment/hardware.json"] = json.dumps(machine, indent=2, default=str).encode()
    files["README.md"] = README.format(stages=", ".join(stages), budget=(
        f"Time-budgeted stages ({', '.join(budgeted)}) re-run with the step count they reached; their weights can "
        "differ (the schedule followed the clock), so verify reports them without requiring identity.\n"
        if budgeted else "")).encode()
    sums = "".join(f"{hashlib.sha256(v if isinstance(v, bytes) else v.read_bytes()).hexdigest()}  {k}\n"
                   for k, v in sorted(files.items()))
    files[SUMS] = sums.encode()

    out = Path(out) if out else Path(cfg.artifacts_dir) / "bundles" / f"submission-{stage_hash(cfg, '08_report')}.tar.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            v = files[name]
            _add_file(tar, f"submission/{name}", v if isinstance(v, bytes) else v.read_bytes())
    return out


README = """# A Models at Home submission

Reproduce and compare, stage by stage, on your machine (from a Models at Home checkout, after ./install.sh):

    python 08_report.py verify submission.tar.gz            # the whole pipeline (minutes to hours)
    python 08_report.py verify submission.tar.gz --quick 20 # data, tokenizer, tokens and 20 training steps

It prints identical / different for every stage ({stages}) and the final metrics side by side, and exits 0 only
when every deterministic stage is identical. {budget}
Contents: config/ (resolved.yaml is what runs; the original files beside it), inputs/ (local data the config
reads), report/ (report.html), model/ (HF folder + GGUF), tokenizer/, stages/ (manifests, weights and loss curves),
environment/ (pip freeze, hardware), bundle.json, SHA256SUMS (`sha256sum -c SHA256SUMS` checks every file).
"""


# ---------------------------------------------------------------------------------------------------------
# Verifying.


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract the bundle into dest/submission; UserError naming the problem for anything that is not a plain,
    complete, untampered bundle of ours."""
    if not archive.is_file():
        raise UserError(f"{archive}: no such file")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if m.name.startswith("/") or ".." in parts or not parts or parts[0] != "submission":
                    raise UserError(f"{archive}: refusing {m.name!r}: a bundle holds only paths under submission/")
                if not (m.isfile() or m.isdir()):
                    raise UserError(f"{archive}: refusing {m.name!r}: links and special files are not allowed in a "
                                    "bundle")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        raise UserError(f"{archive}: not a readable bundle (truncated or damaged: {type(e).__name__}: {e})") from None
    root = dest / "submission"
    if not (root / "bundle.json").is_file() or not (root / SUMS).is_file():
        raise UserError(f"{archive}: bundle.json or {SUMS} is missing: not a Models at Home submission")
    meta = read_json(root / "bundle.json")
    if not isinstance(meta.get("format"), int) or meta["format"] > FORMAT:
        raise UserError(f"{archive}: bundle format {meta.get('format')!r} is newer than this checkout reads "
                        f"({FORMAT}); update Models at Home")
    listed = {}
    for line in (root / SUMS).read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {SUMS}
    missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
    changed = sorted(n for n in set(listed) & present if sha256_file(root / n) != listed[n])
    if missing or extra or changed:
        raise UserError(f"{archive}: the files do not match {SUMS}: " + "; ".join(
            f"{what}: {', '.join(names[:5])}" for what, names in (("missing", missing), ("not listed", extra),
                                                                  ("changed", changed)) if names))
    return root


def _max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    if wa.keys() != wb.keys():
        return float("inf")
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def _curve_diff(submitted: dict, rerun: dict, upto: int | None = None) -> float:
    """Max |Δ loss| over the steps the submitted curve logged (up to `upto`); inf if the re-run lacks one. A re-run
    stopped early logs one extra eval at its last step, which the submitted curve need not have."""
    diffs = []
    for key in ("train", "val"):
        theirs = {s: v for s, v in submitted[key] if upto is None or s <= upto}
        mine = dict(rerun[key])
        if not theirs.keys() <= mine.keys():
            return float("inf")
        diffs += [abs(mine[s] - theirs[s]) for s in theirs]
    return max(diffs, default=0.0)


def verify_bundle(archive: str | Path, workdir: str | Path, quick_steps: int | None = None,
                  echo=print) -> bool:
    """Re-run the bundle in workdir and compare; True when every deterministic stage is identical."""
    archive, workdir = Path(archive), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise UserError(f"{workdir}: not empty; verify needs a fresh directory")
    root = safe_extract(archive, workdir)
    meta = read_json(root / "bundle.json")
    run = workdir / "rerun"
    run.mkdir()
    extra = run / "verify.yaml"
    extra.write_text(yaml.safe_dump({"pretrain": {"stop_at_step": quick_steps}} if quick_steps else {}))
    target = "pretrained" if quick_steps else "exported"
    echo(f"verify: re-running {target} from {archive} in {run} (bundle made {meta['created']}, commit "
         f"{meta.get('git_commit')})")
    cmd = [sys.executable, "-m", "snakemake", target, "-s", str(ROOT / "Snakefile"), "--directory", str(run),
           "--cores", "all", "--configfile", str(root / "config" / "resolved.yaml"), str(extra)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"verify: the re-run failed (Snakemake exit {res.returncode}); its logs are under "
                        f"{run / 'artifacts' / 'logs'}. Last lines: {' | '.join(res.stderr.strip().splitlines()[-4:])}")
    return compare_rerun(root, run, quick_steps, echo)


def compare_rerun(root: Path, run: Path, quick_steps: int | None = None, echo=print) -> bool:
    """Compare an extracted bundle (root) with its re-run (Snakemake ran it in `run`), stage by stage; True when every
    deterministic stage is identical."""
    meta = read_json(root / "bundle.json")
    cfg = load_config([str(root / "config" / "resolved.yaml"), str(run / "verify.yaml")])
    cfg.artifacts_dir = str(run / "artifacts")  # where Snakemake ran it
    all_ok = True
    echo(f"{'stage':<14} {'result':<11} how it was compared")
    # quick: the data stages and the first steps of phase 1
    stages = (*stages_of("data"), stages_of("training")[0]) if quick_steps else tuple(meta["stages"])
    for stage in stages:
        want, d = meta["stages"][stage], stage_dir(cfg, stage)
        deterministic = want["deterministic"]
        if STAGE[stage].identity:
            same = stage_digest(stage, d) == want["digest"]
            files = ", ".join(STAGE[stage].identity)
            detail = f"the bytes of {files}: " + ("byte-identical" if same else "differ")
        else:
            curve = _curve_diff(loss_curve(root / "stages" / stage / "metrics.jsonl"), loss_curve(d / "metrics.jsonl"),
                                quick_steps)
            if quick_steps:
                same = curve == 0.0
                detail = f"the loss curve of the first {quick_steps} steps: max |Δ loss| {curve:.3g}"
            else:
                dw = _max_weight_diff(root / "stages" / stage / "model.safetensors", d / "model.safetensors")
                same = dw == 0.0 and curve == 0.0
                detail = f"the weights and the loss curve: max |Δ weight| {dw:.3g}, max |Δ loss| {curve:.3g}"
        result = "identical" if same else "different"
        if not deterministic:
            detail += " (time-budgeted: not required to be identical)"
        elif not same:
            all_ok = False
        echo(f"{stage:<14} {result:<11} {detail}")
    for stage in (s for s in meta["stages"] if s not in stages):
        echo(f"{stage:<14} {'-':<11} not re-run (--quick {quick_steps})")
    if not quick_steps:
        mine = read_json(stage_dir(cfg, "03_pretrain") / MANIFEST).get("final_eval", {})
        theirs = meta.get("final") or {}
        for k in ("val_loss", "val_ppl", "val_bpb"):
            echo(f"{k:<14} submitted {theirs.get(k, float('nan')):.6g}   re-run {mine.get(k, float('nan')):.6g}")
    echo("verify: " + ("OK, every deterministic stage is identical" if all_ok else "DIFFERENT (see above)"))
    return all_ok
