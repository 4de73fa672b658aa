"""Typed config tree: one dataclass per concern, YAML files, `--set` overrides."""
from .base import ConfigBase, ConfigError
from .data import DataConfig
from .infer import InferConfig
from .launch import LaunchConfig
from .model import PRESET_NAMES, ModelConfig, preset_config
from .parallel import ParallelConfig
from .quant import QuantConfig
from .run import RunConfig, apply_overrides, build_config, load_config, to_plain
from .train import TrainConfig

__all__ = ["ConfigBase", "ConfigError", "DataConfig", "InferConfig", "LaunchConfig", "ModelConfig", "ParallelConfig", "QuantConfig",
           "RunConfig", "TrainConfig", "PRESET_NAMES", "preset_config", "load_config", "build_config",
           "apply_overrides", "to_plain"]
