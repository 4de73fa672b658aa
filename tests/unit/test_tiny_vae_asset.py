"""The shipped tiny Wan2.1 VAE (megatron_longlive/assets/tiny_vae_wan21, made by tools/train_tiny_vae.py):
exact tiny architecture, reconstructs held-out synthetic clips far better than the random tiny VAE, normalized
latents of roughly unit scale, and `builtin:tiny-wan2.1` resolves to it."""
import pytest
import torch

import os

from megatron_longlive.models.wan.vae import BUILTIN_TINY_WAN21, TINY_WAN21_ASSET, WanVAE
from tools.train_tiny_vae import HELDOUT_SEED, clips, psnr, reconstruct

# The random tiny VAE measured 9.2-9.4 dB on held-out clips; a usable shipped VAE must clear MIN_PSNR_DB.
MIN_PSNR_DB = 22.0
MAX_RANDOM_PSNR_DB = 15.0

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(TINY_WAN21_ASSET, "config.json")),
                                reason="no shipped tiny VAE yet: run `python tools/train_tiny_vae.py` to create it")


@pytest.fixture(scope="module")
def shipped():
    return WanVAE.tiny("wan2.1", pretrained=True)


@pytest.fixture(scope="module")
def heldout():
    return clips(HELDOUT_SEED, range(100, 102), num_frames=5)      # [2, 3, 5, 64, 64], not used in training


def test_exact_tiny_architecture(shipped):
    rand = WanVAE.tiny("wan2.1", seed=0)
    a, b = shipped.model.state_dict(), rand.model.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == torch.float32 for k in a)
    assert shipped.z_dim == 16 and shipped.kind == "wan2.1"
    assert not torch.equal(a["encoder.conv_in.weight"], b["encoder.conv_in.weight"])


def test_builtin_path_is_the_shipped_vae(shipped):
    other = WanVAE.from_pretrained(BUILTIN_TINY_WAN21)
    for k, v in shipped.model.state_dict().items():
        assert torch.equal(v, other.model.state_dict()[k]), k
    with pytest.raises(ValueError, match="builtin"):
        WanVAE.from_pretrained("builtin:nope")
    with pytest.raises(ValueError, match="wan2.1"):
        WanVAE.tiny("wan2.2", pretrained=True)


def test_heldout_psnr_shipped_vs_random(shipped, heldout):
    trained = psnr(reconstruct(shipped, heldout), heldout)
    random = psnr(reconstruct(WanVAE.tiny("wan2.1", seed=0), heldout), heldout)
    assert trained > MIN_PSNR_DB, trained
    assert random < MAX_RANDOM_PSNR_DB, random


def test_normalized_latents_have_unit_scale(shipped, heldout):
    with torch.no_grad():
        z = shipped.encode(heldout)                                     # [2, 16, 2, 8, 8]
    assert z.shape == (2, 16, 2, 8, 8)
    std = z.transpose(0, 1).flatten(1).std(1)
    assert z.mean().abs() < 0.5 and 0.3 < std.mean() < 2.0, (z.mean(), std)
