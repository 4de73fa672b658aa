"""Every YAML in examples/configs loads with `load_config`, and the shipped recipes are self-consistent."""
from __future__ import annotations

import glob
import os

import pytest

from megatron_longlive.config import load_config, preset_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml")))
# pixel stride of one token: VAE spatial compression x patch size
TOKEN_STRIDE = {"wan2.1": 8 * 2, "wan2.2": 16 * 2}


def test_the_four_model_recipes_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny.yaml", "wan2.1-1.3b.yaml", "wan2.2-ti2v-5b.yaml", "wan2.1-14b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_example_config_loads(path):
    cfg = load_config(path)  # unknown keys, wrong types and bad cross-field values all raise
    name = os.path.basename(path)[:-len(".yaml")]
    if name in ("tiny", "wan2.1-1.3b", "wan2.2-ti2v-5b", "wan2.1-14b"):
        assert cfg.model == preset_config(name)
    # geometry that only fails later (in the trainer / the engine) is checked here already
    latent_frames = 1 + (cfg.data.num_frames - 1) // 4
    assert latent_frames % cfg.train.chunk_frames == 0, "train.chunk_frames must divide the latent frames"
    assert cfg.infer.window_frames % cfg.infer.chunk_frames == 0
    stride = TOKEN_STRIDE[cfg.model.vae]
    for section in (cfg.data, cfg.infer):
        assert section.height % stride == 0 and section.width % stride == 0, (section, stride)
    assert cfg.model.num_heads % (cfg.parallel.sp_size * cfg.parallel.tp_size) == 0
