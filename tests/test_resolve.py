"""Which model 07_serve picks and how the model picker names it: pipeline models by their run, not their hash."""

import os
import time

from lib.atomic import atomic_write_json
from lib.config import from_dict
from lib.install.commands import describe_origin
from lib.serving.resolve import ModelRef, latest_pipeline_model, pipeline_models


def _model_stage(artifacts, stage, h, config_name, age_s):
    folder = artifacts / stage / h
    atomic_write_json(folder / "config.json", {"model_type": "llama"})
    atomic_write_json(folder / "manifest.json", {"stage": stage, "hash": h, "config_name": config_name,
                                                 "created": "2026-12-06T14:02:00+0000"})
    stamp = time.time() - age_s
    os.utime(folder / "manifest.json", (stamp, stamp))


def test_picker_names_pipeline_models_by_run_stage_and_date():
    ref = ModelRef(id="04_export/a3760e477a13", path=None, source="pipeline",
                   info={"stage": "04_export", "created": "2026-12-06T14:02:00+0000", "config_name": "smoke"})
    assert ref.label == "smoke · export · 2026-12-06 14:02 (04_export/a3760e)"
    assert ModelRef(id="homellm", path=None, source="installed").label == "homellm (installed)"


def test_default_model_is_the_newest_chat_model_not_a_newer_pretrain_only_one(tmp_path):
    a = tmp_path / "artifacts"
    _model_stage(a, "04_sft", "b" * 12, "smoke", age_s=600)
    _model_stage(a, "03_pretrain", "c" * 12, "default", age_s=10)  # newer, but it cannot chat
    cfg = from_dict({"artifacts_dir": str(a)})  # a config none of these came from
    assert [r.id for r in pipeline_models(a)] == ["03_pretrain/" + "c" * 12, "04_sft/" + "b" * 12]
    assert latest_pipeline_model(cfg).id == "04_sft/" + "b" * 12


def test_pipeline_models_are_served_under_their_install_name_never_a_stage_hash(tmp_path):
    """The API name of a pipeline model is the name 06_install gives it: export.name for the default config,
    export.name-<config> for another, install.name where set; the stages before the export add theirs."""
    from lib.install.commands import pipeline_install_name

    a = tmp_path / "artifacts"
    _model_stage(a, "04_sft", "b" * 12, "smoke", age_s=600)
    _model_stage(a, "03_pretrain", "c" * 12, "default", age_s=10)
    folder = a / "04_export" / ("e" * 12)
    atomic_write_json(folder / "hf" / "config.json", {"model_type": "llama"})
    atomic_write_json(folder / "manifest.json", {"stage": "04_export", "hash": "e" * 12, "config_name": "smoke",
                                                 "config": {"export": {"name": "kaz-gpt"}}})
    names = {r.id: r.served_name for r in pipeline_models(a)}
    assert names == {"04_export/" + "e" * 12: "kaz-gpt-smoke", "04_sft/" + "b" * 12: "homellm-smoke-sft",
                     "03_pretrain/" + "c" * 12: "homellm-pretrain"}
    cfg = from_dict({"artifacts_dir": str(a), "install": {"name": "mine"}})
    assert pipeline_install_name(cfg, "config/smoke.yaml") == "mine"
    assert pipeline_install_name(from_dict({}), "config/smoke.yaml") == "homellm-smoke"
    assert ModelRef(id="tiny", path=None, source="installed").served_name == "tiny"


def test_install_list_names_a_pipeline_install_by_its_run():
    assert describe_origin("pipeline config /home/u/proj/config/smoke.yaml", "/home/u/proj/artifacts/04_export/ab12") \
        == "pipeline run 'smoke' (04_export/ab12)"
    assert describe_origin("local /models/x", "/models/x") == "/models/x"
