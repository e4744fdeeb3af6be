"""Config loading, validation messages, overrides and stage hashes."""

import subprocess
import sys

import pytest
import yaml

from lib import ROOT
from lib.config import Config, dump_yaml, from_dict, load_config, to_dict
from lib.errors import UserError
from lib.stages import stage_hash, upstream_stages

STAGES = ["01_data", "02_tokenizer", "02_tokens", "03_pretrain", "04_sft", "04_export", "05_check", "06_install"]


@pytest.mark.parametrize("path", sorted([*(ROOT / "config").glob("*.yaml"), *(ROOT / "config" / "recipes").glob("*.yaml")]),
                         ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    for stage in STAGES:
        assert len(stage_hash(cfg, stage)) == 12


def test_unknown_key_suggests_closest():
    with pytest.raises(UserError, match=r"tokenizer\.vocab_sise: unknown key \(did you mean vocab_size\?\)"):
        from_dict({"tokenizer": {"vocab_sise": 4096}})


def test_all_problems_reported_at_once():
    with pytest.raises(UserError) as e:
        from_dict({"seed": "x", "pretrain": {"lr": -1, "precision": "fp8"}, "modle": {}})
    msg = str(e.value)
    assert "seed: expected an integer, got 'x'" in msg
    assert "pretrain.lr: expected a value between 0.0 and 1.0, got -1" in msg
    assert "pretrain.precision: expected one of 'auto', 'fp32', 'bf16', 'fp16', got 'fp8'" in msg
    assert "modle: unknown key (did you mean model?)" in msg


def test_cross_field_rules():
    with pytest.raises(UserError, match=r"data\.sources\[0\]\.path: required for type 'files'"):
        from_dict({"data": {"sources": [{"type": "files"}]}})
    with pytest.raises(UserError, match="set at least one stop condition"):
        from_dict({"pretrain": {"max_steps": None}})


def test_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(ROOT / "config/smoke.yaml", ["tokenizer.vocab_size=1024", "pretrain.sample_prompts=[a, b]",
                                                   "tokenizer.pretrained=gpt2"])
    assert cfg.tokenizer.vocab_size == 1024
    assert cfg.pretrain.sample_prompts == ["a", "b"]
    assert cfg.tokenizer.pretrained == "gpt2"
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(ROOT / "config/smoke.yaml", ["tokenizer.vocab_size"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\ndata:\n  sources: [\n")
    with pytest.raises(UserError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_dump_roundtrip():
    cfg = load_config(ROOT / "config/default.yaml")
    import yaml

    again = from_dict(yaml.safe_load(dump_yaml(cfg)), base_dir=cfg.base_dir)
    assert to_dict(again) == to_dict(cfg)


def test_hash_ignores_key_order_comments_and_explicit_defaults(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("seed: 3\ntokenizer:\n  vocab_size: 1000\n  min_frequency: 2\n")
    b.write_text("# a comment\ntokenizer:\n  min_frequency: 2   # the default, written out\n  vocab_size: 1000\nseed: 3\n")
    ca, cb = load_config(a), load_config(b)
    for stage in STAGES:
        assert stage_hash(ca, stage) == stage_hash(cb, stage)


def test_hash_changes_only_downstream():
    base = load_config(ROOT / "config/smoke.yaml")
    edited = load_config(ROOT / "config/smoke.yaml", ["tokenizer.vocab_size=600"])
    same = {s for s in STAGES if stage_hash(base, s) == stage_hash(edited, s)}
    assert same == {"01_data"}
    edited = load_config(ROOT / "config/smoke.yaml", ["serve.port=9000", "pretrain.eval_every=7"])
    changed = {s for s in STAGES if stage_hash(base, s) != stage_hash(edited, s)}
    assert changed == {"03_pretrain", "04_sft", "04_export", "05_check", "06_install"}
    # encode-only knob: affects neither the tokenizer nor the tokens
    edited = load_config(ROOT / "config/smoke.yaml", ["tokenizer.encode_batch_docs=7"])
    assert all(stage_hash(base, s) == stage_hash(edited, s) for s in STAGES)


def test_pretrained_tokenizer_does_not_depend_on_corpus():
    a = load_config(ROOT / "config/smoke.yaml", ["tokenizer.pretrained=gpt2"])
    b = load_config(ROOT / "config/smoke.yaml", ["tokenizer.pretrained=gpt2", "data.min_chars=30"])
    assert upstream_stages(a, "02_tokenizer") == []
    assert stage_hash(a, "02_tokenizer") == stage_hash(b, "02_tokenizer")
    assert stage_hash(a, "02_tokens") != stage_hash(b, "02_tokens")


def test_script_reports_bad_config_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokenizer:\n  vocab_sise: 10\n")
    res = subprocess.run([sys.executable, "01_prepare_data.py", "--config", str(bad)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "did you mean vocab_size?" in res.stderr
    assert "Traceback" not in res.stderr


def test_text_in_any_script_prints_as_itself():
    """The resolved config (stage logs, the report card, the bundle's resolved.yaml) shows a Ukrainian or Chinese
    prompt as itself, not as \\u escapes, and reads back to the same text."""
    cfg = load_config(ROOT / "config/smoke.yaml", ["pretrain.sample_prompts=[Привіт, 你好]"])
    text = dump_yaml(cfg)
    assert "Привіт" in text and "你好" in text and "\\u" not in text
    assert yaml.safe_load(text)["pretrain"]["sample_prompts"] == ["Привіт", "你好"]
