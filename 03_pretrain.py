"""Stage 03 — phase-1 pretraining of our HomeLLM from random weights on the encoded corpus.

    python 03_pretrain.py --config config/default.yaml                 # the demo: ~8 minutes on a laptop CPU
    python 03_pretrain.py --config config/smoke.yaml --set pretrain.max_steps=50
    accelerate launch --num_processes 2 03_pretrain.py --config ...     # DDP (CPU gloo or GPUs)
    accelerate launch --config_file config/accelerate/deepspeed_zero2.yaml 03_pretrain.py --config ...

Interrupt it any time (Ctrl+C, kill, even kill -9): rerunning the same command resumes from the last checkpoint.
The model goes to artifacts/03_pretrain/<hash>/ as an HF-format directory (config.json + model.safetensors).
"""

from lib.cli import stage_main
from lib.train.pretrain import run_pretrain


def run(cfg, args) -> int:
    run_pretrain(cfg, force=args.force)
    return 0


def add_args(parser):
    parser.add_argument("--force", action="store_true", help="train again even if the artifact exists")


def main(argv=None) -> int:
    return stage_main(__doc__, run, argv, add_args)


if __name__ == "__main__":
    raise SystemExit(main())
