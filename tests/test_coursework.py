"""Coursework rules judged on the real inputs: instruction data in phase 1 by its content (chat markup, speaker
turns, prompt/response records), a pretrained tokenizer kept as it is, and phase 2 on phase 1's own tokenizer."""

import json
import shutil

import pytest

from lib.config import from_dict
from lib.data.prepare import run_data
from lib.data.tokenizer import run_tokenizer
from lib.errors import UserError
from lib.train.coursework import check_coursework_phase1, check_coursework_phase2, instruction_evidence

PLAIN = ["In the beginning God created the heaven and the earth.", "And the earth was without form, and void.",
         "Whatsoever thy hand findeth to do, do it with thy might."] * 20


def config(tmp_path, corpus: str, **extra):
    data = {"sources": [{"type": "files", "path": corpus, "txt_mode": "paragraph"}], "val_fraction": 0.0,
            "near_dedup": {"enabled": False}, "dedup": False}
    return from_dict({"artifacts_dir": str(tmp_path / "artifacts"), "data": data, "coursework": {"enabled": True},
                      "tokenizer": {"pretrained": "gpt2"}, **extra}, base_dir=str(tmp_path))


def prepared(tmp_path, name: str, text: str):
    (tmp_path / name).write_text(text, encoding="utf-8")
    cfg = config(tmp_path, name)
    return cfg, run_data(cfg), run_tokenizer(cfg)


def test_chat_markup_is_found_and_scripture_is_not():
    assert instruction_evidence(PLAIN)["with_markers"] == 0
    found = instruction_evidence([*PLAIN, "User: hi there\nAssistant: hello!", "<|im_start|>user\nhi<|im_end|>",
                                  "### Instruction:\nsum 2+2\n### Response:\n4", "Moses said unto the LORD: lo"])
    assert found["scanned"] == 64 and found["with_markers"] == 3 and found["example"] == "User: hi there"


def test_phase1_refuses_dialogs_hidden_in_a_text_file(tmp_path):
    dialogs = "\n\n".join(f"User: question {i}?\nAssistant: answer {i}." for i in range(10))
    cfg, data_dir, tok_dir = prepared(tmp_path, "corpus.txt", "\n\n".join(PLAIN) + "\n\n" + dialogs + "\n")
    with pytest.raises(UserError, match=r"10 of the first 70 phase-1 documents contain chat markup .*'User: question"):
        check_coursework_phase1(cfg, data_dir, tok_dir)


def test_phase1_refuses_instruction_records_whatever_the_text_field(tmp_path):
    rows = [{"instruction": f"Say the number {i}", "output": f"{i}", "text": f"Say the number {i}: it is {i}."}
            for i in range(5)]
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path, "alpaca.jsonl")
    with pytest.raises(UserError, match=r"alpaca.jsonl:1 \(record 1\) is alpaca instruction/dialog data \(instruction, "
                                        r"output, text\)"):
        check_coursework_phase1(cfg, run_data(cfg), run_tokenizer(cfg))


def test_phase1_passes_plain_text_and_records_what_it_checked(tmp_path):
    cfg, data_dir, tok_dir = prepared(tmp_path, "corpus.txt", "\n\n".join(PLAIN) + "\n")
    ok = check_coursework_phase1(cfg, data_dir, tok_dir)
    assert ok["checked"] == "passed" and ok["instruction_markup_found"] == "0 of 60 documents"
    assert ok["tokenizer"] == "gpt2: 50,257 tokens and their merges unchanged"
    # a retrained (edited) vocabulary is refused
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    tok["model"]["vocab"]["Hello"], tok["model"]["vocab"]["hello"] = tok["model"]["vocab"]["hello"], tok["model"]["vocab"]["Hello"]
    (tok_dir / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="vocabulary or merges differ from 'gpt2'"):
        check_coursework_phase1(cfg, data_dir, tok_dir)


def test_phase2_uses_phase1_tokenizer_byte_for_byte(tmp_path):
    cfg, _, tok_dir = prepared(tmp_path, "corpus.txt", "\n\n".join(PLAIN) + "\n")
    phase1 = tmp_path / "phase1"
    shutil.copytree(tok_dir, phase1)
    cfg.sft.train.max_epochs = 1
    assert check_coursework_phase2(cfg, phase1, tok_dir)["tokenizer"] == "phase 1's, byte-identical"
    (phase1 / "tokenizer.json").write_text((phase1 / "tokenizer.json").read_text().replace('"Hello"', '"HELLO"', 1))
    with pytest.raises(UserError, match="differs from the pipeline's tokenizer"):
        check_coursework_phase2(cfg, phase1, tok_dir)
