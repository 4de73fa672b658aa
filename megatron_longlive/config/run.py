"""The whole run's config tree, YAML loading and `--set a.b=value` overrides.

Unknown sections or keys are errors (nothing is silently ignored). A `model.preset` fills the
architecture numbers first; any other `model.*` key then overrides that preset.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, ClassVar

import yaml

from .base import ConfigBase, ConfigError
from .data import DataConfig
from .distill import DistillConfig
from .infer import InferConfig
from .launch import LaunchConfig
from .model import ModelConfig, preset_config
from .parallel import ParallelConfig
from .quant import QuantConfig
from .train import TrainConfig


@dataclasses.dataclass
class RunConfig(ConfigBase):
    """All sections of a run."""

    _section: ClassVar[str] = "run"

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """Architecture."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """TP / SP / DP layout."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """Training data."""
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    """Precision of linears and KV cache."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Optimisation and checkpoints."""
    infer: InferConfig = dataclasses.field(default_factory=InferConfig)
    """Streaming generation."""
    launch: LaunchConfig = dataclasses.field(default_factory=LaunchConfig)
    """Cluster launch (Slurm / mpirun)."""
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    """Few-step LoRA distillation (DMD)."""

    def validate(self) -> None:
        for name in ("tp_size", "sp_size"):
            size = getattr(self.parallel, name)
            if self.model.num_heads % size:
                raise ConfigError(f"parallel.{name}: {name}={size} must divide model.num_heads={self.model.num_heads}."
                                  f" Fix: choose a divisor of {self.model.num_heads}.")

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_plain(self), sort_keys=False)


SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig, "quant": QuantConfig,
            "train": TrainConfig, "infer": InferConfig, "launch": LaunchConfig,
            "distill": DistillConfig}


def to_plain(cfg: Any) -> Any:
    """Dataclass tree -> plain dicts/lists (tuples become lists) for YAML."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_plain(v) for v in cfg]
    return cfg


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(section: str, values: dict, cls: type, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}{section}.{key}: unknown key{_suggest(key, known)}. "
                              f"Fix: remove it or use one of {', '.join(sorted(known))}.")


def build_config(tree: dict | None = None, where: str = "") -> RunConfig:
    """Build a validated `RunConfig` from a nested dict (as read from YAML)."""
    tree = dict(tree or {})
    for section in tree:
        if section not in SECTIONS:
            raise ConfigError(f"{where}{section}: unknown section{_suggest(section, SECTIONS)}. "
                              f"Fix: use one of {', '.join(SECTIONS)}.")
    parts = {}
    for section, cls in SECTIONS.items():
        values = tree.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{where}{section}: expected a mapping of keys, got {type(values).__name__}. "
                              f"Fix: write `{section}:` followed by indented `key: value` lines.")
        _check_keys(section, values, cls, where)
        if section == "model":
            values = dict(values)
            parts[section] = preset_config(values.pop("preset", "tiny"), **values)
        else:
            parts[section] = cls(**values)
    return RunConfig(**parts)


def parse_value(text: str) -> Any:
    """Parse an override's right-hand side as YAML (`1e-4` -> float, `[1, 2]` -> list, `true` -> bool)."""
    value = yaml.safe_load(text)
    # PyYAML reads "1e-4" as a string (YAML 1.1); accept the usual float spellings.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides to a nested dict, in order."""
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value. Fix: e.g. --set train.lr=1e-4.")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"--set {item!r}: expected exactly section.key, got {path!r}. "
                              f"Fix: e.g. --set train.lr=1e-4.")
        section, key = parts
        if tree.get(section) is None:
            tree[section] = {}
        if not isinstance(tree[section], dict):
            raise ConfigError(f"--set {item!r}: section {section!r} is not a mapping in the config file. "
                              f"Fix: write `{section}:` followed by indented `key: value` lines.")
        tree[section][key] = parse_value(text)
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    tree: dict = {}
    where = ""
    if path is not None:
        where = f"{path}: "
        if not os.path.exists(path):
            raise ConfigError(f"{path}: config file not found. Fix: check the path (examples/configs/ has samples).")
        with open(path) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (model:, train:, ...).")
    try:
        return build_config(apply_overrides(tree, overrides or []), where)
    except (ConfigError, ValueError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else where + msg) from None
