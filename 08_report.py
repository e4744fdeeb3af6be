"""Stage 08: the run's report card, and the submission bundle a teacher can verify.

    python 08_report.py --config config/default.yaml      # -> artifacts/08_report/<hash>/report.html
    snakemake --cores all report                          # the same, as part of the pipeline (also in `all`)
    python 08_report.py bundle [--out submission.tar.gz]  # configs, report, model, tokenizer, weights, SHA256SUMS
    python 08_report.py verify submission.tar.gz [--quick [N]] [--workdir DIR]   # re-run and compare, stage by stage

The report card is one self-contained HTML page (plots embedded) plus Markdown, PNGs and report.json: machine and
software, every stage's hash, wall time and peak RSS, data and tokenizer statistics, the model, both training
phases' curves, final val loss / perplexity / bits per byte, perplexity of your sentences, samples at temperatures
0.3 / 0.8 / 1.5, the SFT end-of-turn rate, the export checks, 05_check's verdict and the coursework rules
(sentences and prompts: the `report:` section of the config). `verify` exits 0 only when every deterministic
stage re-runs identically.
"""

import tempfile

from lib.cli import config_files, stage_main
from lib.errors import UserError
from lib.report.bundle import QUICK_STEPS, make_bundle, verify_bundle


def _args(parser):
    parser.add_argument("command", nargs="?", default="report", choices=["report", "bundle", "verify"])
    parser.add_argument("bundle_file", nargs="?", default=None, help="verify: the submission archive")
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
    from lib.report.card import run_report

    run_report(cfg)
    return 0


def main(argv=None) -> int:
    return stage_main(__doc__.split("\n\n")[0], _run, argv, add_args=_args)


if __name__ == "__main__":
    raise SystemExit(main())
