"""Stage 04_prefs — phase-3 preference tuning (DPO or ORPO, full or LoRA) of the phase-2 model.

    python 04_prefs.py --config config/default.yaml                   # the demo: self-play pairs, ~3 minutes
    python 04_prefs.py --config config/default.yaml --set prefs.method=orpo
    python 04_prefs.py --config my.yaml --set prefs.data='[{type: files, path: data/pairs.jsonl}]'

Data: prefs.data lists the sources: `self_play` (the default, offline: each SFT reply chosen over the phase-2
model's own sampled reply), or files / hub datasets of {prompt, chosen, rejected}, HH-RLHF dialogs or UltraFeedback
records, detected by themselves. `prefs.enabled: false` switches the phase off (the export then takes phase 2).
Interrupt it any time: rerunning the same command resumes from the last checkpoint. The tuned model goes to
artifacts/04_prefs/<hash>/, with the held-out reward accuracy and the replies before and after in its manifest.
"""

from lib.cli import stage_main


def run(cfg, args) -> int:
    from lib.train.prefs import run_prefs

    run_prefs(cfg, force=args.force)
    return 0


def add_args(parser):
    parser.add_argument("--force", action="store_true", help="redo the stage even if its directory is complete")


def main(argv=None) -> int:
    return stage_main(__doc__, run, argv, add_args)


if __name__ == "__main__":
    raise SystemExit(main())
