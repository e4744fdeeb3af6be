"""Stage 08: the run's report card, and the submission bundle a teacher can verify.

    python 08_report.py --config config/default.yaml      # -> artifacts/08_report/<hash>/report.html
    snakemake --cores all report                          # the same, as part of the pipeline (also in `all`)
    python 08_report.py bundle [--out submission.tar.gz]  # configs, report, model, tokenizer, weights, SHA256SUMS
    python 08_report.py verify submission.tar.gz [--quick [N]] [--workdir DIR]   # re-run and compare, stage by stage
    python 08_report.py eval MODEL [--compare MODEL2 …] [--adapter DIR] [--tasks a,b] [--limit N]   # benchmarks

The report card is one self-contained HTML page (plots embedded) plus Markdown, PNGs and report.json: machine and
software, every stage's hash, wall time and peak RSS, data and tokenizer statistics, the model, both training
phases' curves, final val loss / perplexity / bits per byte, perplexity of your sentences, samples at temperatures
0.3 / 0.8 / 1.5, the SFT end-of-turn rate, the export checks, 05_check's verdict and the coursework rules
(sentences and prompts: the `report:` section of the config). `verify` exits 0 only when every deterministic
stage re-runs identically. `eval` scores any model — an installed name, an export or stage folder, an HF directory,
a GGUF file, a LoRA adapter on its base — with lm-evaluation-harness (the project's offline tasks in evals/, or
standard tasks when the hub is reachable), several side by side: a run against another, a quantization or an
adapter against its source.
"""

import tempfile
from pathlib import Path

from lib.cli import config_files, stage_main
from lib.errors import UserError
from lib.report.bundle import QUICK_STEPS, make_bundle, verify_bundle


def _args(parser):
    parser.add_argument("command", nargs="?", default="report", choices=["report", "bundle", "verify", "eval"])
    parser.add_argument("bundle_file", nargs="?", default=None, metavar="BUNDLE_OR_MODEL",
                        help="verify: the submission archive; eval: the model (installed name, folder, GGUF file)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="MODEL",
                        help="eval: more models scored on the same items, side by side")
    parser.add_argument("--adapter", default=None,
                        help="eval: a LoRA adapter folder; scores the model without and with it")
    parser.add_argument("--tasks", default=None,
                        help="eval: comma-separated tasks (default: report.eval_tasks of the config)")
    parser.add_argument("--limit", type=int, default=None, help="eval: items per task (default: all)")
    parser.add_argument("--json", default=None, help="eval: also write the scores to this JSON file")
    parser.add_argument("--out", default=None, help="bundle: where to write the archive")
    parser.add_argument("--quick", type=int, nargs="?", const=QUICK_STEPS, default=None, metavar="N",
                        help="verify: only the data, tokenizer and token stages and the first N steps of phase 1 "
                             f"(N = {QUICK_STEPS} when not given)")
    parser.add_argument("--workdir", default=None, help="verify: a new or empty directory for the re-run")


def _run(cfg, args):
    if args.command == "bundle":
        print(f"submission bundle: {make_bundle(cfg, config_files(args), args.out)}")
        return 0
    if args.command == "verify":
        if not args.bundle_file:
            raise UserError("08_report.py verify: expected the submission archive, e.g. verify submission.tar.gz")
        workdir = args.workdir or tempfile.mkdtemp(prefix="verify-", dir=".")
        return 0 if verify_bundle(args.bundle_file, workdir, args.quick) else 1
    if args.command == "eval":
        return _eval(cfg, args)
    from lib.report.card import run_report

    run_report(cfg)
    return 0


def _model_path(spec: str, cfg):
    """A GGUF file as it is; anything else as 07_serve resolves it (installed name, folder, pipeline id)."""
    from lib.serving.resolve import resolve_model

    p = Path(spec).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return p
    return resolve_model(spec, cfg).path


def _eval(cfg, args) -> int:
    from lib.atomic import atomic_write_json
    from lib.report.evaluate import compare, format_table

    if not args.bundle_file:
        raise UserError("08_report.py eval: expected a model, e.g. eval artifacts/04_export/<hash> or an installed name")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else cfg.report.eval_tasks
    if not tasks:
        raise UserError("08_report.py eval: no tasks (--tasks a,b or report.eval_tasks in the config)")
    models = [(args.bundle_file, _model_path(args.bundle_file, cfg), None)]
    if args.adapter:
        models.append((f"{args.bundle_file} + {args.adapter}", models[0][1], Path(args.adapter)))
    models += [(spec, _model_path(spec, cfg), None) for spec in args.compare]
    table = compare(models, tasks, args.limit, seed=cfg.seed)
    print(format_table(table))
    if args.json:
        atomic_write_json(args.json, table)
        print(f"scores: {args.json}")
    return 0


def main(argv=None) -> int:
    return stage_main(__doc__.split("\n\n")[0], _run, argv, add_args=_args)


if __name__ == "__main__":
    raise SystemExit(main())
