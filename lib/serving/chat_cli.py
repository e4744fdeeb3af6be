"""Chat in the terminal: a REPL with streamed replies and history, and a one-shot mode for scripts.

    python 07_serve.py --cli                       # you> …   bot> …   (/reset, /system TEXT, /quit, /help)
    python 07_serve.py --prompt "Hi there"         # prints only the reply on stdout

Both go through the same Engine as the server. Ctrl+C during a reply stops it and keeps what was written.
"""

from __future__ import annotations

import sys
from typing import TextIO

from lib.chat import ChatTemplateError
from lib.config import ServeConfig
from lib.serving.engine import Engine
from lib.serving.text import ContextTooLong, fit_conversation, sampling_params

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone removes it)
  /quit           leave (also /exit or Ctrl+D)
  /help           this list"""


def _params(serve: ServeConfig, seed: int | None):
    return sampling_params(serve.temperature, serve.top_p, serve.max_new_tokens, seed=seed)


def _stream_reply(engine: Engine, messages: list[dict], serve: ServeConfig, seed: int | None, out: TextIO,
                  err: TextIO) -> tuple[str, str]:
    """Generate and print a reply as it arrives; returns (text, finish_reason). Ctrl+C cancels it."""
    loaded = engine.loaded
    params = _params(serve, seed)
    ids, dropped = fit_conversation(loaded.tokenizer, messages, loaded.context_length,
                                    reserve=min(params.max_new_tokens, loaded.context_length // 2))
    if dropped:
        print(f"[the conversation is longer than the context: the oldest {dropped} message(s) are no longer seen]",
              file=err, flush=True)
    handle = engine.submit(ids, params)
    try:
        for kind, value in handle:
            if kind == "text":
                out.write(value)
                out.flush()
            elif kind == "error":
                print(f"\n[error: {value}]", file=err, flush=True)
    except KeyboardInterrupt:
        handle.cancel()
        for _ in handle:  # wait for the engine to acknowledge, so the next turn starts clean
            pass
        print(" [stopped]", file=err, end="", flush=True)
    return handle.text, handle.finish_reason or "cancelled"


def one_shot(engine: Engine, prompt: str, serve: ServeConfig, system: str | None = None, seed: int | None = None,
             out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Answer one prompt (a single user turn) on `out`; for scripts and pipes."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        _stream_reply(engine, messages, serve, seed, out, err)
    except (ContextTooLong, ChatTemplateError) as e:
        print(f"error: --prompt: {e}", file=err)
        return 2
    out.write("\n")
    out.flush()
    return 0


def repl(engine: Engine, serve: ServeConfig, system: str | None = None, seed: int | None = None,
         inp: TextIO = sys.stdin, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The interactive chat loop; reads lines from `inp` until /quit or end of input."""
    if inp.isatty():
        try:
            import readline  # noqa: F401  (line editing and ↑ history for input())
        except ImportError:
            pass
    loaded = engine.loaded
    print(f"chatting with {loaded.name} (context {loaded.context_length} tokens). /help for commands, /quit to leave.",
          file=out, flush=True)
    history: list[dict] = []
    while True:
        out.write("you> ")
        out.flush()
        try:
            line = inp.readline()
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        if not line:  # end of input (Ctrl+D or a closed pipe)
            out.write("\n")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            cmd, _, arg = text.strip().partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                history = []
                print("[conversation cleared]", file=out, flush=True)
            elif cmd == "/system":
                system = arg.strip() or None
                print(f"[system prompt {'set' if system else 'removed'}]", file=out, flush=True)
            elif cmd == "/help":
                print(HELP, file=out, flush=True)
            else:
                print(f"[unknown command {cmd}; /help lists them]", file=out, flush=True)
            continue
        history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        out.write("bot> ")
        out.flush()
        try:
            reply, _ = _stream_reply(engine, messages, serve, seed, out, err)
        except (ContextTooLong, ChatTemplateError) as e:
            history.pop()
            print(f"[not sent: {e}]", file=out, flush=True)
            continue
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": reply})
