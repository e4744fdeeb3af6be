"""lib.chat, the one definition of the chat format: content parts, the Python ChatML renderer against the Jinja
template, the Go template for Ollama against the Jinja one, and the end-of-turn ids."""

import re

import pytest
from transformers import AutoTokenizer

from lib.chat import (
    CHAT_TEMPLATE,
    IM_END,
    OLLAMA_TEMPLATE,
    chatml_render,
    content_text,
    end_of_turn_ids,
    prompt_ids,
    render,
)

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "See you."}]


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    return AutoTokenizer.from_pretrained(str(tiny_chat_model))


def test_content_parts_read_as_text_under_each_policy():
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]
    assert content_text("plain") == "plain"
    assert content_text(parts) == content_text(parts, strict=True) == "Hi you"
    image = [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert content_text(image, other_parts="skip") == "see"  # data files: the text of a multimodal record
    with pytest.raises(ValueError, match="text only"):
        content_text(image)  # the API: a text model cannot answer about an image
    assert content_text([{"text": "untyped"}]) == "untyped"  # datasets often leave "type" out ...
    with pytest.raises(ValueError):
        content_text([{"text": "untyped"}], strict=True)  # ... OpenAI's API does not
    with pytest.raises(ValueError):
        content_text([{"type": "text", "text": "x", "extra": 1}], strict=True)
    with pytest.raises(ValueError):
        content_text({"type": "text", "text": "x"}, strict=True)
    assert content_text({"type": "text", "text": "one part"}) == "one part"
    for bad in (None, 3, [1, 2], [{"type": "text", "text": 5}]):
        with pytest.raises(ValueError):
            content_text(bad)


def test_python_renderer_equals_the_jinja_template_and_spans_cover_assistant_turns(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    text, spans = chatml_render(CONVERSATION)
    assert text == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert [text[a:b] for a, b in spans] == [f"Hello!{IM_END}", f"See you.{IM_END}"]
    assert render(tok, CONVERSATION) == (text, spans)


def test_ollama_go_template_renders_what_the_jinja_template_renders():
    """A small interpreter for the constructs OLLAMA_TEMPLATE uses ({{- if .System }}, {{ range .Messages }},
    {{ if ne .Role "system" }}), enough to compare its output with the Jinja template's."""
    system = CONVERSATION[0]["content"]
    out = []
    body = OLLAMA_TEMPLATE
    m = re.fullmatch(r'\{\{- if \.System \}\}(.*?)\{\{ end \}\}\{\{- range \.Messages \}\}\{\{ if ne \.Role "system" \}\}'
                     r'(.*?)\{\{ end \}\}\{\{ end \}\}(.*)', body, flags=re.S)
    assert m, "OLLAMA_TEMPLATE changed shape: update this interpreter"
    sys_part, turn, tail = m.groups()
    out.append(sys_part.replace("{{ .System }}", system))
    for msg in CONVERSATION[1:]:
        out.append(turn.replace("{{ .Role }}", msg["role"]).replace("{{ .Content }}", msg["content"]))
    out.append(tail)
    from jinja2 import Template

    expected = Template(CHAT_TEMPLATE).render(messages=CONVERSATION, add_generation_prompt=True)
    assert "".join(out) == expected


def test_end_of_turn_ids_one_rule(tok, tmp_path, tiny_chat_model):
    vocab = tok.get_vocab()
    ids = end_of_turn_ids(tok)
    assert ids[:2] == [vocab[IM_END], tok.eos_token_id]  # <|im_end|> first: the turn's own end
    assert set(ids) == {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [3, 77]}')
    assert end_of_turn_ids(tok, tmp_path) == [*ids, 77]  # a model's own eos ids count too, once


def test_prompt_ids_is_the_template_applied_for_a_reply(tok):
    ids = prompt_ids(tok, "Hi", "Be brief.")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ids == tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
