"""The Gradio chat UI (Blocks), mounted at / by lib.app next to the API.

Streaming replies, a system prompt, temperature / top-p / max-tokens, Stop, Regenerate, Clear, export and import
of the conversation as JSON, a token counter against the model's context, and a model picker over installed
models and pipeline outputs. Every reply goes through the same Engine as the API.

The handlers are plain functions of `ChatUI` so tests can call them without a browser; `build()` wires them.
Conversations are lists of {"role", "content": str} dicts (Gradio 6's Chatbot format, content normalised).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a home server

import gradio as gr  # noqa: E402

from lib.atomic import atomic_write_json  # noqa: E402
from lib.chat import ChatTemplateError, content_text, encode_chat  # noqa: E402
from lib.config import ServeConfig  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.serving.engine import Engine, EngineBusy  # noqa: E402
from lib.serving.resolve import ModelRef  # noqa: E402
from lib.serving.text import ContextTooLong, fit_conversation, sampling_params  # noqa: E402

EXPORT_FORMAT = "models-at-home-chat"
MAX_IMPORT_BYTES = 2 * 1024 * 1024
ROLES = ("system", "user", "assistant")


def _text(content) -> str:
    """Message content as text: Gradio 6 hands the Chatbot's messages over as lists of typed parts (files and
    images, which a text model cannot read, are left out)."""
    try:
        return content_text(content, other_parts="skip")
    except ValueError:
        return ""


def normalize(history) -> list[dict]:
    return [{"role": m["role"], "content": _text(m.get("content"))} for m in history or []
            if isinstance(m, dict) and m.get("role") in ROLES]


def parse_conversation(data) -> tuple[str, list[dict]]:
    """(system prompt, messages) from an exported file's JSON: our export format or a bare OpenAI message list."""
    messages = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(messages, list):
        raise ValueError('expected {"messages": [...]} or a list of {"role", "content"} messages')
    system = data.get("system", "") if isinstance(data, dict) else ""
    if not isinstance(system, str):
        raise ValueError('"system" must be a string')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}]: expected an object with role one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str) and not (isinstance(content, list) and all(isinstance(p, dict) for p in content)):
            raise ValueError(f"messages[{i}].content: expected a string")
        if m["role"] == "system":
            system = _text(content)
            continue
        out.append({"role": m["role"], "content": _text(content)})
    return system, out


class ChatUI:
    """The chat tab. engine=None (a server started without a model): the tab shows `no_model_note` and watches
    `default_model()`; when a model appears there (a run finished in the studio) `start(ref)` loads it for the
    whole server and the conversation view opens."""

    WATCH_SECONDS = 5.0

    def __init__(self, engine: Engine | None, serve: ServeConfig, list_models: Callable[[], list[ModelRef]],
                 start: Callable[[ModelRef], Engine] | None = None,
                 default_model: Callable[[], ModelRef | None] | None = None, no_model_note: str = ""):
        self.engine, self.serve, self.list_models = engine, serve, list_models
        self.start, self.default_model, self.no_model_note = start, default_model, no_model_note
        self._running: dict[str, object] = {}  # session -> the Handle of its reply in progress (for Stop)
        self._lock = threading.Lock()
        self._export_dir = Path(tempfile.mkdtemp(prefix="chat-export-"))  # Gradio serves files from temp dirs
        weakref.finalize(self, shutil.rmtree, self._export_dir, True)  # gone with the tab (or at exit)

    # -- helpers -------------------------------------------------------------------------------------------

    def _messages(self, system: str, history: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": system}] if system and system.strip() else []) + history

    def counter(self, history, system: str = "", draft: str = "", max_tokens: int | float | None = None) -> str:
        """'123 / 2048 tokens' of the conversation (+ the message being typed), and what is left for the reply."""
        if self.engine is None:
            return ""
        loaded = self.engine.loaded
        msgs = self._messages(system, normalize(history))
        if draft and draft.strip():
            msgs = msgs + [{"role": "user", "content": draft}]
        try:
            n = len(encode_chat(loaded.tokenizer, msgs)) if msgs else 0
        except ChatTemplateError as e:
            return f"**Context:** cannot be counted: {e}"
        ctx = loaded.context_length
        left = max(0, ctx - n)
        warn = " — older turns will be dropped" if max_tokens and left < int(max_tokens) else ""
        return f"**Context:** {n:,} / {ctx:,} tokens ({100 * n / ctx:.0f}%), {left:,} left for the reply{warn}"

    # -- chat ----------------------------------------------------------------------------------------------

    def add_user(self, message: str, history):
        """Move the typed message into the conversation (the reply comes from `reply`)."""
        history = normalize(history)
        if not message or not message.strip():
            return message, history
        return "", history + [{"role": "user", "content": message}]

    def reply(self, history, system: str, temperature: float, top_p: float, max_tokens: float,
              request: gr.Request | None = None):
        """Stream the assistant's answer to the last user message: yields (history, counter) as text arrives."""
        history = normalize(history)
        if not history or history[-1]["role"] != "user":
            yield history, self.counter(history, system)
            return
        loaded = self.engine.loaded
        max_new = max(1, int(max_tokens or self.serve.max_new_tokens))
        try:
            ids, dropped = fit_conversation(loaded.tokenizer, self._messages(system, history), loaded.context_length,
                                            reserve=min(max_new, loaded.context_length // 2))
        except ContextTooLong as e:
            raise gr.Error(f"This message is too long for the model: {e}") from None
        except ChatTemplateError as e:
            raise gr.Error(str(e)) from None
        if dropped:
            gr.Info(f"The conversation is longer than the model's context; the oldest {dropped} message(s) are "
                    f"not shown to the model any more.")
        params = sampling_params(temperature, top_p, max_new)
        try:
            handle = self.engine.submit(ids, params, loaded=loaded)
        except EngineBusy as e:
            raise gr.Error(f"The server is busy ({e}).") from None
        session = getattr(request, "session_hash", None) or f"anon-{id(handle)}"
        with self._lock:
            self._running[session] = handle
        answer = {"role": "assistant", "content": ""}
        history = history + [answer]
        try:
            for kind, value in handle:
                if kind == "text":
                    answer["content"] += value
                    yield history, self.counter(history[:-1], system)
                elif kind == "error":
                    raise gr.Error(value)
            yield history, self.counter(history, system)
        finally:
            handle.cancel()  # a no-op when finished; stops the engine when Gradio abandons this generator
            with self._lock:
                if self._running.get(session) is handle:
                    del self._running[session]

    def stop(self, request: gr.Request | None = None) -> None:
        session = getattr(request, "session_hash", None)
        with self._lock:
            handle = self._running.get(session)
        if handle is not None:
            handle.cancel()

    @staticmethod
    def drop_last_reply(history):
        """For Regenerate: the conversation up to and including the last user message."""
        history = normalize(history)
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        return history

    # -- export / import -----------------------------------------------------------------------------------

    def export(self, history, system: str) -> str:
        path = self._export_dir / f"chat-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.json"
        atomic_write_json(path, {"format": EXPORT_FORMAT, "version": 1, "model": self.engine.loaded.name,
                                 "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "system": system or "",
                                 "messages": normalize(history)})
        return str(path)

    def import_(self, file_path: str | None):
        if not file_path:
            raise gr.Error("No file was uploaded.")
        path = Path(file_path)
        if path.stat().st_size > MAX_IMPORT_BYTES:
            raise gr.Error(f"{path.name}: too large to be a conversation (limit {MAX_IMPORT_BYTES // 1024} KiB).")
        try:
            system, history = parse_conversation(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError) as e:
            raise gr.Error(f"{path.name}: not a conversation export ({e}).") from None
        return history, system

    # -- models --------------------------------------------------------------------------------------------

    def model_choices(self) -> list[tuple[str, str]]:
        refs = self.list_models()
        if self.engine is None:
            return [(r.label, r.id) for r in refs]
        current = self.engine.loaded.ref
        if all(r.id != current.id for r in refs):
            refs = [current] + refs
        return [(r.label, r.id) for r in refs]

    def watch(self, ref: ModelRef | None = None):
        """With no model yet: load `ref`, else the default model once there is one (the timer and each page load
        ask). Returns the updates of (note, chat view, picker, status, max tokens, counter, timer, first picker)."""
        if self.engine is None:
            if ref is None and self.default_model is not None and self.start is not None:
                ref = self.default_model()
            if ref is None or self.start is None:
                return (gr.update(),) * 6 + (gr.Timer(active=self.start is not None),
                                             gr.update(choices=self.model_choices()))
            try:
                self.engine = self.start(ref)
            except UserError as e:
                raise gr.Error(f"{ref.label}: cannot be loaded ({e})") from None
        ctx = self.engine.loaded.context_length
        return (gr.update(visible=False), gr.update(visible=True),
                gr.update(choices=self.model_choices(), value=self.engine.loaded.id), self.model_status(),
                gr.update(maximum=ctx, value=min(self.serve.max_new_tokens, ctx)), self.counter([], ""),
                gr.Timer(active=False), gr.update(visible=False))

    def load_first(self, model_id: str | None):
        """With no model yet: load the one picked from the list of installed models and pipeline outputs."""
        if not model_id:
            return self.watch()
        ref = next((r for r in self.list_models() if r.id == model_id), None)
        if ref is None:
            raise gr.Error(f"{model_id}: not in the list of installed models and pipeline outputs any more.")
        return self.watch(ref)

    def switch_model(self, model_id: str):
        """Load the picked model (only ids from the picker's list: the UI never opens arbitrary paths)."""
        if self.engine is None:
            return self.model_status(), gr.update()
        if model_id == self.engine.loaded.id:
            return self.model_status(), gr.update()
        ref = next((r for r in self.list_models() if r.id == model_id), None)
        if ref is None:
            raise gr.Error(f"{model_id}: not in the list of installed models and pipeline outputs any more.")
        try:
            loaded = self.engine.load(ref)
        except UserError as e:
            raise gr.Error(str(e)) from None
        ctx = loaded.context_length
        return self.model_status(), gr.update(maximum=ctx, value=min(self.serve.max_new_tokens, ctx))

    def model_status(self) -> str:
        if self.engine is None:
            return "No model loaded"
        d = self.engine.loaded.describe()
        return (f"**{d['id']}** ({d['source']}) — {d['parameters'] / 1e6:.1f}M parameters, "
                f"context {d['context_length']:,} tokens, {d['device']}/{d['dtype']}")

    # -- layout --------------------------------------------------------------------------------------------

    def build(self, demo: gr.Blocks) -> None:
        """The chat tab's components, inside the caller's gr.Blocks."""
        waiting = self.engine is None
        ctx = self.serve.max_context if waiting else self.engine.loaded.context_length
        note = gr.Markdown(self.no_model_note, elem_id="no-model", visible=waiting)
        # with no model yet, what is there already (installed models, earlier runs) can be loaded from here
        first = gr.Dropdown(self.model_choices() if waiting else [], value=None, label="…or load a model",
                            elem_id="first-model-picker", visible=waiting and self.start is not None)
        with gr.Row(visible=not waiting) as view:
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=480, elem_id="chatbot", buttons=["copy"],
                                     feedback_options=None)
                msg = gr.Textbox(placeholder="Type a message and press Enter (Shift+Enter for a new line)",
                                 show_label=False, lines=1, max_lines=8, elem_id="chat-input", autofocus=True)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send-btn")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop-btn")
                    regen = gr.Button("Regenerate", elem_id="regen-btn")
                    clear = gr.Button("Clear", elem_id="clear-btn")
                counter = gr.Markdown(self.counter([], ""), elem_id="token-counter")
            with gr.Column(scale=1):
                model = gr.Dropdown(self.model_choices(), value=None if waiting else self.engine.loaded.id,
                                    label="Model",
                                    elem_id="model-picker")
                status = gr.Markdown(self.model_status(), elem_id="model-status")
                system = gr.Textbox(label="System prompt", lines=3, placeholder="e.g. You are a helpful assistant.",
                                    elem_id="system-prompt")
                temperature = gr.Slider(0.0, max(2.0, self.serve.temperature), value=self.serve.temperature,
                                        step=0.05, label="Temperature", info="0 = always the most likely token")
                top_p = gr.Slider(0.05, 1.0, value=max(0.05, self.serve.top_p), step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, ctx, value=min(self.serve.max_new_tokens, ctx), step=1,
                                       label="Max new tokens")
                with gr.Accordion("Save / load conversation", open=False):
                    export_btn = gr.Button("Export as JSON", elem_id="export-btn")
                    export_file = gr.File(label="Exported conversation", interactive=False, elem_id="export-file")
                    import_btn = gr.UploadButton("Import JSON", file_types=[".json"], elem_id="import-btn")

        sampling = [system, temperature, top_p, max_tokens]
        submit_events = []
        for trigger in (msg.submit, send.click):
            ev = trigger(self.add_user, [msg, chatbot], [msg, chatbot], queue=False).then(
                self.reply, [chatbot, *sampling], [chatbot, counter])
            submit_events.append(ev)
        regen_ev = regen.click(self.drop_last_reply, chatbot, chatbot, queue=False).then(
            self.reply, [chatbot, *sampling], [chatbot, counter])
        stop.click(self.stop, None, None, cancels=[*submit_events, regen_ev], queue=False)
        clear.click(lambda s: ([], self.counter([], s)), system, [chatbot, counter], queue=False)
        # .input fires on typing only: a .change would also fire when add_user empties the box, and its late
        # answer could overwrite the count that the reply has just updated.
        for comp in (msg, system):
            comp.input(self.counter, [chatbot, system, msg, max_tokens], counter, queue=False,
                       trigger_mode="always_last", show_progress="hidden")
        export_btn.click(self.export, [chatbot, system], export_file)
        import_btn.upload(self.import_, import_btn, [chatbot, system]).then(
            self.counter, [chatbot, system], counter)
        model.change(self.switch_model, model, [status, max_tokens]).then(
            self.counter, [chatbot, system], counter)
        if waiting:
            timer = gr.Timer(self.WATCH_SECONDS, active=self.start is not None)
            outputs = [note, view, model, status, max_tokens, counter, timer, first]
            timer.tick(self.watch, None, outputs, show_progress="hidden")
            demo.load(self.watch, None, outputs, show_progress="hidden")
            first.input(self.load_first, first, outputs)
        else:
            demo.load(lambda: gr.update(choices=self.model_choices(), value=self.engine.loaded.id), None, model)


def build_ui(engine: Engine | None, serve: ServeConfig, list_models: Callable[[], list[ModelRef]],
             studio=None, open_tab: str = "chat", no_model_note: str = "",
             start: Callable[[ModelRef], Engine] | None = None,
             default_model: Callable[[], ModelRef | None] | None = None) -> gr.Blocks:
    """The app's page: the Chat tab (with no model, a note saying how to get one, until one is loaded) and the
    studio's tabs."""
    with gr.Blocks(title="Models at Home", analytics_enabled=False) as demo:
        gr.Markdown("## Models at Home")
        with gr.Tabs(selected=open_tab if studio is not None else "chat"):
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                ChatUI(engine, serve, list_models, start, default_model, no_model_note).build(demo)
            if studio is not None:
                studio.build(demo)
    # Several browser tabs may chat at once; the engine interleaves their replies.
    demo.queue(default_concurrency_limit=max(2, engine.max_active * 2 if engine is not None else 2))
    return demo
