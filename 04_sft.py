"""Stage 04 — phase-2 instruction tuning (full or LoRA) of the phase-1 model, and (--export) the export stage.

    python 04_sft.py --config config/default.yaml                   # the demo: ~4 minutes on a laptop CPU
    python 04_sft.py --config config/default.yaml --export          # -> HF dir, GGUF f16 + q8_0, Ollama Modelfile
    python 04_sft.py --config config/smoke.yaml --set sft.lora.enabled=true
    python 04_sft.py --config my.yaml --set sft.base_model=path/to/SmolLM2-135M-Instruct --set sft.lora.enabled=true

Data: sft.data lists the sources (the embedded chitchat dialogs by default, or files / hub datasets in Alpaca,
ShareGPT, OpenAI chat, prompt/completion, question/answer, SQuAD, dialog or plain-text form — detected by itself).
Interrupt it any time: rerunning the same command resumes from the last checkpoint. The tuned model goes to
artifacts/04_sft/<hash>/, the export to artifacts/04_export/<hash>/.
"""

from lib.cli import stage_main


def run(cfg, args) -> int:
    if args.export:
        from lib.export.exporter import run_export

        run_export(cfg, force=args.force)
    else:
        from lib.train.sft import run_sft

        run_sft(cfg, force=args.force)
    return 0


def add_args(parser):
    parser.add_argument("--export", action="store_true",
                        help="run the export stage (04_export) on the tuned model instead of training it")
    parser.add_argument("--force", action="store_true", help="redo the stage even if its directory is complete")


def main(argv=None) -> int:
    return stage_main(__doc__, run, argv, add_args)


if __name__ == "__main__":
    raise SystemExit(main())
