"""Phase 3 (preference tuning): our DPO loss, rewards and gradients against TRL's DPOTrainer on the same model and
batch; ORPO's loss by its formula; the preference data formats and their errors; pairs as rows (the reply's tokens
only); and the stage itself on a tiny model (self-play pairs, metrics, before/after, resume)."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from lib.config import Config, PrefsConfig, PrefsDataConfig, from_dict
from lib.data.pref_data import PrefPair, load_pref_pairs
from lib.errors import UserError
from lib.model.hf_io import load_hf
from lib.train.prefs import PreferenceModel, encode_pairs, orpo_loss

PAIRS = [
    ("Hi! How are you?", "I am well, thank you.", "go away"),
    ("What is your name?", "They call me Home.", "name name name name"),
    ("Do you like music?", "Yes, songs of the sea most of all.", "no"),
]


def _perturbed_copy(src, dst):
    """The same model with every weight nudged (seeded): a policy that differs from its reference."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    tensors = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in tensors.items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_dpo_loss_rewards_and_gradients_equal_trl(tiny_chat_model, tmp_path, own_accelerate_state, sft_weight):
    """Plain sigmoid DPO, and DPO + the chosen replies' NLL (our sft_weight; TRL's loss_type=["sigmoid", "sft"])."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    policy_dir = _perturbed_copy(tiny_chat_model, tmp_path / "policy")
    tok = AutoTokenizer.from_pretrained(str(tiny_chat_model))
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]
    beta = 0.3
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight else {}
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to=[], use_cpu=True, max_length=None,
                     per_device_train_batch_size=len(rows), save_strategy="no", bf16=False, **losses)
    theirs = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32)
    trainer = DPOTrainer(model=theirs, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         ref_model=AutoModelForCausalLM.from_pretrained(str(tiny_chat_model), dtype=torch.float32))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    their_loss = trainer.compute_loss(trainer.model, batch)
    their_loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # ours: HomeLLM loaded from the same files, on the same token rows (B chosen, then B rejected)
    ids, mask = batch["input_ids"], batch["completion_mask"]
    pm = PreferenceModel(load_hf(policy_dir), PrefsConfig(beta=beta, sft_weight=sft_weight),
                         reference=load_hf(tiny_chat_model).eval())
    pm.train()
    _, loss = pm(ids[:, :-1], ids[:, 1:], mask[:, 1:].bool())
    loss.backward()
    s = pm.last
    assert abs(loss.item() - their_loss.item()) <= 1e-5
    assert abs(loss.item() - math.log(2)) > 1e-3  # the policy differs from the reference: not the trivial value
    assert abs(s["chosen_rewards"].mean().item() - metrics["rewards/chosen"]) <= 1e-5
    assert abs(s["rejected_rewards"].mean().item() - metrics["rewards/rejected"]) <= 1e-5
    margins = (s["chosen_rewards"] - s["rejected_rewards"])
    assert abs(margins.mean().item() - metrics["rewards/margins"]) <= 1e-5
    assert abs((margins > 0).float().mean().item() - metrics["rewards/accuracies"]) <= 1e-6
    assert abs(s["chosen_logps"].mean().item() - metrics["logps/chosen"]) <= 1e-4
    ours = dict(pm.policy.named_parameters())
    compared = 0
    for name, p in theirs.named_parameters():
        assert torch.allclose(ours[name].grad, p.grad, atol=1e-5, rtol=0), name
        compared += 1
    assert compared == len(ours)


def test_dpo_label_smoothing_and_orpo_follow_their_formulas():
    from lib.train.prefs import dpo_loss

    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5))
    h = 0.1 * ((-10 + 11) - (-12 + 11.5))
    loss, _, _ = dpo_loss(pc, pr, rc, rr, 0.1, 0.2)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert loss.item() == pytest.approx(-0.8 * math.log(sig(h)) - 0.2 * math.log(sig(-h)), abs=1e-6)
    mc, mr = torch.tensor([-0.5]), torch.tensor([-2.0])
    loss, log_odds = orpo_loss(mc, mr, -mc, 0.1)
    odds = lambda lp: lp - math.log(1 - math.exp(lp))  # noqa: E731
    assert log_odds.item() == pytest.approx(odds(-0.5) - odds(-2.0), abs=1e-6)
    assert loss.item() == pytest.approx(0.5 - 0.1 * math.log(sig(odds(-0.5) - odds(-2.0))), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Data.


def _prefs(path, fmt="auto") -> PrefsConfig:
    return PrefsConfig(data=[PrefsDataConfig(type="files", path=str(path), format=fmt)])


def test_the_three_formats_in_every_file_type_give_the_same_pairs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    hh = [{"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {p}\n\nAssistant: {r}"}
          for p, c, r in PAIRS]
    uf = [{"prompt": p, "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
           "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": r}], "score_chosen": 8.0,
           "score_rejected": 2.0} for p, c, r in PAIRS]
    uf_raw = [{"instruction": p, "completions": [{"response": r, "overall_score": 3}, {"response": c, "overall_score": 9},
                                                 {"response": r + "!", "overall_score": 5}]} for p, c, r in PAIRS]
    expected = [(p, c, r) for p, c, r in PAIRS]
    files = {"a.jsonl": plain, "b.json": hh, "c.jsonl": uf, "d.json": uf_raw}
    for name, records in files.items():
        path = tmp_path / name
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            path.write_text(json.dumps(records))
    with open(tmp_path / "e.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(plain)
    pq.write_table(pa.Table.from_pylist(plain), tmp_path / "f.parquet")
    formats = {"a.jsonl": "pairs", "b.json": "hh_rlhf", "c.jsonl": "ultrafeedback", "d.json": "ultrafeedback",
               "e.csv": "pairs", "f.parquet": "pairs"}
    for name, fmt in formats.items():
        pairs, sources = load_pref_pairs(_prefs(tmp_path / name), str(tmp_path))
        assert sources[0]["format"] == fmt and sources[0]["pairs"] == 3, name
        assert [(p.prompt[-1]["content"], p.chosen, p.rejected) for p in pairs] == expected, name
        assert all(p.prompt[-1]["role"] == "user" for p in pairs)
    # a system prompt goes first; a relative path resolves against the config's directory
    pairs, _ = load_pref_pairs(_prefs("a.jsonl"), str(tmp_path), system_prompt="Be kind.")
    assert pairs[0].prompt[0] == {"role": "system", "content": "Be kind."}


def test_bad_preference_records_name_the_file_and_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" +
                   json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(UserError, match=r"(?s)pairs\.jsonl:2 .*not a valid pairs preference record.*rejected"):
        load_pref_pairs(_prefs(bad), str(tmp_path))
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: c"})
                  + "\n")
    with pytest.raises(UserError, match=r"(?s)hh\.jsonl:1 .*differ before their last reply"):
        load_pref_pairs(_prefs(hh), str(tmp_path))
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(UserError, match=r"(?s)unknown\.jsonl:1 .*cannot tell the preference format.*hh_rlhf"):
        load_pref_pairs(_prefs(unknown), str(tmp_path))
    with pytest.raises(UserError, match=r"prefs\.data\[0\]\.path"):
        load_pref_pairs(_prefs(tmp_path / "missing.jsonl"), str(tmp_path))
    # the config says which key is missing
    with pytest.raises(UserError, match=r"prefs\.data\[0\]\.path: required for type 'files'"):
        from_dict({"prefs": {"data": [{"type": "files"}]}})


def test_pairs_become_rows_that_train_only_the_reply(tiny_chat_model):
    from lib.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_chat_model)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
               {"role": "user", "content": "How are you?"}]
    pairs = [PrefPair(history, "Very well, thank you.", "bad bad", rejected_ended=False),
             PrefPair([{"role": "user", "content": "x " * 300}], "a", "b")]
    rows, stats = encode_pairs(tok, pairs, max_len=64)
    assert stats["pairs"] == 1 and stats["dropped_too_long"] == 1  # the second pair's context fills the window
    chosen, rejected = rows[0].chosen, rows[0].rejected
    assert tok.decode(chosen.ids[chosen.mask]).strip() == "Very well, thank you.<|im_end|>"
    # the earlier assistant turn is context, not trained; the cut-off sample has no end token
    assert "Hello there" not in tok.decode(chosen.ids[chosen.mask])
    assert tok.decode(rejected.ids[rejected.mask]).strip() == "bad bad" and end not in rejected.ids[rejected.mask]
    # prefs.rejected_end_token=False: an ended rejected reply is judged by its content, without its end token
    (row,), _ = encode_pairs(tok, [PrefPair(history, "Fine.", "go away")], max_len=64, rejected_end_token=False)
    assert end in row.chosen.ids[row.chosen.mask] and end not in row.rejected.ids[row.rejected.mask]
    (row,), _ = encode_pairs(tok, [PrefPair(history, "Fine.", "go away")], max_len=64)
    assert end in row.rejected.ids[row.rejected.mask]
    assert np.array_equal(chosen.ids[:int(np.argmax(chosen.mask))], rejected.ids[:int(np.argmax(rejected.mask))])


def test_self_play_keeps_failures_and_teaches_a_loop_to_stop_at_a_sentence_end(tiny_chat_model):
    """A reply that ended without repeating itself gives no pair (it is not worse for differing from the data's); one
    that never ended gives the data's reply over it; one that loops also gives its own whole sentences before the
    loop (ended) over the same text running into the repeat, which is where the two differ."""
    from lib.chat import prepare_tokenizer
    from lib.config import SelfPlayConfig
    from lib.data.tokenizer import load_tokenizer
    from lib.train.prefs import loop_start, pairs_from_reply

    assert loop_start([1, 2, 3, 4, 5, 1, 2, 3, 4], 4) == 5
    assert loop_start([1, 2, 3, 1, 2, 4], 3) is None
    tok = prepare_tokenizer(load_tokenizer(tiny_chat_model), str(tiny_chat_model))
    prompt = [{"role": "user", "content": "Who made the light?"}]
    sp = SelfPlayConfig()

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    assert pairs_from_reply(tok, sp, prompt, "God did.", ids("And there was light."), True, "x") == []
    unended = pairs_from_reply(tok, sp, prompt, "God did.", ids("And there was light and"), False, "x")
    assert [(p.chosen, p.rejected_ended) for p in unended] == [("God did.", False)]
    loop = ids("And God saw the light. And God said unto") + ids(" the light, the light, the light, the light")
    pairs = pairs_from_reply(tok, sp, prompt, "God did.", loop, False, "x")
    assert [p.where.split(" of ")[0] for p in pairs] == ["self-play", "self-play loop"]
    stop = pairs[1]
    assert stop.chosen == "And God saw the light." and not stop.rejected_ended
    assert stop.rejected.startswith(stop.chosen) and len(stop.rejected) > len(stop.chosen)
    assert stop.rejected != tok.decode(loop)  # cut just after the repeat begins: not the whole loop
    # a loop with no sentence end before it gives only the data pair; the pure SPIN recipe keeps every reply
    assert len(pairs_from_reply(tok, sp, prompt, "God did.", ids("light light light light light light"), False,
                                "x")) == 1
    spin = SelfPlayConfig(only_failures=False, loop_pairs=False)
    assert len(pairs_from_reply(tok, spin, prompt, "God did.", ids("And there was light."), True, "x")) == 1


@pytest.mark.slow
def test_held_out_prompts_are_never_trained_on_and_do_not_depend_on_the_replies():
    """The end-of-turn rate is measured on sft.data prompts on the held-out side of the split by prompt: no training
    pair has one of them (every pair of a prompt lands on one side), and the same config gives the same 50."""
    from lib.train.prefs import HELD_OUT_PROMPTS, held_out_prompts, sft_prompts
    from lib.train.sft_batches import split_examples

    cfg = from_dict({"sft": {"data": [{"type": "chitchat", "max_examples": 3000}]},
                     "prefs": {"enabled": True, "data": [{"type": "self_play"}]}})
    prompts = sft_prompts(cfg)
    pairs = [PrefPair(p, reply, "no", where) for p, reply, where in prompts]
    pairs += [PrefPair(p, reply, "again", where) for p, reply, where in prompts[::3]]
    train, _ = split_examples(pairs, cfg.prefs.val_fraction, cfg.seed)
    held = held_out_prompts(cfg, [])
    assert len(held) == HELD_OUT_PROMPTS and held == held_out_prompts(cfg, [])
    keys = {json.dumps(p, sort_keys=True) for p in held}
    assert len(keys) == HELD_OUT_PROMPTS
    assert not keys & {json.dumps(p.prompt, sort_keys=True) for p in train}


# ---------------------------------------------------------------------------------------------------------
# The stage.


def _stage_config(tmp_path, model_dir, **prefs) -> Config:
    return from_dict({
        "artifacts_dir": str(tmp_path / "artifacts"), "seed": 5,
        "sft": {"base_model": str(model_dir), "data": [{"type": "chitchat", "max_examples": 60}]},
        "prefs": {"enabled": True, "self_play": {"max_pairs": 40, "max_new_tokens": 12},
                  "train": {"seq_len": 64, "batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2,
                            "max_steps": 6, "eval_every": 3, "eval_batches": 2, "ckpt_every": 3, "log_every": 1,
                            "sample_tokens": 8, "precision": "fp32"}, **prefs}})


@pytest.mark.slow
def test_the_stage_tunes_the_sft_model_on_self_play_pairs_and_resumes(tiny_chat_model, tmp_path, monkeypatch,
                                                                     own_accelerate_state):
    """A tiny SFT output (the tiny model published as 04_sft) tuned with DPO: held-out metrics at every eval,
    before/after in the manifest, a model transformers loads; run again after its output is lost, it resumes from
    its checkpoint with the pairs it sampled (no second sampling) and publishes the same weights."""
    import shutil

    from transformers import AutoModelForCausalLM

    from lib.artifacts import stage_output
    from lib.stages import stage_dir
    from lib.train import prefs as prefs_mod

    cfg = _stage_config(tmp_path, tiny_chat_model)
    with stage_output(cfg, "04_sft") as (out, extra):
        for f in tiny_chat_model.iterdir():
            shutil.copy2(f, out / f.name)
    final = prefs_mod.run_prefs(cfg)
    assert final == stage_dir(cfg, "04_prefs")
    m = json.loads((final / "manifest.json").read_text())
    assert m["method"] == "dpo" and m["steps"] == 6 and m["data"]["sources"][0]["type"] == "self_play"
    assert m["data"]["sources"][0]["pairs"] >= 30
    evals = [r for r in map(json.loads, (final / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "eval"]
    assert len(evals) == 2
    for key in ("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps", "kl_to_reference",
                "end_of_turn_rate", "mean_reply_tokens"):
        assert all(key in r for r in evals), key
    assert m["before"]["pairs"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert m["after"]["pairs"]["kl_to_reference"] > 0
    assert m["after"]["pairs"]["reward_margin"] > m["before"]["pairs"]["reward_margin"]
    assert len(m["after"]["replies"]["answers"]) == len(m["before"]["replies"]["answers"]) == 8
    AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)

    weights = (final / "model.safetensors").read_bytes()
    shutil.rmtree(final)
    monkeypatch.setattr(prefs_mod, "self_play_pairs", _not_again)
    again = prefs_mod.run_prefs(cfg)
    assert (again / "model.safetensors").read_bytes() == weights


def _not_again(*a, **k):
    raise AssertionError("the pairs were sampled a second time")


@pytest.mark.slow
def test_orpo_with_lora_tunes_adapters_and_publishes_the_merged_model(tiny_chat_model, tmp_path,
                                                                     own_accelerate_state):
    """ORPO under LoRA on pairs from a file: only the adapters train (the reference is the model with them switched
    off, so the KL starts at 0), and the published model has them merged in (no adapter files, transformers loads it)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from lib.artifacts import stage_output
    from lib.train.prefs import run_prefs

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS * 8))
    cfg = _stage_config(tmp_path, tiny_chat_model, method="orpo", data=[{"type": "files", "path": str(pairs)}],
                        lora={"enabled": True, "rank": 4}, val_fraction=0.3)
    with stage_output(cfg, "04_sft") as (out, extra):
        for f in tiny_chat_model.iterdir():
            shutil.copy2(f, out / f.name)
    final = run_prefs(cfg)
    m = json.loads((final / "manifest.json").read_text())
    assert m["method"] == "orpo" and m["mode"] == "lora" and m["lora"]["rank"] == 4
    assert m["trainable_parameters"] < m["parameters"] / 5
    assert m["data"]["sources"] == [{"index": 0, "type": "files", "format": "pairs", "records": 24, "ties": 0,
                                     "pairs": 24}]
    assert m["before"]["pairs"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert m["after"]["pairs"]["kl_to_reference"] > 0
    assert not (final / "adapter").exists() and (final / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
