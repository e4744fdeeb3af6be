"""The 06_install.py commands: install (a model, or this pipeline's export as its 06_install stage), list, info,
remove, config (the models dir), and how their results are printed.
"""


from __future__ import annotations

import sys
from pathlib import Path

from lib.artifacts import read_json, require_stage, stage_output
from lib.check import (
    default_report_dir,
    fmt_bytes,
)
from lib.cli import config_files
from lib.config import Config, InstallConfig, to_dict
from lib.errors import UserError
from lib.models_dir import (
    INFO,
    SUMS,
    adapters_of,
    list_installed,
    models_dir_and_origin,
    models_dir_for,
    remove_installed,
    resolve_installed,
    set_models_dir,
    settings_path,
    verify_install,
)
from lib.names import run_model_name
from lib.stages import stage_dir


def pipeline_install_name(cfg: Config, config_file: str | Path) -> str:
    """The name the pipeline's model is installed under (lib.names.run_model_name)."""
    return run_model_name(cfg.export.name, Path(config_file).stem, cfg.install.name)


def _pipeline_ref(cfg: Config) -> tuple[str, Path]:
    """The pipeline's export dir and where 05_check put its report."""
    export = require_stage(cfg, "04_export", "Run the export stage first (snakemake export), or name a model: "
                                             "06_install.py install PATH|FILE.gguf|owner/name")
    return str(export), stage_dir(cfg, "05_check") / "report.json"


def format_list(entries: list[dict], models_dir: Path) -> str:
    if not entries:
        return f"no models installed in {models_dir}"
    lines = [f"{'name':<32} {'size':>10} {'type':<11} {'engine':<22} {'weights':<14} {'installed':<17} from"]
    for e in entries:
        when = str(e["installed_at"] or "")[:16].replace("T", " ")
        lines.append(f"{e['name']:<32} {fmt_bytes(e['size_bytes']):>10} {str(e.get('kind') or e['task']):<11} "
                     f"{str(e.get('engine') or '-'):<22} {str(e.get('weights') or '-'):<14} {when:<17} "
                     f"{describe_origin(e.get('origin'), e['source'])}"
                     + (f" [adapters: {', '.join(e['adapters'])}]" if e.get("adapters") else ""))
    return "\n".join(lines)


def describe_origin(origin: str | None, source: str | None) -> str:
    """Where an install came from, as a user says it: this pipeline's run by its config's name (the export folder as
    a detail), else the path or hub id it was installed from."""
    if origin and origin.startswith("pipeline config "):
        names = [Path(f).stem for f in origin[len("pipeline config "):].split(" + ")]
        folder = "/".join(Path(source).parts[-2:]) if source else ""
        return f"pipeline run {' + '.join(names)!r}" + (f" ({folder})" if folder else "")
    return str(source)


def format_info(folder: Path) -> str:
    info = read_json(folder / INFO)
    try:
        verified = f"ok ({verify_install(folder)['files']} files match {SUMS})"
    except UserError as e:
        verified = f"FAILED: {e}"
    caps = info.get("capabilities", {})
    pt = info.get("post_test") or {}
    lines = [f"name          {info['name']}", f"path          {folder}",
             f"source        {info['source'].get('ref')} ({info['source'].get('kind')})",
             f"type          {info.get('kind') or info['task']}: {info['task']} ({info['family']}, "
             f"{info['architecture']})",
             f"endpoints     {', '.join(info.get('endpoints') or []) or '-'}",
             f"parameters    {info['params']:,}", f"size          {fmt_bytes(info['size_bytes'])}",
             f"installed     {info['installed_at']} (installer {info['installer_version']})",
             f"context       {caps.get('context_length')}; chat template: {caps.get('chat_template')}",
             f"recommended   {info.get('recommended')}",
             f"environment   {'venv ' + info['python'] if info.get('venv') else info.get('python')}",
             f"engine        {(info.get('check') or {}).get('verdict', {}).get('engine') or 'unknown'}",
             f"post-test     {('ok: ' + repr(pt.get('text'))) if pt.get('ok') else pt or 'skipped'}",
             f"gguf          {', '.join(info.get('gguf_files') or []) or 'none'}",
             f"adapters      {', '.join(adapters_of(folder)) or 'none'} (train.sh DATA --name NAME; "
             "start.sh --adapter NAME)",
             f"verify        {verified}",
             f"start         {folder / 'start.sh'}"]
    return "\n".join(lines)


def run_install(cfg: Config, args) -> int:
    """Dispatch one 06_install.py command (install, list, info, remove, config)."""
    models_dir = models_dir_for(cfg.install, args.models_dir)
    if args.command == "config":
        if args.target:
            p = set_models_dir(args.target)
            print(f"models dir set to {p} (saved in {settings_path()})")
        else:
            where, origin = models_dir_and_origin(cfg.install, args.models_dir)
            print(f"models dir: {Path(where).expanduser()} ({origin})\nsettings file: {settings_path()}")
        return 0
    if args.command == "list":
        print(format_list(list_installed(models_dir), models_dir))
        return 0
    if args.command == "train":
        if not (args.target and args.data):
            raise UserError("06_install.py train NAME DATA: expected an installed model and the data to fine-tune on "
                            "(an install's train.sh passes its own folder)")
        from lib.install.finetune import finetune_install  # the training stack: only `train` needs it

        finetune_install(resolve_installed(args.target, models_dir), args.data, args.name,
                         tensorboard=args.tensorboard)
        return 0
    if args.command in ("info", "remove"):
        if not args.target:
            raise UserError(f"06_install.py {args.command}: expected the name of an installed model")
        folder = resolve_installed(args.target, models_dir)
        if args.command == "info":
            print(format_info(folder))
            return 0
        if not (args.yes or args.force):
            if not sys.stdin.isatty():
                raise UserError(f"06_install.py remove {args.target}: would delete {folder}; confirm with --yes "
                                "(there is no terminal to ask on)")
            size = fmt_bytes((read_json(folder / INFO) if (folder / INFO).is_file() else {}).get("size_bytes"))
            if input(f"remove {folder} ({size})? [y/N] ").strip().lower() not in ("y", "yes"):
                print("not removed")
                return 1
        done = remove_installed(args.target, models_dir)
        print(f"removed {folder} (freed {fmt_bytes(done['freed_bytes'])})")
        for env in done["environments"]:
            print(f"removed the shared environment {env}: no install uses it any more")
        return 0
    # install (the installer, with 05_check and the conversions, is imported only here: list, info, remove and
    # config answer without it, at once)
    from lib.install.installer import install_model, pipeline_origin

    name = args.name or cfg.install.name
    origin = None
    if args.target:
        ref, report_path = args.target, default_report_dir(cfg.artifacts_dir, args.target) / "report.json"
    else:  # the pipeline's own export: named after the config, an update of what the same config installed
        ref, report_path = _pipeline_ref(cfg)
        name = name or pipeline_install_name(cfg, config_files(args)[-1])
        origin = pipeline_origin(config_files(args))
    icfg = InstallConfig(**{**to_dict(cfg.install), "force": args.force or cfg.install.force,
                            "venv": args.venv or cfg.install.venv,
                            "post_test": cfg.install.post_test and not args.no_test,
                            "quantize": args.quantize or cfg.install.quantize,
                            "trust_remote_code": args.trust_remote_code or cfg.install.trust_remote_code})

    def ask(question: str) -> bool:
        return sys.stdin.isatty() and input(f"{question} [y/N] ").strip().lower() in ("y", "yes")

    folder = install_model(ref, models_dir, name=name, force=icfg.force, venv=icfg.venv, cfg=icfg,
                           check_cfg=cfg.check, serve_cfg=cfg.serve, report_path=report_path, ask=ask,
                           origin=origin, update=origin is not None)
    if origin is not None:  # the pipeline's receipt (Snakemake's output): never a file inside the models dir
        with stage_output(cfg, "06_install") as (_out, extra):
            extra.update({"installed": str(folder), "name": folder.name, "origin": origin})
    print(f"\ninstalled: {folder}\nstart it:  {folder / 'start.sh'}")
    return 0
