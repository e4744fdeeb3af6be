"""Stage 05: check a model without downloading or reading its weights: what it is, what it needs, how much
memory and disk it takes, and whether it runs on this machine (CPU/GPU, per dtype; LoRA/full training).

    python 05_check.py --config config/default.yaml          # this pipeline's export -> artifacts/05_check/<hash>/
    python 05_check.py path/to/hf_model_dir                   # a local Hugging Face model folder
    python 05_check.py ~/models/SmolLM2-135M-Instruct.Q4_1.gguf
    python 05_check.py HuggingFaceTB/SmolLM2-135M-Instruct    # hub id: metadata only (network; HF_TOKEN if gated)
    python 05_check.py some/model --set check.seq_len=4096 --set check.train_seq_len=1024 --out /tmp/report

Prints the report and saves report.txt + report.json (06_install.py reads the JSON). A model named on the
command line is reported to <artifacts>/05_check/models/<name>/ unless --out says otherwise.
"""

from lib.check import run_check
from lib.cli import stage_main


def _args(parser):
    parser.add_argument("model", nargs="?", default=None,
                        help="model directory, .gguf file or hub id owner/name (default: this pipeline's export)")
    parser.add_argument("--out", default=None, help="directory for report.txt/report.json of a named model")


def _run(cfg, args):
    run_check(cfg, args.model, args.out)
    return 0


def main(argv=None) -> int:
    return stage_main(__doc__.split("\n\n")[0], _run, argv, add_args=_args)


if __name__ == "__main__":
    raise SystemExit(main())
