"""Pipeline configuration, split by job: the schema (schema.py: one dataclass per stage section), validation
(validate.py) and loading with merges and overrides (load.py). It knows nothing about ML. Which values each stage
hashes is the stage map's business (lib.stages).

    from lib.config import load_config
    cfg = load_config("config/default.yaml", ["tokenizer.vocab_size=4096"])
"""

from lib.config.load import (
    absolute_paths,
    apply_overrides,
    dump_yaml,
    load_config,
    map_paths,
    merge,
    overrides_from_mapping,
    parse_override,
    read_config_data,
    read_yaml,
)
from lib.config.schema import (
    CheckConfig,
    Config,
    CourseworkConfig,
    DataConfig,
    ExportConfig,
    InstallConfig,
    LoraConfig,
    ModelConfig,
    NearDedupConfig,
    PrefsConfig,
    PrefsDataConfig,
    ReportConfig,
    SelfPlayConfig,
    ServeConfig,
    SftConfig,
    SftDataConfig,
    SourceConfig,
    TokenizerConfig,
    TrainConfig,
)
from lib.config.validate import from_dict, to_dict

__all__ = [
    "CheckConfig", "Config", "CourseworkConfig", "DataConfig", "ExportConfig", "InstallConfig", "LoraConfig",
    "ModelConfig", "NearDedupConfig", "PrefsConfig", "PrefsDataConfig", "ReportConfig", "SelfPlayConfig", "ServeConfig", "SftConfig", "SftDataConfig", "SourceConfig",
    "TokenizerConfig", "TrainConfig", "absolute_paths", "apply_overrides", "map_paths", "dump_yaml", "from_dict", "load_config", "merge",
    "overrides_from_mapping", "parse_override", "read_config_data", "read_yaml", "to_dict",
]
