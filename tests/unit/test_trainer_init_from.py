"""train.init_from loads any Wan checkpoint format strictly (through the converter's loader)."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import load_config
from megatron_longlive.models.wan.convert import CheckpointMismatchError, save_wan_weights
from megatron_longlive.training.trainer import build_model


@pytest.mark.parametrize("fmt", ["diffusers", "official"])
def test_init_from_loads_checkpoint_directory(tmp_path, fmt):
    src = build_model(load_config(None, ["train.seed=7"]))
    with torch.no_grad():
        src.head.head.weight.normal_()  # differs from any fresh init
    save_wan_weights(src, tmp_path / fmt, to=fmt)
    model = build_model(load_config(None, ["train.seed=0", f"train.init_from={tmp_path / fmt}"]))
    for (name, a), b in zip(src.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_init_from_of_another_config_lists_keys(tmp_path):
    src = build_model(load_config(None, ["model.num_layers=3"]))
    save_wan_weights(src, tmp_path / "three_layers", to="native")
    with pytest.raises(CheckpointMismatchError, match="blocks.2"):
        build_model(load_config(None, [f"train.init_from={tmp_path / 'three_layers'}"]))


def test_init_from_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.init_from"):
        build_model(load_config(None, [f"train.init_from={tmp_path / 'nope'}"]))
