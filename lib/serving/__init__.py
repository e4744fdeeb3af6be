"""Serving a model: the engine that owns it (engine), which model to serve (resolve), the OpenAI-compatible API
(api), the Gradio chat UI (ui), the terminal chat (chat_cli) and the process that ties them together (server).

    python 07_serve.py                       # the latest pipeline model, UI + API on http://127.0.0.1:7860/
    python 07_serve.py --model mymodel --cli # chat in the terminal with an installed model

Not here: the sampling maths and the KV cache (lib.model.generate), the model itself (lib.model.homellm).
"""
