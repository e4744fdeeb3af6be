"""Coursework rules: what a recipe promises its teacher, checked before each training phase on the real inputs
(not only on the config), recorded in the phase's manifest and shown in the report card.

Phase 1: random initialisation, plain text only (no instruction or dialog data: judged by the source type, by the
records of local files, and by chat markup or speaker turns in the prepared documents), a pretrained tokenizer's
vocabulary and merges kept as they are, an epoch limit, CPU only. Phase 2: the student's own phase-1 model and its
tokenizer unchanged, an epoch limit, CPU only.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path

from lib.config import Config
from lib.data.prepare import iter_documents
from lib.data.records import resolve_files
from lib.data.sft_data import detect_format, read_file_records
from lib.data.tokenizer import pretrained_tokenizer
from lib.errors import UserError
from lib.fingerprint import sha256_file

# Chat markup and speaker turns: ChatML, Llama's [INST], Alpaca's ### headers, "User:" / "Assistant:" lines.
CHAT_MARKUP = re.compile(r"<\|im_start\|>|<\|im_end\|>|\[/?INST\]|<\|(?:user|assistant|system)\|>"
                         r"|^#{2,3} ?(?:Instruction|Response|Human|Assistant)\b"
                         r"|^(?:User|Assistant|Human|AI|System|Bot) ?:", re.M | re.I)
# SFT record shapes (lib.data.sft_data.detect_format) that are instruction or dialog data
INSTRUCTION_FORMATS = ("openai", "sharegpt", "alpaca", "prompt_completion", "squad", "qa", "dialog", "chitchat")


def instruction_evidence(texts: Iterable[str], limit: int = 5000) -> dict:
    """How many of the first `limit` texts contain chat markup or speaker turns, with the first such line."""
    scanned = with_markers = 0
    example = None
    for text in itertools.islice(texts, limit):
        scanned += 1
        m = CHAT_MARKUP.search(text)
        if m:
            with_markers += 1
            if example is None:
                start = text.rfind("\n", 0, m.start()) + 1
                end = text.find("\n", m.end())
                example = text[start:end if end >= 0 else None][:80]
    return {"scanned": scanned, "with_markers": with_markers, "example": example}


def _instruction_records(cfg: Config, per_file: int = 20) -> list[str]:
    """Local corpus files whose records have an instruction or dialog shape (prompt/response fields, messages)."""
    problems = []
    for i, src in enumerate(cfg.data.sources):
        if src.type != "files":
            continue
        for path in resolve_files(src.path, cfg.base_dir, f"data.sources[{i}].path"):
            for where, rec in itertools.islice(read_file_records(path), per_file):
                fmt = detect_format(rec)
                if fmt in INSTRUCTION_FORMATS:
                    fields = ", ".join(sorted(rec)) if isinstance(rec, dict) else "a list of turns"
                    problems.append(f"data.sources[{i}]: {where} is {fmt} instruction/dialog data ({fields}); "
                                    "coursework.phase1_no_instruction_data allows plain text only in phase 1")
                    break
    return problems


def _pretrained_vocab_kept(cfg: Config, tokenizer_dir: Path, problems: list[str]) -> str:
    """The pipeline's tokenizer keeps the pretrained one's vocabulary and merges (the chat markers may be appended
    after them: they are new ids, not a retrained vocabulary)."""
    theirs = json.loads(pretrained_tokenizer(cfg.tokenizer.pretrained, cfg.base_dir).backend_tokenizer.to_str())["model"]
    ours = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if ours.get("vocab") != theirs.get("vocab") or ours.get("merges") != theirs.get("merges"):
        problems.append(f"{tokenizer_dir / 'tokenizer.json'}: its vocabulary or merges differ from "
                        f"{cfg.tokenizer.pretrained!r}; coursework.tokenizer_not_retrained keeps the pretrained "
                        "tokenizer as it is")
    return f"{cfg.tokenizer.pretrained}: {len(theirs.get('vocab') or {}):,} tokens and their merges unchanged"


def check_coursework_phase1(cfg: Config, data_dir: Path, tokenizer_dir: Path) -> dict:
    """Coursework rules for phase 1, checked before training on the prepared corpus (data_dir, 01_data) and the
    tokenizer (tokenizer_dir, 02_tokenizer); the result goes into the manifest and the report card."""
    rules = cfg.coursework
    if not rules.enabled:
        return {"enabled": False}
    problems, found = [], {}
    if rules.phase1_no_instruction_data:
        chat = [i for i, s in enumerate(cfg.data.sources) if s.type == "chitchat"]
        if chat:
            problems.append(f"data.sources[{chat[0]}] is instruction/dialog data (chitchat), but "
                            "coursework.phase1_no_instruction_data forbids it in phase 1")
        problems += _instruction_records(cfg)
        found = instruction_evidence(iter_documents(data_dir, "train"))
        if found["with_markers"] >= max(3, 0.01 * found["scanned"]):
            problems.append(f"{found['with_markers']} of the first {found['scanned']} phase-1 documents contain chat "
                            f"markup or speaker turns (e.g. {found['example']!r}); coursework.phase1_no_instruction_data "
                            "allows plain text only in phase 1")
    tokenizer = None
    if rules.tokenizer_not_retrained and cfg.tokenizer.pretrained:
        tokenizer = _pretrained_vocab_kept(cfg, tokenizer_dir, problems)
    if rules.max_epochs_phase1 is not None:
        t = cfg.pretrain
        if t.max_epochs is None or t.max_epochs > rules.max_epochs_phase1:
            problems.append(f"pretrain.max_epochs must be set and <= coursework.max_epochs_phase1 "
                            f"({rules.max_epochs_phase1}), got {t.max_epochs}")
    if rules.cpu_only and cfg.pretrain.precision == "fp16":
        problems.append("pretrain.precision: fp16 is a GPU mode, but coursework.cpu_only is set")
    if problems:
        raise UserError("coursework rules violated:\n  " + "\n  ".join(problems))
    return {"enabled": True, "phase1_random_init": True, "phase1_no_instruction_data": rules.phase1_no_instruction_data,
            "instruction_markup_found": f"{found['with_markers']} of {found['scanned']} documents" if found else None,
            "tokenizer": tokenizer, "max_epochs_phase1": rules.max_epochs_phase1, "cpu_only": rules.cpu_only,
            "checked": "passed"}


def check_coursework_phase2(cfg: Config, phase1_dir: Path | None = None, tokenizer_dir: Path | None = None) -> dict:
    """Coursework rules for phase 2, checked before training; the result goes into the manifest. With the phase-1
    model's folder and the 02_tokenizer folder, also that phase 2 uses phase 1's tokenizer unchanged."""
    rules = cfg.coursework
    if not rules.enabled:
        return {"enabled": False}
    t, problems = cfg.sft.train, []
    if rules.max_epochs_phase2 is not None:
        # sft.repeat lists every example `repeat` times per epoch: those are real passes over the data too
        passes = None if t.max_epochs is None else t.max_epochs * cfg.sft.repeat
        if passes is None or passes > rules.max_epochs_phase2:
            problems.append(f"sft.train.max_epochs must be set and sft.train.max_epochs x sft.repeat <= "
                            f"coursework.max_epochs_phase2 ({rules.max_epochs_phase2}); got {t.max_epochs} x "
                            f"{cfg.sft.repeat}")
    if rules.phase1_random_init and cfg.sft.base_model is not None:
        problems.append(f"sft.base_model is {cfg.sft.base_model!r}, but a coursework's phase 2 tunes its own phase-1 "
                        "model (coursework.phase1_random_init); leave sft.base_model unset")
    if rules.cpu_only and (cfg.sft.lora.qlora or t.precision == "fp16"):
        problems.append("sft.lora.qlora / sft.train.precision fp16 are GPU modes, but coursework.cpu_only is set")
    tokenizer = None
    if rules.tokenizer_not_retrained and phase1_dir is not None and tokenizer_dir is not None:
        same = sha256_file(phase1_dir / "tokenizer.json") == sha256_file(tokenizer_dir / "tokenizer.json")
        if not same:
            problems.append(f"{phase1_dir / 'tokenizer.json'} differs from the pipeline's tokenizer "
                            f"({tokenizer_dir / 'tokenizer.json'}); coursework.tokenizer_not_retrained: phase 2 uses "
                            "phase 1's tokenizer unchanged")
        tokenizer = "phase 1's, byte-identical"
    if problems:
        raise UserError("coursework rules violated:\n  " + "\n  ".join(problems))
    return {"enabled": True, "max_epochs_phase2": rules.max_epochs_phase2, "max_epochs": t.max_epochs,
            "repeat": cfg.sft.repeat, "base": "phase-1 model", "tokenizer": tokenizer, "cpu_only": rules.cpu_only,
            "checked": "passed"}
