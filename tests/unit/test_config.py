"""Config tree: presets, YAML + overrides, and errors that name the field and the fix."""
from __future__ import annotations

import pytest

from megatron_longlive.config import ConfigError, RunConfig, load_config, preset_config


def test_defaults_validate_and_roundtrip_yaml(tmp_path):
    cfg = RunConfig()
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg


def test_preset_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: wan2.1-1.3b\ntrain:\n  lr: 2.0e-5\n")
    cfg = load_config(path, ["train.lr=1e-4", "train.betas=[0.0, 0.999]", "model.num_layers=4"])
    assert (cfg.model.dim, cfg.model.num_heads, cfg.model.num_layers) == (1536, 12, 4)
    assert cfg.train.lr == 1e-4 and cfg.train.betas == (0.0, 0.999)


@pytest.mark.parametrize("yaml_text, overrides, needles", [
    ("model:\n  num_layers: thirty\n", [], ["model.num_layers", "expected int", "Fix"]),
    ("model:\n  num_heads: 5\n", [], ["model.num_heads", "must divide dim=64", "Fix"]),
    ("train:\n  lrate: 1.0\n", [], ["train.lrate", "unknown key", "lr"]),
    ("trian:\n  lr: 1.0\n", [], ["trian", "unknown section", "train"]),
    ("", ["parallel.sp_size=3"], ["parallel.sp_size", "must divide model.num_heads=2"]),
    ("", ["data.num_frames=12"], ["data.num_frames", "1 + 4k", "13"]),
    ("", ["model.preset=wan9"], ["model.preset", "unknown preset", "wan2.1-1.3b"]),
    ("", ["train.lr"], ["train.lr", "section.key=value"]),
    ("model: 3\n", [], ["model", "expected a mapping"]),
])
def test_bad_input_names_field_and_fix(tmp_path, yaml_text, overrides, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, msg


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="model.num_layers"):
        preset_config("tiny", num_layers=True)
