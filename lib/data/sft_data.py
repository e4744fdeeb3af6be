"""Instruction-tuning data for stage 04: reading records from files, the hub or the embedded chitchat dialogs, and
turning every supported format into one shape — a conversation of `{"role", "content"}` messages, or plain text.

    examples = load_sft_examples(cfg.sft, cfg.base_dir)   # list[Example], in source order
    examples[0].messages   # [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]

The format of a source is detected from its first record (or forced with `sft.data[i].format`); every later record
must have the same shape, otherwise a UserError names the file, the record and what was expected, and lists the
supported formats with an example of each. Rendering is lib/chat.py's; masks and batches live in lib/train/sft_batches.py.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lib.chat import content_text
from lib.config import SftConfig, SftDataConfig
from lib.data.loaders import hub_records, packaged_file
from lib.data.records import (
    FILE_FORMATS,
    BadRecords,
    csv_rows,
    file_format,
    json_records,
    jsonl_records,
    parquet_rows,
    resolve_files,
    txt_documents,
)
from lib.errors import UserError

ROLES = ("system", "user", "assistant")
# SQuAD v2 questions without an answer become this reply, so the model learns to decline instead of inventing one.
UNANSWERABLE = "The text does not answer that question."

FORMAT_EXAMPLES = {
    "alpaca": '{"instruction": "Name a colour.", "input": "", "output": "Blue."}  (Dolly: context/response)',
    "sharegpt": '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}',
    "openai": '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, '
              '{"role": "assistant", "content": "Hello!"}]}',
    "prompt_completion": '{"prompt": "2+2=", "completion": "4"}',
    "qa": '{"question": "Capital of France?", "answer": "Paris."}  (or a CSV with columns question,answer)',
    "squad": '{"context": "...", "question": "...", "answers": {"text": ["..."]}}  (SQuAD v2: empty answers = '
             'unanswerable)',
    "dialog": '{"dialog": ["Hi!", "Hello, how are you?", "Fine, thanks."]}  (alternating user/assistant turns)',
    "text": '{"text": "any text"}  (or a .txt file; continued pretraining, loss on every token)',
}
CHITCHAT_EXAMPLE = '{"messages": [[{"text": "Hi", "sender": "a"}], [{"text": "Hello!", "sender": "b"}]]}'
DIALOG_KEYS = ("dialog", "dialogue", "turns", "utterances")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def formats_help() -> str:
    width = max(map(len, FORMAT_EXAMPLES))
    return "supported formats (auto-detected; force one with sft.data[i].format):\n" + "\n".join(
        f"  {name:<{width}}  {example}" for name, example in FORMAT_EXAMPLES.items())


@dataclass
class Example:
    """One training example: a conversation (`messages`) or plain text (`text`), and where it came from."""

    messages: Optional[list[dict]] = None
    text: Optional[str] = None
    where: str = ""

    def key(self) -> str:
        """Canonical content (for the train/val split hash and dedup): independent of where it came from."""
        return json.dumps(self.messages if self.messages is not None else self.text, sort_keys=True, ensure_ascii=False)


class _Bad(Exception):
    """A record does not have the shape its format needs (the message says what was expected)."""


class _Skip(Exception):
    """A well-formed record with nothing to learn from (e.g. a dialog with one speaker): counted, not an error."""


# ---------------------------------------------------------------------------------------------------------
# Format detection and conversion. Each converter takes one record and returns an Example or raises _Bad.


def detect_format(rec: Any) -> Optional[str]:
    """The format a record looks like, or None. Order matters: more specific shapes first."""
    if isinstance(rec, list):
        return "dialog" if rec and all(isinstance(t, str) for t in rec) else None
    if not isinstance(rec, dict):
        return None
    keys = set(rec)
    msgs = rec.get("messages")
    if isinstance(msgs, list):
        # chitchat-dataset: one list of {"text", "sender"} per speaker turn; OpenAI: one dict per message
        if msgs and all(isinstance(m, list) for m in msgs):
            return "chitchat"
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and keys & {"output", "response"}:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"context", "question"} <= keys and keys & {"answers", "answer", "is_impossible"}:
        return "squad"
    if {"question", "answer"} <= keys:
        return "qa"
    if any(isinstance(rec.get(k), list) for k in DIALOG_KEYS):
        return "dialog"
    if "text" in keys:
        return "text"
    return None


def _text(rec: dict, key: str, *, optional: bool = False) -> str:
    """A string field, stripped; missing/empty is an error unless optional."""
    v = rec.get(key)
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise _Bad(f"field {key!r} should be a string, got {'nothing' if v is None else type(v).__name__}")
    v = v.strip()
    if not v and not optional:
        raise _Bad(f"field {key!r} is empty")
    return v


def _first(rec: dict, *keys: str) -> str:
    for k in keys:
        if k in rec:
            return k
    raise _Bad(f"expected one of the fields {', '.join(map(repr, keys))}")


def _alpaca(rec: dict) -> Example:
    instruction = _text(rec, "instruction")
    extra = _text(rec, _first(rec, "input", "context") if rec.keys() & {"input", "context"} else "input",
                  optional=True)
    output = _text(rec, _first(rec, "output", "response"))
    msgs = []
    if isinstance(rec.get("system"), str) and rec["system"].strip():
        msgs.append({"role": "system", "content": rec["system"].strip()})
    msgs += [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction},
             {"role": "assistant", "content": output}]
    return Example(messages=msgs)


def _content(value: Any, where: str) -> str:
    """Message content: a string, or OpenAI's list of parts of which the text parts are joined (others left out)."""
    if isinstance(value, (str, list)):
        try:
            return content_text(value, other_parts="skip").strip()
        except ValueError:
            pass
    raise _Bad(f"{where} should be a string (or a list of {{\"type\": \"text\", \"text\": ...}} parts), "
               f"got {type(value).__name__}")


def _message_list(items: Any, field: str, role_key: str, text_key: str, roles: dict) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise _Bad(f"field {field!r} should be a non-empty list of messages")
    msgs = []
    for j, m in enumerate(items):
        if not isinstance(m, dict) or role_key not in m or text_key not in m:
            raise _Bad(f"{field}[{j}] should be an object with {role_key!r} and {text_key!r}")
        role = roles.get(str(m[role_key]).lower())
        if role is None:
            raise _Bad(f"{field}[{j}].{role_key} is {m[role_key]!r}; expected one of {', '.join(sorted(roles))}")
        msgs.append({"role": role, "content": _content(m[text_key], f"{field}[{j}].{text_key}")})
    return msgs


def _openai(rec: dict) -> Example:
    return Example(messages=_message_list(rec.get("messages"), "messages", "role", "content", OPENAI_ROLES))


def _sharegpt(rec: dict) -> Example:
    msgs = _message_list(rec.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    if isinstance(rec.get("system"), str) and rec["system"].strip() and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": rec["system"].strip()})
    return Example(messages=msgs)


def _prompt_completion(rec: dict) -> Example:
    return Example(messages=[{"role": "user", "content": _text(rec, "prompt")},
                             {"role": "assistant", "content": _text(rec, "completion")}])


def _qa(rec: dict) -> Example:
    return Example(messages=[{"role": "user", "content": _text(rec, "question")},
                             {"role": "assistant", "content": _text(rec, "answer")}])


def _squad_answer(rec: dict) -> str:
    """The first gold answer, or UNANSWERABLE for a SQuAD v2 question marked impossible / with no answers."""
    if rec.get("is_impossible") is True:
        return UNANSWERABLE
    answers = rec.get("answers", rec.get("answer"))
    if isinstance(answers, str):
        texts = [answers]
    elif isinstance(answers, dict):  # the HF `squad` / `squad_v2` layout: {"text": [...], "answer_start": [...]}
        texts = answers.get("text")
    elif isinstance(answers, list):  # the original JSON layout: [{"text": ..., "answer_start": ...}]
        texts = [a.get("text") if isinstance(a, dict) else a for a in answers]
    else:
        raise _Bad("field 'answers' should be {\"text\": [...]} or a list of {\"text\": ...}")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise _Bad("the answer texts should be strings")
    texts = [t.strip() for t in texts if t.strip()]
    return texts[0] if texts else UNANSWERABLE  # v2: an empty answer list means unanswerable


def _squad(rec: dict) -> Example:
    context, question = _text(rec, "context"), _text(rec, "question")
    return Example(messages=[{"role": "user", "content": f"{context}\n\nQuestion: {question}"},
                             {"role": "assistant", "content": _squad_answer(rec)}])


def _dialog(rec: Any) -> Example:
    turns = rec if isinstance(rec, list) else next((rec[k] for k in DIALOG_KEYS if isinstance(rec.get(k), list)), None)
    if turns is None:
        raise _Bad(f"expected a list of turns under one of {', '.join(map(repr, DIALOG_KEYS))}")
    if not all(isinstance(t, str) for t in turns):
        raise _Bad("every turn of a dialog should be a string")
    turns = [t.strip() for t in turns if t.strip()]
    return Example(messages=[{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)])


def _chitchat(rec: dict) -> Example:
    """chitchat-dataset: consecutive messages of one sender form one turn; the first speaker is the user."""
    turns: list[list] = []  # [sender, [texts]]
    for j, turn in enumerate(rec.get("messages") or []):
        if not isinstance(turn, list):
            raise _Bad(f"messages[{j}] should be a list of {{\"text\", \"sender\"}}")
        for m in turn:
            if not isinstance(m, dict) or not isinstance(m.get("text"), str):
                raise _Bad(f"messages[{j}] should hold objects with a string 'text'")
            sender = m.get("sender")
            if turns and turns[-1][0] == sender:
                turns[-1][1].append(m["text"].strip())
            else:
                turns.append([sender, [m["text"].strip()]])
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "\n".join(t for t in texts if t)}
            for i, (_, texts) in enumerate(turns)]
    return Example(messages=_drop_empty(msgs))


def _drop_empty(msgs: list[dict]) -> list[dict]:
    """Drop empty turns and merge the neighbours that become same-role, so roles still alternate."""
    out: list[dict] = []
    for m in msgs:
        if not m["content"]:
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def _plain_text(rec: Any) -> Example:
    if isinstance(rec, str):
        text = rec
    elif isinstance(rec, dict):
        text = rec.get("text")
        if not isinstance(text, str):
            raise _Bad("field 'text' should be a string")
    else:
        raise _Bad("expected an object with a 'text' field")
    if not text.strip():
        raise _Bad("field 'text' is empty")
    return Example(text=text)


CONVERTERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai, "prompt_completion": _prompt_completion,
              "qa": _qa, "squad": _squad, "dialog": _dialog, "chitchat": _chitchat, "text": _plain_text}


def check_messages(msgs: list[dict]) -> None:
    """What every conversation must satisfy, whatever its source format."""
    for j, m in enumerate(msgs):
        if m["role"] == "system" and j != 0:
            raise _Bad(f"message {j} is a system message; a system prompt may only come first")
    if not any(m["role"] == "assistant" and m["content"] for m in msgs):
        raise _Skip("no assistant reply")
    for j, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"]:
            raise _Bad(f"message {j} is an empty assistant message")


def convert_record(rec: Any, fmt: str, where: str) -> Optional[Example]:
    """One record in format `fmt` as an Example; None for a record with nothing to learn (no assistant reply);
    a UserError naming `where` and what was expected for a record of the wrong shape."""
    try:
        ex = CONVERTERS[fmt](rec)
        if ex.messages is not None:
            check_messages(ex.messages)
    except _Bad as e:
        shown = f"keys {sorted(rec)}" if isinstance(rec, dict) else f"a {type(rec).__name__}"
        sample = FORMAT_EXAMPLES.get(fmt, CHITCHAT_EXAMPLE)
        raise UserError(f"{where}: not a valid {fmt} record ({e}; the record has {shown}). Expected e.g. {sample}\n"
                        f"{formats_help()}") from None
    except _Skip:
        return None
    ex.where = where
    return ex


# ---------------------------------------------------------------------------------------------------------
# Reading records: (where, record) pairs from files, the hub and the embedded dialogs.


def _squad_nested(data: list, path: Path) -> Iterator[tuple[str, Any]]:
    """The original SQuAD JSON: data[] -> paragraphs[] -> qas[], flattened to one record per question."""
    for a, article in enumerate(data):
        for p, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            for q, qa in enumerate(para.get("qas", []) if isinstance(para, dict) else []):
                rec = {**qa, "context": para.get("context")} if isinstance(qa, dict) else qa
                qid = f"id {qa['id']}" if isinstance(qa, dict) and "id" in qa else f"question {q + 1}"
                yield f"{path}: data[{a}].paragraphs[{p}] {qid}", rec


def _json_file(path: Path, bad: BadRecords) -> Iterator[tuple[str, Any]]:
    """A top-level array streams record by record. A top-level object is read whole (it may be one record) and is
    then the original SQuAD layout, an object of records keyed by id (chitchat-dataset's dataset.json), or one
    record."""
    items = json_records(path, bad)
    first = next(items, None)
    if first is None:
        return
    if first[1] is None:  # an array
        for i, (lineno, _, rec) in enumerate(itertools.chain([first], items)):
            yield f"{path}:{lineno} (record {i + 1})", rec
        return
    data = {key: rec for _, key, rec in itertools.chain([first], items)}
    if isinstance(data.get("data"), list) and data["data"] and isinstance(data["data"][0], dict) and \
            "paragraphs" in data["data"][0]:
        yield from _squad_nested(data["data"], path)
    elif all(isinstance(v, (dict, list)) for v in data.values()) and detect_format(data) is None:
        for i, (key, rec) in enumerate(data.items()):
            yield f"{path}: record {i + 1} (key {key!r})", rec
    else:
        yield f"{path}: record 1", data


def read_file_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of one local file, read by lib.data.records (streaming, one error policy)."""
    kind = file_format(path)
    if kind is None:
        raise UserError(f"{path}: unsupported file type; expected one of {', '.join(FILE_FORMATS)} (optionally .gz)")
    bad = BadRecords("error", option=None)  # SFT data has no skip option: a bad record is an error
    if kind == ".jsonl":
        for n, (lineno, rec) in enumerate(jsonl_records(path, bad), 1):
            yield f"{path}:{lineno} (record {n})", rec
    elif kind == ".json":
        yield from _json_file(path, bad)
    elif kind == ".csv":
        for n, (lineno, row) in enumerate(csv_rows(path, bad), 1):
            yield f"{path}:{lineno} (record {n})", row  # "" for empty cells: alpaca's input may be empty
    elif kind == ".parquet":
        for row_no, rec in parquet_rows(path, bad):
            yield f"{path}: row {row_no}", rec
    else:  # plain text: one document per blank-line separated paragraph (continued pretraining)
        for start, text in txt_documents(path, bad, "paragraph", max_chars=1 << 30):
            yield f"{path}:{start}", {"text": text.strip()}


def iter_records(src: SftDataConfig, index: int, base_dir: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of one `sft.data` entry, in a fixed order."""
    key = f"sft.data[{index}]"
    if src.type == "chitchat":
        yield from _json_file(packaged_file("chitchat", key), BadRecords("error", option=None))
    elif src.type == "hf":
        yield from hub_records(src.name, src.subset, src.split, key, base_dir, streaming=False)()
    else:
        files = resolve_files(src.path, base_dir, f"{key}.path")
        for path in files:
            if file_format(path) is None:
                raise UserError(f"{key}.path: {path}: unsupported file type; expected {', '.join(FILE_FORMATS)}")
        for path in files:
            yield from read_file_records(path)


def load_source(src: SftDataConfig, index: int, base_dir: str) -> tuple[list[Example], dict]:
    """All examples of one `sft.data` entry (at most max_examples) and info: format, records, skipped."""
    fmt = None if src.format == "auto" else src.format
    out: list[Example] = []
    records = skipped = 0
    label = f"sft.data[{index}] ({src.type}{': ' + (src.path or src.name) if src.path or src.name else ''})"
    for where, rec in iter_records(src, index, base_dir):
        if fmt is None:
            fmt = detect_format(rec)
            if fmt is None:
                shown = f"keys {sorted(rec)}" if isinstance(rec, dict) else f"a {type(rec).__name__}"
                raise UserError(f"{where}: cannot tell the format of this record (it has {shown}).\n{formats_help()}")
        records += 1
        ex = convert_record(rec, fmt, where)
        if ex is None:
            skipped += 1
            continue
        out.append(ex)
        if src.max_examples is not None and len(out) >= src.max_examples:
            break
    if not out:
        why = (f"all {records} records lack an assistant reply" if records else "the source has no records")
        raise UserError(f"{label}: no usable examples ({why}). Expected records in one of the formats below.\n"
                        f"{formats_help()}")
    return out, {"index": index, "type": src.type, "format": fmt, "records": records, "skipped_no_reply": skipped,
                 "examples": len(out)}


def load_sft_examples(sft: SftConfig, base_dir: str = ".") -> tuple[list[Example], list[dict]]:
    """Every example of every `sft.data` entry, system prompt applied; and per-source info (format, count)."""
    examples, sources = [], []
    for i, src in enumerate(sft.data):
        exs, info = load_source(src, i, base_dir)
        if sft.system_prompt:
            for ex in exs:
                if ex.messages is not None and ex.messages[0]["role"] != "system":
                    ex.messages.insert(0, {"role": "system", "content": sft.system_prompt})
        examples += exs
        sources.append(info)
    if not examples:
        raise UserError("sft.data: no examples at all; the SFT dataset is empty")
    return examples, sources
