"""The recipes in config/recipes/: each says what its assignment asks for, and each runs end to end with Snakemake
at a tiny size, overriding only size and step keys (a second --configfile, merged over the recipe)."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT

from lib.config import load_config, to_dict
from lib.model.homellm import HomeLLM, model_args
from lib.stages import stage_dir

RECIPES = ROOT / "config" / "recipes"


def n_params(cfg, vocab: int) -> int:
    with torch.device("meta"):  # shapes only: no memory, no time
        return HomeLLM(model_args(cfg.model, vocab_size=vocab)).num_params()


def test_low_resource_language_recipe():
    cfg = load_config(RECIPES / "low_resource_language.yaml")
    a = model_args(cfg.model, vocab_size=cfg.tokenizer.vocab_size)
    assert (cfg.tokenizer.pretrained, cfg.tokenizer.vocab_size) == (None, 8192)  # its own byte-level BPE
    assert (a.n_layers, a.n_heads, a.dim, a.max_seq_len, cfg.pretrain.seq_len) == (6, 8, 512, 256, 256)
    assert 22e6 < n_params(cfg, 8192) < 24e6
    t = cfg.pretrain
    assert (t.lr, t.min_lr, t.warmup_steps, t.batch_size * t.grad_accum, t.precision) == (3e-4, 3e-5, 100, 128, "auto")


def test_two_phase_cpu_coursework_recipe():
    cfg = load_config(RECIPES / "two_phase_cpu_coursework.yaml")
    assert cfg.tokenizer.pretrained == "gpt2"
    assert 15e6 < n_params(cfg, 50_260) < 25e6 and cfg.pretrain.seq_len == 256
    c = cfg.coursework
    assert c.enabled and c.phase1_random_init and c.phase1_no_instruction_data and c.cpu_only
    assert (c.max_epochs_phase1, cfg.pretrain.max_epochs) == (3, 3)
    assert (c.max_epochs_phase2, cfg.sft.train.max_epochs) == (2, 2) and cfg.sft.train.patience


def test_homellm_gpu_recipe():
    cfg = load_config(RECIPES / "homellm_512_8_8_gpu.yaml")
    t = cfg.pretrain
    assert (cfg.model.preset, t.seq_len, t.batch_size, t.grad_accum, t.lr, t.warmup_steps, t.precision) == (
        "512-8-8", 512, 16, 4, 5e-4, 1000, "auto")
    header = (RECIPES / "homellm_512_8_8_gpu.yaml").read_text().split("\nseed:")[0]
    for launcher in ("ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"):
        assert launcher in header and (ROOT / "config" / "accelerate" / launcher).is_file()


TINY = {  # size and step keys only (and how much the export and the report card check)
    "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
    "pretrain": {"seq_len": 32, "batch_size": 4, "grad_accum": 1, "max_steps": 6, "warmup_steps": 2,
                 "eval_every": 3, "eval_batches": 2, "ckpt_every": 3, "log_every": 1, "sample_tokens": 8},
    "sft": {"train": {"seq_len": 64, "batch_size": 4, "grad_accum": 1, "max_steps": 4, "warmup_steps": 1,
                      "eval_every": 2, "eval_batches": 1, "ckpt_every": 2, "log_every": 1, "sample_tokens": 8}},
    "export": {"gguf": ["f16"]},  # the q8_0 file is the smoke run's to check (tests/test_report.py)
    "report": {"sample_tokens": 8, "eval_limit": 8},
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_runs_end_to_end_at_a_tiny_size(recipe, tmp_path):
    cfg = load_config(RECIPES / recipe)
    tiny = json.loads(json.dumps(TINY))
    # fewer documents of the same sources; a smaller BPE where the recipe trains its own
    tiny["data"] = {"sources": [{**s, "max_docs": 600} for s in to_dict(cfg)["data"]["sources"]]}
    tiny["sft"]["data"] = [{**s, "max_examples": 120} for s in to_dict(cfg)["sft"]["data"]]
    if not cfg.tokenizer.pretrained:
        tiny["tokenizer"] = {"vocab_size": 512}
    tiny["install"] = {"models_dir": str(tmp_path / "models")}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    res = subprocess.run([sys.executable, "-m", "snakemake", "report", "-s", str(ROOT / "Snakefile"), "--directory",
                          str(tmp_path), "--cores", "2", "--configfile", str(RECIPES / recipe), str(tmp_path / "tiny.yaml")],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    merged = load_config([RECIPES / recipe, tmp_path / "tiny.yaml"])
    merged.artifacts_dir = str(tmp_path / "artifacts")
    report = json.loads((stage_dir(merged, "08_report") / "report.json").read_text())
    assert report["pretrain"]["steps"] == 6 or report["pretrain"]["stop_reason"].startswith("early stopping")
    assert report["export"]["max_abs_logit_diff"] == 0.0
    if merged.coursework.enabled:  # the rules were checked and are shown
        assert report["coursework"]["phase 1"]["checked"] == "passed"
        assert report["coursework"]["phase 2"]["checked"] == "passed"
        assert "coursework rules" in (stage_dir(merged, "08_report") / "report.md").read_text()
