"""Phase 2: data formats and their errors, chat rendering = apply_chat_template, assistant-only masks, truncation,
batches, the overfitting detector, LoRA on the real SmolLM2-135M, and the full stage end to end on a tiny model."""

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lib import ROOT
from lib.config import LoraConfig, SftConfig, SftDataConfig, load_config
from lib.data.sft_data import UNANSWERABLE, Example, load_sft_examples
from lib.errors import UserError
from lib.stages import stage_dir
from lib.train.sft import overfit_decision
from lib.train.sft_batches import SftBatches, encode_conversations, encode_examples, fit_length, pack, split_examples

SMOKE = ROOT / "config" / "smoke.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    from lib.data.tokenizer import load_tokenizer

    return load_tokenizer(tiny_chat_model)


def load(tmp_path, name, content, fmt="auto", **kw):
    path = tmp_path / name
    if isinstance(content, (bytes, str)):
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    sft = SftConfig(data=[SftDataConfig(type="files", path=str(path), format=fmt, **kw)])
    return load_sft_examples(sft, str(tmp_path))


def jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records)


# ---------------------------------------------------------------------------------------------------------
# Formats


def test_alpaca_with_and_without_input(tmp_path):
    exs, info = load(tmp_path, "a.jsonl", jsonl([
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}]))
    assert info[0]["format"] == "alpaca"
    assert exs[0].messages == [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    assert exs[1].messages[0]["content"] == "Translate.\n\nBonjour"
    # Dolly's spelling of the same thing
    exs, info = load(tmp_path, "d.jsonl", jsonl([{"instruction": "Sum", "context": "2 and 2", "response": "4"}]))
    assert info[0]["format"] == "alpaca" and exs[0].messages[0]["content"] == "Sum\n\n2 and 2"


def test_sharegpt_json_array(tmp_path):
    exs, info = load(tmp_path, "s.json", json.dumps([{"conversations": [
        {"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]}]))
    assert info[0]["format"] == "sharegpt"
    assert [m["role"] for m in exs[0].messages] == ["system", "user", "assistant", "user", "assistant"]


def test_openai_messages_with_system_and_content_parts(tmp_path):
    exs, info = load(tmp_path, "o.jsonl", jsonl([{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello!"}]}]))
    assert info[0]["format"] == "openai"
    assert exs[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert exs[0].messages[1]["content"] == "Hi"


def test_prompt_completion_and_qa_csv(tmp_path):
    exs, info = load(tmp_path, "p.jsonl", jsonl([{"prompt": "2+2=", "completion": "4"}]))
    assert info[0]["format"] == "prompt_completion" and exs[0].messages[1]["content"] == "4"
    with open(tmp_path / "qa.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["question", "answer"], ["Capital of France?", "Paris."], ["Two lines?", "one\ntwo"]])
    exs, info = load(tmp_path, "qa.csv", None)
    assert info[0]["format"] == "qa" and exs[1].messages[1]["content"] == "one\ntwo"


def test_squad_hf_layout_and_v2_unanswerable(tmp_path):
    exs, info = load(tmp_path, "sq.jsonl", jsonl([
        {"context": "Paris is in France.", "question": "Where is Paris?",
         "answers": {"text": ["in France"], "answer_start": [9]}},
        {"context": "Paris is in France.", "question": "Who is king?", "answers": {"text": [], "answer_start": []}}]))
    assert info[0]["format"] == "squad"
    assert exs[0].messages[0]["content"] == "Paris is in France.\n\nQuestion: Where is Paris?"
    assert exs[0].messages[1]["content"] == "in France"
    assert exs[1].messages[1]["content"] == UNANSWERABLE


def test_squad_original_nested_json(tmp_path):
    data = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "The sky is blue.", "qas": [
        {"id": "q1", "question": "Colour?", "answers": [{"text": "blue", "answer_start": 11}], "is_impossible": False},
        {"id": "q2", "question": "Size?", "answers": [], "is_impossible": True}]}]}]}
    exs, info = load(tmp_path, "squad.json", json.dumps(data))
    assert info[0]["format"] == "squad" and len(exs) == 2
    assert exs[0].messages[1]["content"] == "blue" and exs[1].messages[1]["content"] == UNANSWERABLE
    assert "id q2" in exs[1].where


def test_dialog_lists_alternate_roles(tmp_path):
    exs, info = load(tmp_path, "dd.jsonl", jsonl([{"dialog": ["Hi! ", "Hello, how are you?", "Fine."], "act": [1, 2, 3]}]))
    assert info[0]["format"] == "dialog"
    assert [m["role"] for m in exs[0].messages] == ["user", "assistant", "user"]
    exs, _ = load(tmp_path, "bare.json", json.dumps([["A", "B"], ["C", "D", "E", "F"]]))
    assert exs[1].messages[-1] == {"role": "assistant", "content": "F"}


def test_plain_text_txt_and_jsonl(tmp_path):
    exs, info = load(tmp_path, "t.txt", "First paragraph\nstill first.\n\nSecond one.\n")
    assert info[0]["format"] == "text" and [e.text for e in exs] == ["First paragraph\nstill first.", "Second one."]
    exs, info = load(tmp_path, "t.jsonl", jsonl([{"text": "hello"}]))
    assert info[0]["format"] == "text" and exs[0].messages is None


def test_parquet_and_max_examples(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["a", "b", "c"], "input": ["", "", ""], "output": ["1", "2", "3"]}),
                   tmp_path / "x.parquet")
    exs, info = load(tmp_path, "x.parquet", None, max_examples=2)
    assert info[0]["format"] == "alpaca" and [e.messages[1]["content"] for e in exs] == ["1", "2"]


def test_chitchat_layout_merges_consecutive_sender_turns(tmp_path):
    rec = {"messages": [[{"text": "Hi", "sender": "a"}], [{"text": "there", "sender": "a"}],
                        [{"text": "Hello", "sender": "b"}, {"text": "you?", "sender": "b"}], [{"text": "ok", "sender": "a"}]]}
    solo = {"messages": [[{"text": "anyone?", "sender": "a"}]]}  # one speaker: nothing to learn, skipped and counted
    exs, info = load(tmp_path, "c.json", json.dumps({"id1": rec, "id2": solo}))
    assert info[0]["format"] == "chitchat" and info[0]["skipped_no_reply"] == 1
    assert exs[0].messages == [{"role": "user", "content": "Hi\nthere"},
                               {"role": "assistant", "content": "Hello\nyou?"}, {"role": "user", "content": "ok"}]


def test_embedded_chitchat_source_and_system_prompt():
    sft = SftConfig(data=[SftDataConfig(type="chitchat", max_examples=5)], system_prompt="You are friendly.")
    exs, info = load_sft_examples(sft)
    assert len(exs) == 5 and info[0]["format"] == "chitchat"
    assert all(e.messages[0] == {"role": "system", "content": "You are friendly."} for e in exs)
    assert all(m["role"] != "system" for e in exs for m in e.messages[1:])


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_inconsistent_record_names_file_line_and_expectation(tmp_path):
    with pytest.raises(UserError) as e:
        load(tmp_path, "bad.jsonl", jsonl([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"},
                                           {"instruction": "e", "answer": "f"}]))
    msg = str(e.value)
    assert f"{tmp_path / 'bad.jsonl'}:3 (record 3)" in msg and "not a valid alpaca record" in msg
    assert "'output', 'response'" in msg
    for fmt in ("alpaca", "sharegpt", "openai", "prompt_completion", "qa", "squad", "dialog", "text"):
        assert f"\n  {fmt} " in msg  # every supported format listed with an example


def test_unrecognised_record_lists_formats(tmp_path):
    with pytest.raises(UserError) as e:
        load(tmp_path, "u.jsonl", jsonl([{"foo": 1, "bar": 2}]))
    assert "record 1" in str(e.value) and "cannot tell the format" in str(e.value)
    assert '{"prompt": "2+2=", "completion": "4"}' in str(e.value)


def test_forced_format_that_does_not_match(tmp_path):
    with pytest.raises(UserError, match=r"not a valid sharegpt record \(field 'conversations'"):
        load(tmp_path, "f.jsonl", jsonl([{"prompt": "a", "completion": "b"}]), fmt="sharegpt")


def test_bad_roles_and_system_in_the_middle(tmp_path):
    with pytest.raises(UserError, match=r"messages\[1\]\.role is 'wizard'"):
        load(tmp_path, "r.jsonl", jsonl([{"messages": [{"role": "user", "content": "a"},
                                                       {"role": "wizard", "content": "b"}]}]))
    with pytest.raises(UserError, match="a system prompt may only come first"):
        load(tmp_path, "s.jsonl", jsonl([{"messages": [{"role": "user", "content": "a"}, {"role": "system",
                                                       "content": "b"}, {"role": "assistant", "content": "c"}]}]))


def test_invalid_json_and_empty_dataset(tmp_path):
    with pytest.raises(UserError, match=r"b\.jsonl:2: invalid JSON: Expecting value"):  # the corpus reader's words
        load(tmp_path, "b.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(UserError, match="no usable examples .all 1 records lack an assistant reply"):
        load(tmp_path, "e.jsonl", jsonl([{"messages": [{"role": "user", "content": "alone"}]}]))
    with pytest.raises(UserError, match="no usable examples .the source has no records"):
        load(tmp_path, "empty.json", "[]")


def test_hub_dataset_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sft = SftConfig(data=[SftDataConfig(type="hf", name="tatsu-lab/alpaca")])
    t0 = time.time()
    with pytest.raises(UserError, match=r"sft\.data\[0\].*tatsu-lab/alpaca.*offline"):
        load_sft_examples(sft)
    assert time.time() - t0 < 5


# ---------------------------------------------------------------------------------------------------------
# Rendering, masks, truncation


CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who made the light?"},
        {"role": "assistant", "content": "God made the light."}, {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "He divided\nthe light from the darkness."}]


def test_training_ids_equal_apply_chat_template(tok):
    convs = [CONV, CONV[1:3], [{"role": "user", "content": " spaces  "}, {"role": "assistant", "content": "\nx "}]]
    for conv, enc in zip(convs, encode_conversations(tok, convs)):
        assert enc.ids.tolist() == tok.apply_chat_template(conv, tokenize=True, return_dict=False)


def test_mask_covers_exactly_the_assistant_turns_and_their_end_token(tok):
    enc = encode_conversations(tok, [CONV])[0]
    trained = tok.decode(enc.ids[enc.mask].tolist())
    assert trained == "God made the light.<|im_end|>He divided\nthe light from the darkness.<|im_end|>"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [int(enc.ids[k - 1]) for k in enc.turn_ends] == [im_end, im_end]
    assert enc.mask[enc.turn_ends[0] - 1] and not enc.mask[enc.turn_ends[0]]  # the "\n" after <|im_end|> is not trained


def test_truncation_never_leaves_a_turn_without_its_end_token(tok):
    enc = encode_conversations(tok, [CONV])[0]
    first, second = enc.turn_ends
    assert len(enc.ids) > second  # the final "\n" comes after the last end token
    for max_len in range(first, second):  # room for the first turn but not the second: cut after the first
        out, truncated = fit_length(enc, max_len)
        assert truncated and len(out.ids) == first and out.mask[-1] and out.turn_ends == [first]
    out, truncated = fit_length(enc, first - 1)  # not even one turn fits: dropped
    assert out is None and truncated
    out, truncated = fit_length(enc, len(enc.ids))  # fits: unchanged
    assert out is enc and not truncated
    # a conversation ending with a user turn loses that turn (no loss in it), without counting as truncated
    trailing = encode_conversations(tok, [CONV[:4]])[0]
    out, truncated = fit_length(trailing, 10_000)
    assert not truncated and len(out.ids) == first


def test_rendering_a_prefix_of_long_conversations_changes_nothing(tok):
    exs, _ = load_sft_examples(SftConfig(data=[SftDataConfig(type="chitchat", max_examples=40)]))
    convs = [e.messages for e in exs]
    for max_len in (24, 60, 200):
        capped = [fit_length(e, max_len) for e in encode_conversations(tok, convs, max_len)]
        full = [fit_length(e, max_len) for e in encode_conversations(tok, convs)]
        for (a, ta), (b, tb) in zip(capped, full):
            assert ta == tb and (a is None) == (b is None)
            if a is not None:
                assert np.array_equal(a.ids, b.ids) and np.array_equal(a.mask, b.mask)
    # the cap really cut something at the shortest length (or this test would check nothing)
    assert sum(len(e.ids) for e in encode_conversations(tok, convs, 24)) < 0.5 * sum(
        len(e.ids) for e in encode_conversations(tok, convs))


def test_encode_stats_and_text_windows(tok):
    long_text = "And God said, Let there be light: and there was light. " * 20
    exs = [Example(messages=CONV), Example(text=long_text)]
    max_len = encode_conversations(tok, [CONV])[0].turn_ends[0] + 2  # the first turn fits, the second does not
    encs, stats = encode_examples(tok, exs, max_len=max_len)
    text_windows = [e for e in encs if e.mask.all()]
    assert len(text_windows) > 1 and all(len(e.ids) <= max_len for e in encs)
    total = len(tok(long_text, add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert sum(len(e.ids) - 1 for e in text_windows) == total - 1  # every token predicted exactly once
    assert stats.examples == len(encs) and stats.truncated == 1 and stats.turns == 1


def test_packing_keeps_examples_whole_and_targets_inside_them(tok):
    convs = [CONV[1:3], CONV[3:5], CONV[1:3], CONV[1:5], CONV[3:5]]
    encs, _ = encode_examples(tok, [Example(messages=c) for c in convs], max_len=128)
    rows = pack(encs, max_len=128, seed=0)
    assert all(len(r.ids) <= 128 for r in rows) and len(rows) < len(encs)
    assert sum(len(r.ids) for r in rows) == sum(len(e.ids) for e in encs)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    for r in rows:  # the first token of each packed example is never a target
        assert not r.mask[r.ids == im_start].any()
    assert sum(int(r.mask.sum()) for r in rows) == sum(int(e.mask[1:].sum()) for e in encs)


def test_split_is_deterministic_and_order_independent():
    exs = [Example(messages=[{"role": "user", "content": str(i)}, {"role": "assistant", "content": "x"}])
           for i in range(200)]
    train, val = split_examples(exs, 0.1, seed=1)
    assert 5 < len(val) < 40 and len(train) + len(val) == 200
    train2, val2 = split_examples(list(reversed(exs)), 0.1, seed=1)
    assert {e.key() for e in val} == {e.key() for e in val2}
    assert split_examples(exs[:2], 0.01, seed=1)[1]  # at least one validation example


def test_batches_are_pure_resumable_and_world_size_invariant(tok):
    encs = encode_conversations(tok, [CONV[1:3], CONV[1:5], CONV[3:5], CONV] * 3)
    b = SftBatches(encs, batch_size=4, grad_accum=1, seed=3, pad_id=tok.pad_token_id)
    again = SftBatches(encs, batch_size=4, grad_accum=1, seed=3, pad_id=tok.pad_token_id)
    assert torch.equal(b.get(7, 0, 0, 1)["x"], again.get(7, 0, 0, 1)["x"])  # no hidden state
    one = SftBatches(encs, batch_size=4, grad_accum=1, seed=3, pad_id=0)
    two = SftBatches(encs, batch_size=2, grad_accum=1, seed=3, pad_id=0)
    whole = one.get(5, 0, 0, 1)
    halves = [two.get(5, 0, r, 2) for r in (0, 1)]
    for k in ("y", "mask"):
        got = [h[k][i] for h in halves for i in range(2)]
        want = [whole[k][i] for i in range(4)]
        for g, w in zip(got, want):
            n = min(len(g), len(w))
            assert torch.equal(g[:n], w[:n])
    x = b.get(0, 0, 0, 1)
    assert x["x"].shape == x["y"].shape == x["mask"].shape
    assert torch.equal(x["x"][:, 1:], x["y"][:, :-1])  # y is x shifted by one
    # one epoch sees every example once; repeat=3 sees each three times
    for repeat in (1, 3):
        rb = SftBatches(encs, batch_size=1, grad_accum=1, seed=3, pad_id=0, repeat=repeat)
        seen = [rb._index(i) for i in range(len(encs) * repeat)]
        assert sorted(seen) == sorted(list(range(len(encs))) * repeat)
        assert rb.tokens_per_epoch == len(encs) * repeat * rb.mean_len
    assert len(list(b.eval_batches(2))) == 2 and len(list(b.eval_batches(100))) == 3


# ---------------------------------------------------------------------------------------------------------
# The overfitting detector


def hist(vals, trains):
    return [{"step": 10 * i, "val_loss": v, "train_loss": t} for i, (v, t) in enumerate(zip(vals, trains))]


@pytest.mark.parametrize("vals,trains,expected", [
    ([3.0, 2.5, 2.2, 2.0], [3.1, 2.6, 2.2, 1.9], "continue"),  # healthy: both falling, small gap
    ([2.0, 2.1, 2.2], [1.9, 1.8, 1.8], "moderate overfitting"),  # val rising, gap 0.4 < 0.5
    ([3.0, 2.5, 2.2], [2.0, 1.6, 1.2], "moderate overfitting"),  # gap 1.0 but val still falling
    ([2.0, 2.1, 2.3], [1.5, 1.4, 1.0], "moderate overfitting"),  # both signs, once (patience 2)
    ([2.0, 2.1, 2.3, 2.6], [1.5, 1.4, 1.0, 0.8], "stop"),  # both signs at two consecutive evals
    ([2.0], [0.5], "moderate overfitting"),  # a single eval: only the gap can be judged
    ([2.0, 2.1], [1.9, 1.9], "continue"),  # fewer evals than the window: no trend yet
])
def test_detector_decisions(vals, trains, expected):
    decision, why = overfit_decision(hist(vals, trains), window=3, gap=0.5, patience=2)
    assert decision == expected, why


def test_detector_without_train_loss_and_empty_history():
    assert overfit_decision([], 3, 0.5, 2)[0] == "continue"
    h = [{"step": s, "val_loss": v, "train_loss": None} for s, v in ((1, 1.0), (2, 1.1), (3, 1.2))]
    assert overfit_decision(h, 3, 0.5, 2)[0] == "moderate overfitting"


# ---------------------------------------------------------------------------------------------------------
# LoRA on the real SmolLM2-135M-Instruct (converted from its GGUF by the smollm2_hf fixture)


@pytest.mark.slow
def test_smollm2_template_rendering_and_lora_lowers_val_loss(smollm2_hf, tmp_path):
    from accelerate import Accelerator

    from lib.chat import prepare_tokenizer, template_render
    from lib.config import TrainConfig
    from lib.data.tokenizer import load_tokenizer
    from lib.train.base_model import apply_lora, load_base
    from lib.train.loop import Run, evaluate, fit

    tok = prepare_tokenizer(load_tokenizer(smollm2_hf), str(smollm2_hf))
    # its own template (ChatML plus a default system prompt) goes the generic way: ids still equal the template's
    text, spans = template_render(tok, CONV[1:])
    assert "You are a helpful AI assistant named SmolLM" in text
    enc = encode_conversations(tok, [CONV[1:]])[0]
    assert enc.ids.tolist() == tok.apply_chat_template(CONV[1:], tokenize=True, return_dict=False)
    assert tok.decode(enc.ids[enc.mask].tolist()).count("<|im_end|>") == 2

    facts = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
             ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago")]
    exs = [Example(messages=[{"role": "user", "content": f"Capital of {c}?"},
                             {"role": "assistant", "content": f"Answer: the capital of {c} is {a}. Done."}])
           for c, a in facts]
    encs, _ = encode_examples(tok, exs, max_len=64)
    train = SftBatches(encs[:6], batch_size=2, grad_accum=1, seed=0, pad_id=tok.pad_token_id)
    val = SftBatches(encs[6:], batch_size=2, grad_accum=1, seed=0, pad_id=tok.pad_token_id)

    model, kind = load_base(smollm2_hf)
    assert kind == "homellm" and model.num_params() == 134_515_008
    peft_model, info = apply_lora(model, LoraConfig(enabled=True), model.num_params())
    assert info["rank"] == 16 and info["alpha"] == 32 and info["trainable_params"] < 0.05 * model.num_params()
    accelerator = Accelerator(cpu=True)
    before = evaluate(model, val, 1, accelerator)
    cfg = TrainConfig(seq_len=64, batch_size=2, lr=2e-3, min_lr=2e-4, warmup_steps=1, max_steps=4, eval_every=2,
                      eval_batches=1, ckpt_every=100, log_every=1, sample_prompts=[], precision="fp32")
    res = fit(model, train, val, Run(cfg, tmp_path / "work", accelerator, seed=0, precision_note="fp32",
                                     world_batch_tokens=2 * train.mean_len,
                                     flops_per_token=model.estimate_flops_per_token(64), config_name="sft.train"))
    losses = [before] + [h["val_loss"] for h in res.history]
    assert losses[-1] < before - 0.3, losses
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "model.embed_tokens.weight" in frozen and any("base_layer" in n for n in frozen)


# ---------------------------------------------------------------------------------------------------------
# The stage, end to end on a tiny model


def sft_cfg(tmp_path, base: Path, *extra):
    return load_config(SMOKE, [f"artifacts_dir={tmp_path / 'artifacts'}", f"sft.base_model={base}",
                               "sft.train.precision=fp32", "sft.train.max_steps=8", "sft.train.seq_len=128", "sft.train.eval_every=4",
                               "sft.train.ckpt_every=4", "sft.train.sample_tokens=8",
                               "sft.data=[{type: chitchat, max_examples: 60}]", *extra])


@pytest.mark.slow
def test_full_sft_stage_end_to_end(tiny_chat_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lib.train.sft import run_sft

    cfg = sft_cfg(tmp_path, tiny_chat_model)
    out = run_sft(cfg)
    assert out == stage_dir(cfg, "04_sft")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "metrics.jsonl", "manifest.json"):
        assert (out / name).is_file(), name
    log = capsys.readouterr().out
    assert "train: " in log and "truncated" in log and "end-of-turn check:" in log and "  Q: Hi! How are you?" in log
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode"] == "full" and manifest["steps"] == 8
    assert 0.0 <= manifest["end_of_turn"]["share_ended_turn"] <= 1.0 and len(manifest["end_of_turn"]["answers"]) == 8
    assert manifest["data"]["sources"][0]["format"] == "chitchat" and manifest["coursework"] == {"enabled": False}
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in x]
    assert [e["step"] for e in evals] == [4, 8] and all(e["decision"] in ("continue", "moderate overfitting")
                                                        for e in evals)

    tok = AutoTokenizer.from_pretrained(out)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    assert tok.apply_chat_template(CONV, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama"
    # the weights changed (full fine-tuning), and a second call reuses the finished stage
    from safetensors.torch import load_file

    before, after = load_file(str(tiny_chat_model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    mtime = (out / "manifest.json").stat().st_mtime
    run_sft(cfg)
    assert (out / "manifest.json").stat().st_mtime == mtime


@pytest.mark.slow
def test_lora_stage_adapter_and_merge_agree_with_peft_on_transformers(tiny_chat_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lib.train.sft import run_sft

    cfg = sft_cfg(tmp_path, tiny_chat_model, "sft.lora.enabled=true", "sft.lora.rank=4", "sft.train.lr=0.01",
                  "sft.train.max_steps=4")
    out = run_sft(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode"] == "lora" and manifest["lora"]["rank"] == 4 and manifest["lora"]["alpha"] == 8
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval()
    with torch.no_grad():
        a, b, c = with_adapter(ids).logits, merged(ids).logits, plain(ids).logits
    assert torch.allclose(a, b, atol=1e-5)  # our merged weights = peft's adapter on transformers' Llama
    assert not torch.allclose(b, c, atol=1e-3)  # and the adapter did something


def test_default_base_needs_phase_1_and_qlora_needs_cuda(tmp_path):
    from lib.train.sft import train_sft

    cfg = load_config(SMOKE, [f"artifacts_dir={tmp_path}"])
    with pytest.raises(UserError, match="the 03_pretrain stage has not been run.*03_pretrain.py"):
        train_sft(cfg)
    cfg = load_config(SMOKE, [f"artifacts_dir={tmp_path}", "sft.lora.qlora=true"])
    # CPU-only CI: the CUDA message; on a GPU machine without bitsandbytes: the package message
    expected = "needs the bitsandbytes package" if torch.cuda.is_available() else "QLoRA .* needs a CUDA GPU"
    with pytest.raises(UserError, match=expected):
        train_sft(cfg)


def test_coursework_rules_checked_before_training(tiny_chat_model, tmp_path):
    from lib.train.coursework import check_coursework_phase2

    cfg = load_config(SMOKE, ["coursework.enabled=true", "sft.train.max_epochs=3"])
    with pytest.raises(UserError, match=r"max_epochs x sft.repeat <= coursework.max_epochs_phase2 \(2.0\); got 3.0"):
        check_coursework_phase2(cfg)
    cfg = load_config(SMOKE, ["coursework.enabled=true", "sft.train.max_epochs=1", "sft.repeat=3"])
    with pytest.raises(UserError, match="got 1.0 x 3"):
        check_coursework_phase2(cfg)
    cfg = load_config(SMOKE, ["coursework.enabled=true", "sft.train.max_epochs=1", f"sft.base_model={tiny_chat_model}"])
    with pytest.raises(UserError, match="tunes its own phase-1 model"):
        check_coursework_phase2(cfg)
    ok = check_coursework_phase2(load_config(SMOKE, ["coursework.enabled=true", "sft.train.max_epochs=2"]))
    assert ok["checked"] == "passed" and ok["max_epochs"] == 2.0


@pytest.mark.slow
def test_script_reports_user_errors_without_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl([{"oops": 1}]))
    res = subprocess.run([sys.executable, str(ROOT / "04_sft.py"), "--config", str(SMOKE), "--quiet-config",
                          "--set", f"artifacts_dir={tmp_path}", "--set", f"sft.base_model={tmp_path}",
                          "--set", f"sft.data=[{{type: files, path: {bad}}}]"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "not an HF model directory" in res.stderr


def test_base_model_from_the_hub(fake_hub, tiny_chat_model, tmp_path, monkeypatch):
    """A hub id as sft.base_model: downloaded through the real huggingface_hub client (a local fake hub answers);
    an unknown id and the offline mode give one clear message."""
    from lib.train.base_model import load_base, resolve_base_model

    fake_hub.add("someone/tiny-chat", tiny_chat_model)
    cfg = load_config(SMOKE, [f"artifacts_dir={tmp_path}", "sft.base_model=someone/tiny-chat"])
    path = resolve_base_model(cfg)
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    model, kind = load_base(path)
    assert kind == "homellm" and model.args.vocab_size == 512
    cfg = load_config(SMOKE, [f"artifacts_dir={tmp_path}", "sft.base_model=someone/missing"])
    with pytest.raises(UserError, match="sft.base_model: cannot download 'someone/missing'"):
        resolve_base_model(cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        resolve_base_model(cfg)
    cfg = load_config(SMOKE, [f"artifacts_dir={tmp_path}", "sft.base_model=./no/such/dir"])
    with pytest.raises(UserError, match="does not exist .relative paths resolve against the config file's directory"):
        resolve_base_model(cfg)
