"""Stage 02: train the byte-level BPE tokenizer (or adopt a pretrained one), then encode the corpus into token ids.

    python 02_train_tokenizer.py --config config/default.yaml            # -> artifacts/02_tokenizer/<hash>/
    python 02_train_tokenizer.py --config config/default.yaml --encode   # -> artifacts/02_tokens/<hash>/
    python 02_train_tokenizer.py --config config/smoke.yaml --set tokenizer.vocab_size=1024
    python 02_train_tokenizer.py --config config/default.yaml --set tokenizer.pretrained=gpt2

Needs stage 01 (`python 01_prepare_data.py`) for the same config. The Snakefile runs this script twice, once
per stage (without and with --encode).
"""

from lib.cli import stage_main
from lib.data.tokenizer import run_tokenizer, run_tokens


def _args(parser):
    parser.add_argument("--encode", action="store_true",
                        help="encode the train/val splits into train.bin/val.bin (stage 02_tokens) instead of "
                             "training the tokenizer (stage 02_tokenizer)")
    parser.add_argument("--force", action="store_true", help="redo the stage even if its directory is complete")


def _run(cfg, args):
    stage = run_tokens if args.encode else run_tokenizer
    stage(cfg, force=args.force)
    return 0


def main(argv=None) -> int:
    return stage_main(__doc__.split("\n\n")[0], _run, argv, add_args=_args)


if __name__ == "__main__":
    raise SystemExit(main())
