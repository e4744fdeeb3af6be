"""Builds the JSONL of the local evaluation tasks beside this file from the offline data the project's packages ship
(seeded: the same files every run). The YAML files next to them are the tasks lm-evaluation-harness reads.

    python -m evals.build_tasks            # from the project's folder, like every other script

- home_kjv_cloze: a King James verse without its last word; four candidate words (the true one and the last words
  of three other verses). LAMBADA's idea on offline text; chance 0.25.
- home_chitchat_reply: the opening message of a chitchat dialog; four candidate replies (the true one and the
  replies of three other dialogs). Chance 0.25.
"""

import json
import random
import re
from pathlib import Path

from lib.data.loaders import packaged_file

HERE = Path(__file__).resolve().parent
N = 300


def kjv_cloze(rng: random.Random) -> list[dict]:
    verses = [json.loads(line)["text"] for line in packaged_file("bible", "evals").open(encoding="utf-8")]
    items = []
    for v in verses:
        m = re.fullmatch(r"(.{40,}?)\s+([A-Za-z]{3,})([.,;:?!]*)", v.strip())
        if m:
            items.append((m.group(1), m.group(2)))
    rng.shuffle(items)
    words = sorted({w for _, w in items})
    out = []
    for context, word in items[:N]:
        others = rng.sample([w for w in words if w.lower() != word.lower()], 3)
        choices = others + [word]
        rng.shuffle(choices)
        out.append({"context": context, "choices": [" " + c for c in choices], "label": choices.index(word)})
    return out


def chitchat_reply(rng: random.Random) -> list[dict]:
    data = json.loads(packaged_file("chitchat", "evals").read_text(encoding="utf-8"))
    pairs = []
    for dialog in data.values():
        turns = [" ".join(m["text"] for m in turn).strip() for turn in dialog.get("messages", [])]
        if len(turns) >= 2 and 8 <= len(turns[0]) <= 200 and 8 <= len(turns[1]) <= 200:
            pairs.append((turns[0], turns[1]))
    rng.shuffle(pairs)
    replies = [r for _, r in pairs]
    out = []
    for opening, reply in pairs[:N]:
        others = rng.sample([r for r in replies if r != reply], 3)
        choices = others + [reply]
        rng.shuffle(choices)
        out.append({"context": f"A: {opening}\nB:", "choices": [" " + c for c in choices],
                    "label": choices.index(reply)})
    return out


def main() -> None:
    for name, build in (("home_kjv_cloze", kjv_cloze), ("home_chitchat_reply", chitchat_reply)):
        rows = build(random.Random(f"models-at-home/{name}"))
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
        print(f"{name}: {len(rows)} items")


if __name__ == "__main__":
    main()
