"""The native Wan DiT: architecture numbers, block-causal mode, per-frame time modulation."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import preset_config
from megatron_longlive.models.wan import WanDiT, block_causal_mask

# diffusers' WanTransformer3DModel built with the official configs counts exactly these.
OFFICIAL_PARAM_COUNTS = {
    "wan2.1-1.3b": 1_418_996_800,
    "wan2.2-ti2v-5b": 4_999_787_712,
    "wan2.1-14b": 14_288_491_584,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_preset_parameter_counts_match_official(name):
    with torch.device("meta"):
        model = WanDiT(preset_config(name))
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAM_COUNTS))
def test_preset_parameter_counts_match_diffusers(name):
    """Independent check: diffusers' own class with the same numbers, also on the meta device."""
    from diffusers import WanTransformer3DModel

    cfg = preset_config(name)
    with torch.device("meta"):
        ref = WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                    attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
                                    out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                                    ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
                                    qk_norm="rms_norm_across_heads", eps=cfg.eps)
    assert sum(p.numel() for p in ref.parameters()) == OFFICIAL_PARAM_COUNTS[name]


def _inputs(cfg, frames=6, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, frames, 16, 16, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return x, t, ctx


def test_block_causal_later_chunk_never_changes_earlier_output(tiny_model, tiny_cfg):
    x, t, ctx = _inputs(tiny_cfg)
    tokens_per_frame = (16 // 2) * (16 // 2)
    mask = block_causal_mask(6, tokens_per_frame, chunk_frames=2)
    with torch.no_grad():
        a = tiny_model(x, t, ctx, mask=mask)
        x2 = x.clone()
        x2[:, :, 4:] = torch.randn_like(x2[:, :, 4:]) * 3  # change the last chunk only
        b = tiny_model(x2, t, ctx, mask=mask)
        x3 = x.clone()
        x3[:, :, 2:4] += 1.0  # change the middle chunk
        c = tiny_model(x3, t, ctx, mask=mask)
    assert torch.equal(a[:, :, :4], b[:, :, :4])
    assert not torch.allclose(a[:, :, 4:], b[:, :, 4:])
    assert torch.equal(a[:, :, :2], c[:, :, :2])
    assert not torch.allclose(a[:, :, 2:], c[:, :, 2:])


def test_block_causal_first_chunk_equals_running_it_alone(tiny_model, tiny_cfg):
    """Chunk 0 under the causal mask sees only itself: same as a forward on chunk 0 alone."""
    x, t, ctx = _inputs(tiny_cfg)
    mask = block_causal_mask(6, 64, chunk_frames=2)
    with torch.no_grad():
        full = tiny_model(x, t, ctx, mask=mask)
        alone = tiny_model(x[:, :, :2], t, ctx)
    torch.testing.assert_close(full[:, :, :2], alone, rtol=1e-5, atol=1e-6)


def test_bidirectional_mode_mixes_all_frames(tiny_model, tiny_cfg):
    x, t, ctx = _inputs(tiny_cfg)
    with torch.no_grad():
        a = tiny_model(x, t, ctx)
        x2 = x.clone()
        x2[:, :, -1] += 1.0
        b = tiny_model(x2, t, ctx)
    assert not torch.allclose(a[:, :, 0], b[:, :, 0])


def test_per_frame_timesteps_equal_scalar_when_constant(tiny_model, tiny_cfg):
    x, t, ctx = _inputs(tiny_cfg)
    with torch.no_grad():
        a = tiny_model(x, t, ctx)
        b = tiny_model(x, t[:, None].expand(-1, 6).contiguous(), ctx)
    assert torch.equal(a, b)


def test_frame_offset_shifts_rope_only_in_time(tiny_model, tiny_cfg):
    """RoPE is relative: a bidirectional forward is invariant to a global frame offset (up to rounding)."""
    x, t, ctx = _inputs(tiny_cfg)
    with torch.no_grad():
        a = tiny_model.double()(x.double(), t.double(), ctx.double())
        b = tiny_model(x.double(), t.double(), ctx.double(), frame_offset=37)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_bf16_parameters_run_without_autocast_and_track_fp32(tiny_model, tiny_cfg):
    """Inference keeps weights in bf16 with no autocast: every op must accept that, and stay close to fp32."""
    import copy

    x, t, ctx = _inputs(tiny_cfg)
    with torch.no_grad():
        ref = tiny_model(x, t, ctx)
        out = copy.deepcopy(tiny_model).bfloat16()(x.bfloat16(), t, ctx.bfloat16())
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel
