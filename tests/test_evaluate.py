"""Benchmarks through lm-evaluation-harness: the offline tasks shipped in evals/, an HF directory and a GGUF file of
the same model scored on the same items (llama.cpp's log-likelihoods against transformers'), the command that
compares models side by side, and the clear refusal of standard tasks when the hub cannot be reached."""

import json
import subprocess
import sys

import pytest

from lib import ROOT
from lib.errors import UserError
from lib.report.evaluate import evaluate_model, gguf_model, local_tasks, task_configs

pytestmark = pytest.mark.usefixtures("one_torch_thread", "own_accelerate_state")


def test_local_tasks_are_shipped_and_handed_over_with_absolute_data_paths():
    tasks = local_tasks()
    assert {"home_kjv_cloze", "home_chitchat_reply"} <= set(tasks)
    for name in tasks:
        (conf,) = task_configs([name])
        data = conf["dataset_kwargs"]["data_files"]["test"]
        rows = [json.loads(line) for line in open(data, encoding="utf-8")]
        assert len(rows) == 300 and all(0 <= r["label"] < len(r["choices"]) == 4 for r in rows)
        assert conf["metadata"]["chance"] == 0.25


def test_standard_tasks_need_the_hub_and_say_so_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match=r"eval tasks hellaswag: HF_\w+_OFFLINE is set.*home_kjv_cloze"):
        task_configs(["home_kjv_cloze", "hellaswag"])


@pytest.fixture(scope="module")
def tiny_gguf(tiny_chat_model, tmp_path_factory):
    from lib.export.gguf import write_gguf

    out = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    write_gguf(tiny_chat_model, out, "f16", name="tiny")
    return out


def test_a_gguf_scores_like_its_hf_source(tiny_chat_model, tiny_gguf):
    """llama.cpp's log-likelihoods of the same continuations equal transformers' up to f16 rounding."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    pairs = [("In the beginning God created the", " heaven"), ("And the LORD said unto", " Moses"),
             ("A: hi there!\nB:", " Hey! What's up?")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    hf = HFLM(pretrained=str(tiny_chat_model), device="cpu", dtype="float32", batch_size=1)
    ours = gguf_model(tiny_gguf)
    for (a, _), (b, _) in zip(hf.loglikelihood(requests), ours.loglikelihood(requests)):
        assert b == pytest.approx(a, abs=0.05 + 0.01 * abs(a))
    scores = evaluate_model(tiny_gguf, ["home_kjv_cloze"], limit=12)["home_kjv_cloze"]
    assert scores["n"] == 12 and 0 <= scores["acc"] <= 1 and scores["acc_stderr"] is not None


@pytest.mark.slow
def test_a_quantized_gguf_is_scored_on_any_cpu(tiny_chat_model, tmp_path, monkeypatch):
    """A Q8_0 GGUF through llama.cpp on prompts of many tokens: on a CPU with AMX, llama.cpp's repacked Q8_0 weights
    crashed the process (SIGSEGV) here, so repacking is off there (lib.hardware.llama_cpp_repack). Run in a child
    process, so a crash fails this test instead of the suite."""
    from lib.export.gguf import write_gguf
    from lib.hardware import HARDWARE_ENV, cpu_has_amx, llama_cpp_repack

    q8 = tmp_path / "tiny-q8_0.gguf"
    write_gguf(tiny_chat_model, q8, "q8_0", name="tiny")
    code = ("import sys; from pathlib import Path; from lib.report.evaluate import evaluate_model; "
            "print(evaluate_model(Path(sys.argv[1]), ['home_kjv_cloze'], limit=6)['home_kjv_cloze']['n'])")
    res = subprocess.run([sys.executable, "-c", code, str(q8)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip().endswith("6"), res.stderr[-2000:]
    assert llama_cpp_repack() == (not cpu_has_amx())
    monkeypatch.setenv(HARDWARE_ENV, '{"cpu": {"amx": true}}')  # the policy judged on injected hardware
    assert cpu_has_amx() and not llama_cpp_repack()
    monkeypatch.setenv(HARDWARE_ENV, '{"cpu": {"amx": false}}')
    assert llama_cpp_repack()


def test_a_task_that_does_not_fit_the_context_says_so_and_the_others_are_scored(tiny_chat_model, tmp_path):
    import shutil

    small = tmp_path / "ctx16"
    shutil.copytree(tiny_chat_model, small)
    conf = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**conf, "max_position_embeddings": 16}))
    scores = evaluate_model(small, ["home_chitchat_reply", "home_kjv_cloze"], limit=4)
    assert scores["home_chitchat_reply"]["error"] == "its items do not fit the model's context (16 tokens)"
    assert "acc" not in scores["home_chitchat_reply"]
    assert list(scores) == ["home_chitchat_reply", "home_kjv_cloze"]  # one row per task, whatever happened to it


@pytest.mark.slow
def test_eval_command_compares_models_side_by_side(tiny_chat_model, tiny_gguf, tmp_path):
    out = tmp_path / "scores.json"
    res = subprocess.run([sys.executable, str(ROOT / "08_report.py"), "eval", str(tiny_chat_model), "--compare",
                          str(tiny_gguf), "--tasks", "home_kjv_cloze,home_chitchat_reply", "--limit", "8",
                          "--json", str(out), "--quiet-config"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "task | metric | chance |" in res.stdout and "home_chitchat_reply | acc_norm | 0.25 |" in res.stdout
    table = json.loads(out.read_text())
    assert table["models"] == [str(tiny_chat_model), str(tiny_gguf)]
    for task, rows in table["tasks"].items():
        assert all(r["n"] == 8 and 0 <= r["acc"] <= 1 for r in rows.values()), task
    bad = subprocess.run([sys.executable, str(ROOT / "08_report.py"), "eval", str(tmp_path / "nowhere"),
                          "--quiet-config"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "nowhere" in bad.stderr


def test_an_adapter_is_scored_against_its_base(tiny_chat_model, tmp_path):
    """A LoRA adapter (non-zero, so it changes the model) evaluated on its base in the same table."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lib.report.evaluate import compare

    base = AutoModelForCausalLM.from_pretrained(str(tiny_chat_model), dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    peft.save_pretrained(str(tmp_path / "adapter"))
    table = compare([("base", tiny_chat_model, None), ("+ adapter", tiny_chat_model, tmp_path / "adapter")],
                    ["home_chitchat_reply"], limit=16)
    rows = table["tasks"]["home_chitchat_reply"]
    assert table["models"] == ["base", "+ adapter"] and all(r["n"] == 16 for r in rows.values())
    # the adapter is applied: the same continuation scores differently with it
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    req = [Instance("loglikelihood", {}, ("A: hi there!\nB:", " Hey! What's up?"), 0)]
    plain = HFLM(pretrained=str(tiny_chat_model), device="cpu", dtype="float32").loglikelihood(req)[0][0]
    adapted = HFLM(pretrained=str(tiny_chat_model), peft=str(tmp_path / "adapter"), device="cpu",
                   dtype="float32").loglikelihood(req)[0][0]
    assert abs(plain - adapted) > 1e-3
