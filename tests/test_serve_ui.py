"""The Gradio chat UI: its handlers called directly (streaming, stop, regenerate, export/import, model picker) and
the real page in Debian's headless chromium driven by Playwright (type, see a reply appear, screenshot)."""

import json
import re
import time
import types

import gradio as gr
import pytest
from conftest import CHROMIUM_ARGS

from lib.app import build_app
from lib.chat import encode_chat
from lib.config import Config, ServeConfig
from lib.serving.engine import Engine
from lib.serving.loading import load_model
from lib.serving.resolve import resolve_model
from lib.serving.server import BackgroundServer
from lib.serving.ui import EXPORT_FORMAT, ChatUI, normalize


@pytest.fixture(scope="module")
def refs(tiny_chat_model_talkative, tiny_chat_model):
    return [resolve_model(str(tiny_chat_model_talkative), Config()), resolve_model(str(tiny_chat_model), Config())]


@pytest.fixture(scope="module")
def engine(refs):
    engine = Engine(load_model(refs[0], "cpu"))
    yield engine
    engine.close()


@pytest.fixture
def ui(engine, refs):
    return ChatUI(engine, ServeConfig(max_new_tokens=12), list_models=lambda: refs)


def session(name: str):
    """What Gradio passes as `request`: only the session id is used (to find the reply that Stop should end)."""
    return types.SimpleNamespace(session_hash=name)


def test_reply_streams_into_the_conversation(ui):
    msg, history = ui.add_user("Hello there", [])
    assert msg == "" and history == [{"role": "user", "content": "Hello there"}]
    states = [[dict(m) for m in h] for h, _ in ui.reply(history, "Be brief.", 0.7, 0.9, 12, session("a"))]
    replies = [h[-1]["content"] for h in states]
    assert len(states) > 2 and all(h[-1]["role"] == "assistant" for h in states)
    assert all(replies[i + 1].startswith(replies[i]) for i in range(len(replies) - 1))  # it grows piece by piece
    assert replies[-1].strip()
    counter = list(ui.reply(history, "", 0.7, 0.9, 3, session("a")))[-1][1]
    assert re.search(r"\*\*Context:\*\* \d+ / 1,024 tokens", counter)
    # an empty message is not sent
    assert ui.add_user("   ", history) == ("   ", history)


def test_gradio_message_parts_are_read_as_text(ui):
    gradio_history = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}],
                       "metadata": None, "options": None}]
    assert normalize(gradio_history) == [{"role": "user", "content": "Hi you"}]


def test_stop_and_abandoning_the_generator_cancel_the_generation(ui, engine):
    history = [{"role": "user", "content": "Talk to me"}]
    gen = ui.reply(history, "", 0.7, 0.9, 900, session("stopper"))
    next(gen)
    ui.stop(session("stopper"))
    final = list(gen)[-1][0]
    assert 0 < len(final[-1]["content"]) and engine.pending()["active"] == 0

    cancelled = engine.metrics.snapshot()["counters"].get("generations_cancelled", 0)
    gen = ui.reply(history, "", 0.7, 0.9, 900, session("leaver"))
    next(gen)
    gen.close()  # what happens when Gradio drops the event (Stop button's cancels=, closed tab)
    for _ in range(200):
        if engine.metrics.snapshot()["counters"].get("generations_cancelled", 0) > cancelled:
            break
        time.sleep(0.05)
    assert engine.metrics.snapshot()["counters"]["generations_cancelled"] == cancelled + 1


def test_regenerate_drops_the_last_reply(ui):
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
               {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert ui.drop_last_reply(history) == history[:3]
    assert ui.drop_last_reply(history[:3]) == history[:3]


def test_export_then_import_round_trips(ui, tmp_path):
    history = [{"role": "user", "content": "Hi 🙂"}, {"role": "assistant", "content": "Hello\nthere"}]
    path = ui.export(history, "Be kind.")
    data = json.loads(open(path, encoding="utf-8").read())
    assert data["format"] == EXPORT_FORMAT and data["model"] == ui.engine.loaded.id
    assert ui.import_(path) == (history, "Be kind.")

    openai_style = tmp_path / "openai.json"
    openai_style.write_text(json.dumps([{"role": "system", "content": "S"}, *history]))
    assert ui.import_(str(openai_style)) == (history, "S")
    for bad in ('{"messages": [{"role": "robot", "content": "x"}]}', "[1, 2]", "not json", '{"messages": 5}'):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(gr.Error):
            ui.import_(str(tmp_path / "bad.json"))


def test_model_picker_lists_and_switches_models(ui, engine, refs):
    assert [value for _, value in ui.model_choices()] == [r.id for r in refs]
    try:
        status, slider = ui.switch_model(refs[1].id)
        assert engine.loaded.id == refs[1].id and refs[1].id in status
        assert slider["maximum"] == 256  # the other model's context
        with pytest.raises(gr.Error):
            ui.switch_model("../../etc")  # only listed models, never a path typed into the UI
    finally:
        engine.load(refs[0])
    assert engine.loaded.id == refs[0].id


@pytest.mark.slow
def test_browser_chat_streams_a_reply(engine, refs, tmp_path, chromium):
    from playwright.sync_api import expect, sync_playwright

    app = build_app(engine, ServeConfig(max_new_tokens=24, temperature=0.7), list_models=lambda: refs)
    with BackgroundServer(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(url)
            box = page.locator("#chat-input textarea")
            expect(box).to_be_editable(timeout=30_000)
            page.wait_for_load_state("networkidle")
            box.fill("Hello there")
            box.press("Enter")
            expect(page.locator("#chatbot .user.message").last).to_contain_text("Hello there", timeout=30_000)
            bot = page.locator("#chatbot .bot.message").last
            expect(bot).to_contain_text(re.compile(r"\w"), timeout=30_000)
            # the count covers the reply once it is complete (24 tokens on top of the prompt's)
            n_prompt = len(encode_chat(engine.loaded.tokenizer, [{"role": "user", "content": "Hello there"}]))
            expect(page.locator("#token-counter")).not_to_contain_text(f" {n_prompt} / 1,024", timeout=30_000)
            expect(page.locator("#token-counter")).to_contain_text(re.compile(r"\d+ / 1,024 tokens"))
            page.get_by_text("Save / load conversation").click()
            page.locator("#export-btn").click()
            expect(page.locator("#export-file")).to_contain_text(re.compile(r"chat-.*\.json"), timeout=30_000)
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
            assert (tmp_path / "chat.png").stat().st_size > 10_000

            page.locator("#clear-btn").click()
            expect(page.locator("#chatbot .bot.message")).to_have_count(0, timeout=10_000)
        finally:
            browser.close()


def test_a_server_started_without_a_model_serves_the_first_one_that_appears(refs):
    """A fresh user's server: no model, so the API answers 503 and the chat tab waits; once a model appears (a run
    finished in the studio) the tab's watch loads it once for the whole server, and the API serves it."""
    import httpx

    appeared: list = []
    loads: list = []

    def load_engine(ref, metrics):
        loads.append(ref.id)
        return Engine(load_model(ref, "cpu"), metrics=metrics)

    app = build_app(None, ServeConfig(max_new_tokens=4), list_models=lambda: refs, ui=False,
                    no_model_note="train one", load_engine=load_engine,
                    default_model=lambda: appeared[0] if appeared else None)
    chat = ChatUI(None, ServeConfig(max_new_tokens=4), lambda: refs, start=None, no_model_note="train one")
    assert chat.counter([], "") == "" and chat.model_status() == "No model loaded"
    with BackgroundServer(app) as url:
        body = {"model": refs[0].id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        r = httpx.post(url + "v1/chat/completions", json=body)
        assert r.status_code == 503 and "train one" in r.json()["error"]["message"]
        assert httpx.get(url + "v1/models").json()["data"] == []
        assert httpx.get(url + "health").json() == {"status": "no model", "model": None}

        # the chat tab of that page: the server's own start function behind it
        chat = ChatUI(None, ServeConfig(max_new_tokens=4), lambda: refs, start=app.start,
                      default_model=lambda: appeared[0] if appeared else None)
        waiting = chat.watch()
        assert all(u == gr.update() for u in waiting[:6]) and waiting[6].active  # nothing yet: keep watching
        assert waiting[7]["choices"] == [(r.label, r.id) for r in refs]  # what can be loaded by hand meanwhile
        appeared.append(refs[1])
        note, view, picker, status, *_, timer, first = chat.watch()
        assert note["visible"] is False and view["visible"] is True and timer.active is False
        assert first["visible"] is False
        assert picker["value"] == refs[1].id and refs[1].id in status
        chat.watch()  # a second page: the same engine, not a second load
        assert loads == [refs[1].id]
        r = httpx.post(url + "v1/chat/completions", json={**body, "model": refs[1].id})
        assert r.status_code == 200 and r.json()["model"] == refs[1].id
        assert httpx.get(url + "health").json()["status"] == "ok"
        assert httpx.get(url + "metrics").json()["counters"]["http_5xx"] == 1  # the counts go on across the swap
    app.api.engine.close()

