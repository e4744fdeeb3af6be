"""Stage 07 — serve a model: Gradio chat UI + OpenAI-compatible API in one process, or chat in the terminal.

    python 07_serve.py                                   # the latest pipeline model on http://127.0.0.1:7860/
                                                         # (no model yet: the studio opens, to train one)
    python 07_serve.py --model mymodel                   # an installed model (see 06_install.py)
    python 07_serve.py --model artifacts/04_sft/<hash>   # any model directory
    python 07_serve.py --studio                          # open on the training studio (Runs / Train / Data tabs)
    python 07_serve.py --cli                             # chat in the terminal (/reset, /system TEXT, /quit)
    python 07_serve.py --prompt "Tell me a joke"         # one answer on stdout, for scripts
    python 07_serve.py --host 0.0.0.0 --api-key SECRET   # reachable from the network, key required
    python 07_serve.py --set serve.temperature=0.2 --set serve.max_new_tokens=512

The API speaks OpenAI's protocol, so the official client works:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="unused-unless---api-key")
    client.chat.completions.create(model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Hi"}])
"""

from lib.cli import stage_main


def main(argv=None) -> int:
    from lib.app import add_serve_args, serve_command

    return stage_main(__doc__.splitlines()[0], serve_command, argv, add_serve_args, shows_config=lambda args: False)


if __name__ == "__main__":
    raise SystemExit(main())
