"""What every numbered script shares: `--config FILE`, `--set key=value` overrides, printing the resolved
config once, and turning a `UserError` into one clear paragraph with exit code 2 instead of a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lib import ROOT
from lib.config import Config, dump_yaml, load_config
from lib.errors import UserError

DEFAULT_CONFIG = "config/default.yaml"


def config_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", type=str, default=None,
                   help=f"YAML config file (default: {DEFAULT_CONFIG}); given several times, the files are merged in "
                        "order, later ones winning (as Snakemake merges --configfile)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value with a dotted key, e.g. --set tokenizer.vocab_size=4096 (repeatable)")
    p.add_argument("--quiet-config", action="store_true", help="do not print the resolved config")
    return p


def config_files(args: argparse.Namespace) -> list[str]:
    """The --config files given, or the default one (the checkout's, when run from another directory)."""
    if args.config:
        return args.config
    here = Path(DEFAULT_CONFIG)
    return [str(here if here.is_file() else ROOT / DEFAULT_CONFIG)]


def run_main(fn: Callable[[], int | None]) -> int:
    """Call fn; a UserError becomes `error: <message>` on stderr and exit code 2; Ctrl+C exit code 130."""
    try:
        return fn() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def stage_main(description: str, run: Callable[[Config, argparse.Namespace], int | None],
               argv: list[str] | None = None, add_args: Callable[[argparse.ArgumentParser], None] | None = None,
               shows_config: Callable[[argparse.Namespace], bool] = lambda args: True) -> int:
    """The body of every numbered script: parse args, load the config (and print it once, unless --quiet-config or
    `shows_config(args)` says this command has no use for it), run, and turn a UserError into one paragraph."""
    parser = config_parser(description)
    if add_args:
        add_args(parser)
    args = parser.parse_args(argv)

    def body():
        cfg = load_config(config_files(args), args.overrides)
        if not args.quiet_config and shows_config(args):
            print(f"# resolved config ({' + '.join(config_files(args))}"
                  f"{' + ' + ', '.join(args.overrides) if args.overrides else ''})")
            print(dump_yaml(cfg), flush=True)
        return run(cfg, args)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    return run_main(body)
