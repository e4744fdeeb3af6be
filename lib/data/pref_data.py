"""Preference data for phase 3 (lib.train.prefs): records from files or the hub in the three shapes people publish,
turned into one shape — the conversation before the reply, the chosen reply and the rejected one.

    pairs, sources = load_pref_pairs(cfg.prefs, cfg.base_dir)
    pairs[0].prompt     # [{"role": "user", "content": "Hi"}]
    pairs[0].chosen, pairs[0].rejected   # "Hello! How are you?", "hi hi hi"

The formats, detected from a source's first record (or forced with `prefs.data[i].format`):
- pairs: {"prompt", "chosen", "rejected"}: strings, or TRL's conversational form (message lists);
- hh_rlhf: {"chosen", "rejected"}: two whole dialogs in Anthropic's "\\n\\nHuman: … \\n\\nAssistant: …" text that
  differ in their last reply;
- ultrafeedback: {"chosen", "rejected"} message lists (UltraFeedback binarized: the prompt is everything before the
  last assistant message), or {"prompt"/"instruction", "completions": [{"response", "overall_score"}]} (the raw
  release: the best-scored reply is chosen, the worst rejected).
Files are read by the same readers as SFT data (JSONL/JSON/CSV/Parquet, errors name file:line). The offline default
(`type: self_play`) has no records here: lib.train.prefs samples its rejected replies from the SFT model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from lib.chat import content_text
from lib.config import PrefsConfig, PrefsDataConfig
from lib.data.loaders import hub_records
from lib.data.records import FILE_FORMATS, file_format, resolve_files
from lib.data.sft_data import OPENAI_ROLES, read_file_records
from lib.errors import UserError

FORMAT_EXAMPLES = {
    "pairs": '{"prompt": "Hi", "chosen": "Hello! How are you?", "rejected": "hi hi hi"}',
    "hh_rlhf": '{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: go away"}',
    "ultrafeedback": '{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], '
                     '"rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "no"}]}',
}


def formats_help() -> str:
    width = max(map(len, FORMAT_EXAMPLES))
    return "supported preference formats (auto-detected; force one with prefs.data[i].format):\n" + "\n".join(
        f"  {name:<{width}}  {example}" for name, example in FORMAT_EXAMPLES.items())


@dataclass
class PrefPair:
    """One preference: the conversation before the reply (ending with a user turn), and two replies to it."""

    prompt: list[dict]
    chosen: str
    rejected: str
    where: str = ""
    rejected_ended: bool = True  # False: a sampled reply cut at its token limit (it never ended its turn)

    def key(self) -> str:
        """The prompt's canonical content (for the train/val split): every pair of one prompt lands on the same
        side, so a held-out prompt is one the model was not tuned on."""
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)


class _Bad(Exception):
    """A record does not have the shape its format needs."""


# ---------------------------------------------------------------------------------------------------------
# Detection and conversion.

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def detect_format(rec: Any) -> Optional[str]:
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get("completions"), list):
        return "ultrafeedback"
    if not {"chosen", "rejected"} <= set(rec):
        return None
    chosen = rec["chosen"]
    if isinstance(chosen, list) and ("prompt" not in rec or any(
            isinstance(m, dict) and m.get("role") != "assistant" for m in chosen)):
        return "ultrafeedback"  # whole dialogs (UltraFeedback binarized repeats the prompt inside them)
    if isinstance(chosen, str) and "prompt" not in rec and "Assistant:" in chosen:
        return "hh_rlhf"
    return "pairs" if "prompt" in rec else None


def _messages(items: Any, field: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise _Bad(f"'{field}' is not a non-empty list of messages")
    out = []
    for j, m in enumerate(items):
        if not isinstance(m, dict) or m.get("role") not in OPENAI_ROLES:
            raise _Bad(f"{field}[{j}] is not a {{'role', 'content'}} message with role system/user/assistant")
        out.append({"role": OPENAI_ROLES[m["role"]], "content": content_text(m.get("content"), strict=True)})
    return out


def _reply(value: Any, field: str) -> str:
    """A reply given as text, or as a message list whose last message is the assistant's."""
    if isinstance(value, str):
        return value
    msgs = _messages(value, field)
    if msgs[-1]["role"] != "assistant":
        raise _Bad(f"the last message of '{field}' is not the assistant's")
    return msgs[-1]["content"]


def _pairs(rec: dict) -> PrefPair:
    prompt = rec["prompt"]
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
    return PrefPair(msgs, _reply(rec["chosen"], "chosen"), _reply(rec["rejected"], "rejected"))


def _hh_dialog(text: Any, field: str) -> list[dict]:
    if not isinstance(text, str):
        raise _Bad(f"'{field}' is not a string")
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if parts[0].strip() or len(parts) < 3:
        raise _Bad(f"'{field}' is not a dialog of '\\n\\nHuman: …' and '\\n\\nAssistant: …' turns")
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]


def _common_prompt(chosen: list[dict], rejected: list[dict]) -> list[dict]:
    """The turns both dialogs share before their last assistant replies."""
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise _Bad("a dialog does not end with an assistant reply")
    if chosen[:-1] != rejected[:-1]:
        raise _Bad("the two dialogs differ before their last reply (expected the same conversation, two endings)")
    if not chosen[:-1] or chosen[-2]["role"] != "user":
        raise _Bad("no user turn before the last reply")
    return chosen[:-1]


def _hh_rlhf(rec: dict) -> PrefPair:
    chosen, rejected = _hh_dialog(rec["chosen"], "chosen"), _hh_dialog(rec["rejected"], "rejected")
    return PrefPair(_common_prompt(chosen, rejected), chosen[-1]["content"], rejected[-1]["content"])


def _ultrafeedback(rec: dict) -> PrefPair:
    if "completions" in rec:
        prompt = rec.get("prompt", rec.get("instruction"))
        if not isinstance(prompt, str):
            raise _Bad("no 'prompt' or 'instruction' text beside 'completions'")
        scored = []
        for j, c in enumerate(rec["completions"]):
            if not isinstance(c, dict) or not isinstance(c.get("response"), str):
                raise _Bad(f"completions[{j}] has no 'response' text")
            score = c.get("overall_score", c.get("score"))
            if not isinstance(score, (int, float)):
                raise _Bad(f"completions[{j}] has no numeric 'overall_score'")
            scored.append((float(score), j, c["response"]))
        if len(scored) < 2 or max(scored)[0] == min(scored)[0]:
            raise _Tie()
        return PrefPair([{"role": "user", "content": prompt}], max(scored)[2], min(scored)[2])
    chosen, rejected = _messages(rec["chosen"], "chosen"), _messages(rec["rejected"], "rejected")
    return PrefPair(_common_prompt(chosen, rejected), chosen[-1]["content"], rejected[-1]["content"])


class _Tie(Exception):
    """Completions whose scores prefer none (nothing to learn): counted, not an error."""


CONVERTERS = {"pairs": _pairs, "hh_rlhf": _hh_rlhf, "ultrafeedback": _ultrafeedback}


def convert_record(rec: Any, fmt: str, where: str) -> Optional[PrefPair]:
    """One record as a PrefPair; None for a record that prefers nothing (equal replies or scores); a UserError
    naming `where` and the expected shape for a record of the wrong shape."""
    try:
        pair = CONVERTERS[fmt](rec)
    except _Tie:
        return None
    except (_Bad, UserError, KeyError, TypeError) as e:
        shown = f"keys {sorted(rec)}" if isinstance(rec, dict) else f"a {type(rec).__name__}"
        why = f"no {e} field" if isinstance(e, KeyError) else str(e)
        raise UserError(f"{where}: not a valid {fmt} preference record ({why}; the record has {shown}). Expected "
                        f"e.g. {FORMAT_EXAMPLES[fmt]}\n{formats_help()}") from None
    if not pair.chosen.strip() or not pair.rejected.strip():
        raise UserError(f"{where}: an empty chosen or rejected reply; every pair needs two replies")
    if pair.chosen == pair.rejected:
        return None
    pair.where = where
    return pair


# ---------------------------------------------------------------------------------------------------------
# Reading.


def iter_records(src: PrefsDataConfig, index: int, base_dir: str) -> Iterator[tuple[str, Any]]:
    key = f"prefs.data[{index}]"
    if src.type == "hf":
        yield from hub_records(src.name, src.subset, src.split, key, base_dir, streaming=False)()
        return
    files = resolve_files(src.path, base_dir, f"{key}.path")
    for path in files:
        if file_format(path) in (None, ".txt"):
            raise UserError(f"{key}.path: {path}: expected preference records in "
                            f"{', '.join(f for f in FILE_FORMATS if f != '.txt')}")
    for path in files:
        yield from read_file_records(path)


def load_source(src: PrefsDataConfig, index: int, base_dir: str) -> tuple[list[PrefPair], dict]:
    fmt = None if src.format == "auto" else src.format
    out: list[PrefPair] = []
    records = ties = 0
    for where, rec in iter_records(src, index, base_dir):
        if fmt is None:
            fmt = detect_format(rec)
            if fmt is None:
                shown = f"keys {sorted(rec)}" if isinstance(rec, dict) else f"a {type(rec).__name__}"
                raise UserError(f"{where}: cannot tell the preference format of this record (it has {shown}).\n"
                                f"{formats_help()}")
        records += 1
        pair = convert_record(rec, fmt, where)
        if pair is None:
            ties += 1
            continue
        out.append(pair)
        if src.max_pairs is not None and len(out) >= src.max_pairs:
            break
    if not out:
        why = f"all {records} records prefer neither reply" if records else "the source has no records"
        raise UserError(f"prefs.data[{index}] ({src.type}: {src.path or src.name}): no preference pairs ({why}).\n"
                        f"{formats_help()}")
    return out, {"index": index, "type": src.type, "format": fmt, "records": records, "ties": ties,
                 "pairs": len(out)}


def load_pref_pairs(prefs: PrefsConfig, base_dir: str = ".", system_prompt: str | None = None
                    ) -> tuple[list[PrefPair], list[dict]]:
    """The pairs of every file or hub entry of `prefs.data` (self-play entries are built by lib.train.prefs), the
    system prompt put first where a conversation has none; and per-source info."""
    pairs, sources = [], []
    for i, src in enumerate(prefs.data):
        if src.type == "self_play":
            continue
        got, info = load_source(src, i, base_dir)
        pairs += got
        sources.append(info)
    if system_prompt:
        for p in pairs:
            if p.prompt[0]["role"] != "system":
                p.prompt.insert(0, {"role": "system", "content": system_prompt})
    return pairs, sources
