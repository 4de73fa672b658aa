"""`longlive generate` honours quant.kv_cache (NVFP4 KV pages) and quant.linear (W4A4 / W8A8 linears)."""
from __future__ import annotations

import torch

from generate_helpers import GEN, tiny_dit

from megatron_longlive.cli.main import main
from megatron_longlive.config import load_config
from megatron_longlive.inference.engine import StreamingEngine
from megatron_longlive.inference.pipeline import load_dit
from megatron_longlive.models.wan.convert import save_wan_weights
from megatron_longlive.quant.nvfp4.kv_cache import NVFP4KVCache
from megatron_longlive.quant.nvfp4.linear import NVFP4Linear


def _weights(tmp_path, tiny_cfg):
    model = tiny_dit(tiny_cfg)
    path = tmp_path / "w.safetensors"
    save_wan_weights(model, path)
    return path


def _generate(tmp_path, weights, name, *sets):
    latents = tmp_path / f"{name}.pt"
    extra = [a for s in sets for a in ("--set", s)]
    assert main(["generate", "--checkpoint", str(weights), "--out", str(tmp_path / f"{name}.mp4"),
                 "--latents-out", str(latents), *GEN, *extra]) == 0
    d = torch.load(latents)
    return d["latents"] if isinstance(d, dict) else d


def _psnr(a, b):
    return 10 * torch.log10((a.abs().max() ** 2) / (a - b).pow(2).mean())


def test_nvfp4_kv_cache_and_w4a4_change_output_within_a_budget(tmp_path, tiny_cfg):
    weights = _weights(tmp_path, tiny_cfg)
    ref = _generate(tmp_path, weights, "bf16")
    kv = _generate(tmp_path, weights, "kv", "quant.kv_cache=nvfp4")
    w4a4 = _generate(tmp_path, weights, "w4a4", "quant.linear=nvfp4_emulated")
    for name, out in (("nvfp4 kv", kv), ("w4a4", w4a4)):
        assert not torch.equal(out, ref), f"{name} was not applied"
        assert _psnr(ref, out) > 20, (name, _psnr(ref, out))  # quantized, not broken


def test_config_selects_cache_and_linears(tmp_path, tiny_cfg):
    cfg = load_config(None, ["quant.linear=nvfp4_emulated", "quant.kv_cache=nvfp4", "infer.chunk_frames=1",
                             "infer.window_frames=3", "infer.sink_frames=1"])
    model = load_dit(cfg, None)
    assert isinstance(model.blocks[0].self_attn.q, NVFP4Linear)
    assert type(model.head.head) is torch.nn.Linear  # kept in high precision
    engine = StreamingEngine(model, cfg.infer, (4, 4), kv_cache=cfg.quant.kv_cache)
    assert isinstance(engine.cache, NVFP4KVCache)
