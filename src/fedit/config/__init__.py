"""The typed run config: dataclasses checked on construction (``schema``), read from TOML
with ``--set key=value`` overrides and written back (``toml``)."""

from fedit.config.schema import (
    AGGREGATOR_NAMES,
    COMPRESS_METHODS,
    DPO_LOSSES,
    EXACT_MATCH_CATEGORIES,
    FIELD_NAMES,
    OBJECTIVE_NAMES,
    PERSONALIZE_METHODS,
    RANK_AGGREGATIONS,
    STRATEGY_NAMES,
    CheckpointConfig,
    CompressConfig,
    DataConfig,
    DPOConfig,
    EvalConfig,
    FlowerConfig,
    LogConfig,
    LoraConfig,
    ModelConfig,
    PartitionConfig,
    PersonalizeConfig,
    PrivacyConfig,
    RunConfig,
    StrategyConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    to_toml,
)

__all__ = [
    "AGGREGATOR_NAMES", "COMPRESS_METHODS", "DPO_LOSSES", "EXACT_MATCH_CATEGORIES",
    "FIELD_NAMES", "OBJECTIVE_NAMES", "PERSONALIZE_METHODS", "DPOConfig",
    "RANK_AGGREGATIONS", "STRATEGY_NAMES", "CheckpointConfig", "CompressConfig", "DataConfig",
    "EvalConfig", "FlowerConfig", "LogConfig", "LoraConfig", "ModelConfig", "PartitionConfig",
    "PersonalizeConfig", "PrivacyConfig", "RunConfig", "StrategyConfig", "TrainConfig",
    "config_from_dict", "load_config", "to_toml",
]
