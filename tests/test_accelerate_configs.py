"""Every launcher config in config/accelerate/ loads with accelerate and builds the plugin it names."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "config" / "accelerate").glob("*.yaml"))
EXPECTED = {"cpu_ddp": "MULTI_GPU", "ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED",
            "deepspeed_zero3": "DEEPSPEED", "deepspeed_zero3_offload": "DEEPSPEED"}


def test_all_expected_configs_exist():
    assert {p.stem for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_builds_its_plugin(path):
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.name == EXPECTED[path.stem]
    if cfg.deepspeed_config:
        zero = DeepSpeedPlugin(**cfg.deepspeed_config).deepspeed_config["zero_optimization"]
        assert zero["stage"] == (2 if "zero2" in path.stem else 3)
        offload = "cpu" if "offload" in path.stem else "none"
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == offload
    if cfg.fsdp_config:
        fc = dict(cfg.fsdp_config)
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=fc["fsdp_version"], auto_wrap_policy=fc["fsdp_auto_wrap_policy"],
            transformer_cls_names_to_wrap=[fc["fsdp_transformer_layer_cls_to_wrap"]],
            reshard_after_forward=fc["fsdp_reshard_after_forward"], state_dict_type=fc["fsdp_state_dict_type"])
        assert plugin.fsdp_version == 2
        # the class FSDP wraps must be our transformer block
        import lib.model.homellm

        assert hasattr(lib.model.homellm, fc["fsdp_transformer_layer_cls_to_wrap"])
