"""VAE and text-encoder wrappers: shapes, the 1 + 4k rule, equality with diffusers / transformers used directly."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.models.wan.text_encoder import TextEncoder, prompt_clean
from megatron_longlive.models.wan.vae import WanVAE, latent_frames_for, pixel_frames_for


@pytest.fixture(scope="module", params=["wan2.1", "wan2.2"])
def tiny_vae(request):
    return WanVAE.tiny(request.param, seed=0)


@pytest.fixture(scope="module")
def tiny_text():
    return TextEncoder.tiny(text_dim=32, text_len=16)


def _video(vae: WanVAE, frames: int, hw: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = vae.spatial_stride
    return torch.rand(1, 3, frames, hw * s, hw * s, generator=g) * 2 - 1


# ---- VAE ----------------------------------------------------------------------------------------------------
def test_frame_rules():
    assert [latent_frames_for(t) for t in (1, 5, 9, 81)] == [1, 2, 3, 21]
    assert [pixel_frames_for(n) for n in (1, 2, 3, 21)] == [1, 5, 9, 81]
    for bad in (0, 2, 4, 8, 80):
        with pytest.raises(ValueError, match=r"1 \+ 4k"):
            latent_frames_for(bad)
    with pytest.raises(ValueError, match="latent frame count"):
        pixel_frames_for(0)


def test_tiny_vae_properties(tiny_vae):
    if tiny_vae.kind == "wan2.1":
        # Must match the tiny DiT preset's in_channels.
        from megatron_longlive.config import preset_config

        assert tiny_vae.z_dim == preset_config("tiny").in_channels == 16
        assert tiny_vae.spatial_stride == 8
    else:
        assert tiny_vae.z_dim == 48 and tiny_vae.spatial_stride == 16
    assert tiny_vae.temporal_stride == 4


def test_encode_decode_shapes(tiny_vae):
    s, c = tiny_vae.spatial_stride, tiny_vae.z_dim
    for frames in (1, 9):
        z = tiny_vae.encode(_video(tiny_vae, frames))
        assert z.shape == (1, c, latent_frames_for(frames), 2, 2)
        x = tiny_vae.decode(z)
        assert x.shape == (1, 3, frames, 2 * s, 2 * s)
        assert x.min() >= -1 and x.max() <= 1


def test_encode_rejects_bad_shapes(tiny_vae):
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        tiny_vae.encode(_video(tiny_vae, 4))
    with pytest.raises(ValueError, match="spatial stride"):
        tiny_vae.encode(torch.zeros(1, 3, 5, tiny_vae.spatial_stride + 2, tiny_vae.spatial_stride))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        tiny_vae.encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match="latents must be"):
        tiny_vae.decode(torch.zeros(1, tiny_vae.z_dim + 1, 2, 2, 2))


def test_encode_matches_diffusers_plus_float64_normalization(tiny_vae):
    video = _video(tiny_vae, 9, seed=1)
    ours = tiny_vae.encode(video)
    # Independent: diffusers' AutoencoderKLWan called directly, posterior mean, normalization in float64.
    mu = tiny_vae.model.encode(video).latent_dist.mean.double()
    cfg = tiny_vae.model.config
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float64).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float64).view(1, -1, 1, 1, 1)
    ref = (mu - mean) / std
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    assert ref.abs().max() > 0.1  # not a trivially small signal


def test_decode_matches_diffusers(tiny_vae):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, tiny_vae.z_dim, 2, 2, 2, generator=g)
    cfg = tiny_vae.model.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    ref = tiny_vae.model.decode(z * std + mean).sample
    torch.testing.assert_close(tiny_vae.decode(z), ref, rtol=0, atol=1e-6)


def test_normalize_roundtrip(tiny_vae):
    z = torch.randn(2, tiny_vae.z_dim, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(tiny_vae.normalize(tiny_vae.denormalize(z)), z)


def test_vae_from_pretrained_roundtrip(tmp_path, tiny_vae):
    tiny_vae.model.save_pretrained(tmp_path / "pipe" / "vae")
    video = _video(tiny_vae, 5, seed=3)
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):  # the vae dir, or a pipeline root
        loaded = WanVAE.from_pretrained(str(path))
        assert loaded.kind == tiny_vae.kind and loaded.z_dim == tiny_vae.z_dim
        assert torch.equal(loaded.encode(video), tiny_vae.encode(video))


def test_vae_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        WanVAE.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        WanVAE.from_pretrained(str(tmp_path))
    bad = tmp_path / "bad.pth"
    torch.save({"foo.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not an official Wan VAE checkpoint"):
        WanVAE.from_pretrained(str(bad))
    wan22 = tmp_path / "Wan2.2_VAE.pth"  # official Wan2.2 layout: 12 input channels (2x2 patchified RGB)
    torch.save({"encoder.conv1.weight": torch.zeros(4, 12, 3, 3, 3)}, wan22)
    with pytest.raises(ValueError, match="Wan2.2 VAE.*convert_wan_to_diffusers"):
        WanVAE.from_pretrained(str(wan22))


def test_vae_kind_errors():
    with pytest.raises(ValueError, match="unknown"):
        WanVAE.tiny("wan3")


def test_real_architecture_configs():
    # The real architectures (meta device, no weights) have the official compression and channel counts.
    from diffusers import AutoencoderKLWan

    for kind, z, s in (("wan2.1", 16, 8), ("wan2.2", 48, 16)):
        cfg = WanVAE.config_for(kind)
        with torch.device("meta"):
            m = AutoencoderKLWan(**cfg)
        assert m.config.z_dim == z and m.config.scale_factor_spatial == s
        assert len(cfg["latents_mean"]) == len(cfg["latents_std"]) == z


# ---- text encoder ---------------------------------------------------------------------------------------
def _wan_reference(te: TextEncoder, prompts: list[str]) -> torch.Tensor:
    """diffusers' WanPipeline._get_t5_prompt_embeds, written out: tokenizer + UMT5EncoderModel, cut, zero-pad."""
    tok = te.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=te.text_len,
                       truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    lens = tok.attention_mask.gt(0).sum(dim=1)
    with torch.no_grad():
        hidden = te.model(tok.input_ids, tok.attention_mask).last_hidden_state
    rows = [torch.cat([u[:v], u.new_zeros(te.text_len - int(v), u.size(1))]) for u, v in zip(hidden, lens)]
    return torch.stack(rows)


def test_text_encode_matches_umt5_directly(tiny_text):
    prompts = ["a cat walks on the beach", "two   people\ttalk  in a cafe", "héllo 日本 🎉 &amp; more"]
    out = tiny_text.encode(prompts)
    assert out.shape == (3, 16, 32)
    torch.testing.assert_close(out, _wan_reference(tiny_text, prompts), rtol=1e-5, atol=1e-6)
    _, mask = tiny_text.tokenize(prompts)
    for row, m in zip(out, mask):
        n = int(m.sum())
        assert 1 <= n <= 16
        assert torch.all(row[n:] == 0) and torch.all(row[:n].abs().sum(-1) > 0)
    assert mask[:2].sum(-1).max() < 16  # the short prompts really are padded


def test_text_truncation_and_empty(tiny_text):
    long_prompt = " ".join(["the camera pans over a snowy mountain village"] * 10)
    ids, mask = tiny_text.tokenize([long_prompt, "", "   "])
    eos = tiny_text.tokenizer.eos_token_id
    # Truncated to text_len tokens, the last being eos (documented behaviour).
    assert mask[0].sum() == 16 and ids[0, -1] == eos
    # Empty / whitespace-only prompts are the lone eos token, then padding.
    for r in (1, 2):
        assert mask[r].sum() == 1 and ids[r, 0] == eos
    out = tiny_text.encode([long_prompt, ""])
    assert torch.all(out[0].abs().sum(-1) > 0)
    assert torch.all(out[1, 1:] == 0) and out[1, 0].abs().sum() > 0
    torch.testing.assert_close(out, _wan_reference(tiny_text, [long_prompt, ""]), rtol=1e-5, atol=1e-6)


def test_tiny_text_is_deterministic(tiny_text):
    other = TextEncoder.tiny(text_dim=32, text_len=16)
    assert other.tokenizer.get_vocab() == tiny_text.tokenizer.get_vocab()
    p = ["a red car drives through the rain"]
    assert torch.equal(other.encode(p), tiny_text.encode(p))
    with pytest.raises(TypeError, match="list of strings"):
        tiny_text.encode("a single string")


def test_text_from_pretrained_roundtrip(tmp_path, tiny_text):
    tiny_text.model.save_pretrained(tmp_path / "pipe" / "text_encoder")
    tiny_text.tokenizer.save_pretrained(tmp_path / "pipe" / "tokenizer")
    p = ["close-up of a dog running", ""]
    loaded = TextEncoder.from_pretrained(str(tmp_path / "pipe"), text_len=16)
    assert torch.equal(loaded.encode(p), tiny_text.encode(p))
    # google/umt5-xxl layout: encoder and tokenizer files in one directory.
    tiny_text.model.save_pretrained(tmp_path / "flat")
    tiny_text.tokenizer.save_pretrained(tmp_path / "flat")
    assert torch.equal(TextEncoder.from_pretrained(str(tmp_path / "flat"), text_len=16).encode(p), tiny_text.encode(p))
    with pytest.raises(FileNotFoundError, match="not found"):
        TextEncoder.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder.from_pretrained(str(tmp_path))


def _to_official_wan21_keys(diffusers_sd: dict) -> dict:
    """Rename a diffusers Wan2.1 VAE state dict to the official Wan2.1_VAE.pth layout (inverse of diffusers'
    single-file mapping), so the official-file loading path can be tested without the real file."""
    import re

    res = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
           "conv2": "residual.6", "conv_shortcut": "shortcut"}

    def resnet(rest: str) -> str:
        for k, v in res.items():
            if rest.startswith(k + ".") or rest == k:
                return v + rest[len(k):]
        raise AssertionError(rest)

    out = {}
    for key, val in diffusers_sd.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            new = key.replace("post_quant_conv.", "conv2.").replace("quant_conv.", "conv1.")
        elif ".conv_in." in key:
            new = key.replace(".conv_in.", ".conv1.")
        elif ".norm_out." in key or ".conv_out." in key:
            new = key.replace(".norm_out.", ".head.0.").replace(".conv_out.", ".head.2.")
        elif m := re.match(r"(\w+)\.mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"{m[1]}.middle.{2 * int(m[2])}.{resnet(m[3])}"
        elif m := re.match(r"(\w+)\.mid_block\.attentions\.0\.(.+)", key):
            new = f"{m[1]}.middle.1.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
            rest = m[2] if m[2].startswith(("resample", "time_conv")) else resnet(m[2])
            new = f"encoder.downsamples.{m[1]}.{rest}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{resnet(m[3])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
        else:
            raise AssertionError(f"unmapped key {key}")
        out[new] = val
    return out


@pytest.mark.slow
def test_vae_from_official_wan21_pth(tmp_path):
    """Real Wan2.1 architecture (random weights) saved in the official .pth layout loads back exactly."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ref = WanVAE.random("wan2.1", seed=3)
    sd = ref.model.state_dict()
    official = _to_official_wan21_keys(sd)
    assert set(convert_wan_vae_to_diffusers(dict(official))) == set(sd)  # the renaming is the exact inverse
    torch.save(official, tmp_path / "Wan2.1_VAE.pth")
    loaded = WanVAE.from_pretrained(str(tmp_path / "Wan2.1_VAE.pth"))
    assert loaded.kind == "wan2.1"
    video = _video(ref, 5, seed=4)
    assert torch.equal(loaded.encode(video), ref.encode(video))
    official.pop("encoder.head.2.bias")
    torch.save(official, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="encoder.conv_out.bias"):
        WanVAE.from_pretrained(str(tmp_path / "broken.pth"))
