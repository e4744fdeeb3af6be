"""Stage 01: prepare the text corpus — read the configured sources, clean, deduplicate, split into train/val shards.

    python 01_prepare_data.py --config config/smoke.yaml
    python 01_prepare_data.py --config config/default.yaml
    python 01_prepare_data.py --config config/default.yaml --set data.val_fraction=0.05 --force

Writes artifacts/01_data/<hash>/ (train-*.jsonl, val-*.jsonl, stats.json, manifest.json) and prints its path.
An already complete directory is left as it is unless --force is given.
"""

from lib.cli import stage_main
from lib.data.prepare import run_data


def main(argv: list[str] | None = None) -> int:
    def add_args(p):
        p.add_argument("--force", action="store_true", help="rebuild even if the artifact directory is complete")

    def run(cfg, args):
        print(run_data(cfg, force=args.force))
        return 0

    return stage_main(__doc__, run, argv, add_args)


if __name__ == "__main__":
    raise SystemExit(main())
