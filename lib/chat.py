"""The chat format in one place: ChatML's tokens and templates (Jinja for transformers, Go for Ollama), rendering a
conversation with the spans the loss trains on, encoding it for a reply, the ids that end a turn, and OpenAI-style
content parts read as text. Training (lib.train.sft), export (lib.export.exporter) and serving (lib.serving) all use these, so a
change to the format is made here once.

    text, spans = render(tokenizer, messages)        # spans: the assistant turns' trained characters
    ids = encode_chat(tokenizer, messages)           # ready for the reply; message text never becomes markup
    stops = end_of_turn_ids(tokenizer)               # <|im_end|>, eos, ... whichever the vocabulary has
    content_text([{"type": "text", "text": "Hi"}])   # "Hi"

ChatML: "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message; the generation prompt opens an assistant turn.
No bos and no default system prompt, so the rendered string is exactly the messages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lib.errors import UserError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Ollama's Go template for the same ChatML text as CHAT_TEMPLATE renders (system first, then every turn, then the
# generation prompt "<|im_start|>assistant\n").
OLLAMA_TEMPLATE = (
    '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
    '{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
    '{{ end }}<|im_start|>assistant\n'
)

# Special-token texts that commonly end a turn; whichever of them a vocabulary has stop a chat reply.
END_OF_TURN_TOKENS = (IM_END, EOS_TOKEN, "<|eot_id|>", "</s>", "<end_of_turn>", "<|end|>")

# Chat formats of model families, for a model whose tokenizer carries no template: each is used only when the
# vocabulary has its turn tokens as single tokens (the model was trained on them), first match wins. Facts of the
# formats (Gemma's turns, Llama 3's headers, Phi-3's role tokens), written here as Jinja.
FAMILY_TEMPLATES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("ChatML", (IM_START, IM_END), CHAT_TEMPLATE),
    ("Gemma", ("<start_of_turn>", "<end_of_turn>"),
     "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'system' %}"
     "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' }}"
     "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
     "{{ m['content'] + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    ("Llama 3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
     "{{ bos_token }}{% for m in messages %}"
     "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    ("Phi-3", ("<|user|>", "<|assistant|>", "<|end|>"),
     "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
     "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
)
# No chat format at all (a base model): the messages' text, one paragraph each, for the model to continue.
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %}{{ '\n\n' }}{% endif %}{% endfor %}"


class ChatTemplateError(ValueError):
    """The model's chat template refused the conversation (some templates demand alternating roles, a first user
    turn, ...): the client's input, so HTTP 400."""


# ---------------------------------------------------------------------------------------------------------
# Content.


def content_text(content: Any, *, other_parts: str = "error", strict: bool = False) -> str:
    """OpenAI message content as text: a string, or a list of parts whose text parts are joined.

    other_parts: "error" raises ValueError on an image/audio part, "skip" leaves it out (data files that carry
    images beside the text). strict: every part must say "type": "text" and carry nothing else (the API's rule).
    """
    if isinstance(content, str):
        return content
    if isinstance(content, dict) and not strict:  # one part on its own (Gradio hands some over like this)
        content = [content]
    if isinstance(content, (list, tuple)) and all(isinstance(p, dict) for p in content):
        texts = []
        for p in content:
            kind = p.get("type") if strict else p.get("type", "text")
            if kind == "text" and isinstance(p.get("text"), str) and (not strict or set(p) <= {"type", "text"}):
                texts.append(p["text"])
            elif kind != "text" and other_parts == "skip":
                continue
            else:
                break
        else:
            return "".join(texts)
    raise ValueError('expected a string or a list of {"type": "text", "text": "..."} parts (text only)')


# ---------------------------------------------------------------------------------------------------------
# Rendering and the trained spans.


def chatml_render(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """CHAT_TEMPLATE in Python: the text and the character spans of every assistant turn's trained part (content
    + `<|im_end|>`). A test checks it equals apply_chat_template."""
    parts, spans, pos = [], [], 0
    for m in messages:
        header = f"{IM_START}{m['role']}\n"
        body = m["content"] + IM_END
        start = pos + len(header)
        if m["role"] == "assistant":
            spans.append((start, start + len(body)))
        parts += [header, body, "\n"]
        pos = start + len(body) + 1
    return "".join(parts), spans


def template_render(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Any chat template: render growing prefixes of the conversation to find where each assistant turn starts
    (after the generation prompt) and ends (the rendered turn without trailing whitespace)."""

    def apply(msgs, gen=False):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja errors of a template that cannot render this prefix
            raise UserError(f"the base model's chat template cannot render a conversation prefix ({type(e).__name__}: "
                            f"{e}); use a tokenizer with a ChatML template") from None

    text = apply(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = apply(messages[:i], gen=True)  # everything before the turn, with the assistant header
        upto = apply(messages[: i + 1])
        if not (upto.startswith(prefix) and text.startswith(upto)):
            raise UserError("the base model's chat template is not prefix-stable (rendering a conversation prefix "
                            "does not give the start of the full rendering), so assistant turns cannot be masked; "
                            "use a tokenizer with a ChatML template")
        spans.append((len(prefix), len(upto.rstrip())))
    return text, spans


def render(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the tokenizer's template renders it, and the assistant spans the loss covers."""
    if tokenizer.chat_template == CHAT_TEMPLATE:
        return chatml_render(messages)
    return template_render(tokenizer, messages)


def prepare_tokenizer(tokenizer, where: str):
    """Make sure the tokenizer has a chat template and the ChatML tokens it needs (ours: always)."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.chat_template == CHAT_TEMPLATE:
        missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
        if missing:
            raise UserError(f"{where}: the tokenizer has no {' / '.join(missing)} token, which the ChatML chat "
                            f"template needs; use a tokenizer from stage 02 (it always has them) or one with a chat "
                            f"template of its own")
    return tokenizer


_INSTRUCTION_TUNED = re.compile(r"(?i)(instruct|chat|assistant|sft|dpo|rlhf|(^|[-_. ])it($|[-_. ]))")


def looks_instruction_tuned(*names: str | None) -> bool:
    """Whether a model's names (file or folder name, GGUF general.name / general.finetune, config _name_or_path)
    say it was tuned to chat: "...-Instruct", "...-it", "chat", "sft" ..."""
    return any(n and _INSTRUCTION_TUNED.search(str(n)) for n in names)


def serving_template(tokenizer, instruction_tuned: bool = False) -> tuple[str, str]:
    """(template, note) a served model's conversations are rendered with: the tokenizer's own; else, for a model
    whose names say it is instruction-tuned, its family's format when the vocabulary has that family's turn tokens;
    else plain text to continue, with a warning. A base model's vocabulary often has the turn tokens too (Gemma 3
    270M's does) without having been trained on them. Never markup the model was not trained on."""
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own, ""
    vocab = tokenizer.get_vocab()
    family = next(((name, template) for name, tokens, template in FAMILY_TEMPLATES
                   if all(t in vocab for t in tokens)), None)
    if family and instruction_tuned:
        return family[1], (f"no chat template in the tokenizer: using the {family[0]} format (an instruction-tuned "
                           "model whose vocabulary has its turn tokens)")
    why = (f"its vocabulary has {family[0]}'s turn tokens but its name does not say it was tuned to chat"
           if family else "no known chat format in its vocabulary")
    bos = tokenizer.bos_token_id
    # the document-start token, where the tokenizer itself puts one before a text (Gemma, Llama), as in training
    starts_with_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    template = "{{ bos_token }}" * starts_with_bos + PLAIN_TEMPLATE
    return template, (f"warning: no chat template ({why}): plain completion, the model continues the text of the "
                      "messages; give the tokenizer a chat_template to chat")


# ---------------------------------------------------------------------------------------------------------
# End of turn.


def end_of_turn_ids(tokenizer, model_dir: Path | None = None) -> list[int]:
    """The ids that end a reply: <|im_end|> first when the vocabulary has it, then eos, then the eos ids of
    model_dir's generation_config.json, then any other common end-of-turn token the vocabulary has."""
    ids: list[int] = []

    def add(i):
        if isinstance(i, int) and i not in ids:
            ids.append(i)

    vocab = tokenizer.get_vocab()
    add(vocab.get(IM_END))
    add(tokenizer.eos_token_id)
    gen_cfg = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if gen_cfg is not None and gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text(encoding="utf-8")).get("eos_token_id")
        for e in eos if isinstance(eos, list) else [eos]:
            add(e)
    for t in END_OF_TURN_TOKENS:
        add(vocab.get(t))
    return ids


# ---------------------------------------------------------------------------------------------------------
# Encoding a conversation for a reply.

# Private-use code points mark where each message's content sits in the rendered template.
_MARK = "\ue000{}\ue001"


def _added_token_texts(tokenizer) -> list[str]:
    return [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]


def _apply(tokenizer, messages: list[dict], template: str, add_generation_prompt: bool, tools=None) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, tools=tools,
                                             add_generation_prompt=add_generation_prompt)
    except TemplateError as e:  # includes the templates' own raise_exception("...")
        raise ChatTemplateError(f"the model's chat template rejected this conversation: {e}") from None


TOOL_KEYS = ("tool_calls", "tool_call_id", "name")  # what a message of a tool-calling conversation adds


def encode_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template, ready for the reply. `tools`:
    OpenAI's tool list, for a template that renders it (lib.serving.tools).

    Message text is data, not markup: a user who types "<|im_end|><|im_start|>system" gets those characters
    as ordinary text tokens, not the special tokens that delimit turns. Only the template adds special tokens.
    """
    template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    msgs = [{"role": m["role"], "content": m.get("content") or "", **{k: m[k] for k in TOOL_KEYS if m.get(k)}}
            for m in messages]
    specials = _added_token_texts(tokenizer)
    if not any(s in m["content"] for m in msgs for s in specials):
        text = _apply(tokenizer, msgs, template, add_generation_prompt, tools)
        return tokenizer.encode(text, add_special_tokens=False, verbose=False)
    # Render with placeholders, then encode the template's pieces normally and the contents with special-token
    # matching off. A template that rewrites content (trim, replace) loses a placeholder: then neutralise instead.
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(msgs)]
    text = _apply(tokenizer, marked, template, add_generation_prompt, tools)
    ids: list[int] = []
    rest = text
    for i, m in enumerate(msgs):
        mark = _MARK.format(i)
        if rest.count(mark) != 1:
            return encode_chat(tokenizer, [_defused(m, specials) for m in msgs], add_generation_prompt, tools)
        before, rest = rest.split(mark)
        ids += tokenizer.encode(before, add_special_tokens=False, verbose=False)
        ids += tokenizer.encode(m["content"], add_special_tokens=False, split_special_tokens=True, verbose=False)
    return ids + tokenizer.encode(rest, add_special_tokens=False, verbose=False)


def _defused(message: dict, specials: list[str]) -> dict:
    """The message with each special-token text broken by a zero-width space (it then tokenises as plain text)."""
    content = message["content"]
    for s in specials:
        content = content.replace(s, s[:1] + "\u200b" + s[1:])
    return {**message, "content": content}


def prompt_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """One user prompt (after an optional system prompt) encoded for the reply."""
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": prompt}]
    return encode_chat(tokenizer, msgs)
