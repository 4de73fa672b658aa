"""LoRA files for few-step sampling: peft on diffusers' Wan model as the oracle, merge vs switch, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_longlive.cli.main import main
from megatron_longlive.config import preset_config
from megatron_longlive.models.wan import WanDiT
from megatron_longlive.models.wan.convert import CheckpointMismatchError, load_wan_weights, save_wan_weights
from megatron_longlive.training import dmd
from megatron_longlive.training.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from megatron_longlive.training.lora_switch import (adapter_parameters, add_adapter, convert_adapter,
                                                    load_named_adapter, load_with_adapter, merge_adapter,
                                                    save_named_adapter, use_adapter)

TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
           "cross_attn.o", "ffn.0", "ffn.2"]


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    m = WanDiT(cfg)
    m.init_weights()
    torch.nn.init.normal_(m.head.head.weight, std=0.05)
    return m.eval()


def _randomize(model, name, seed=5, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def adapter_dir(tiny_cfg, tmp_path):
    """A tiny base (saved as native .safetensors) and a random rank-4 / alpha-8 adapter on it."""
    base = _model(tiny_cfg)
    save_wan_weights(base, str(tmp_path / "base.safetensors"))
    add_adapter(base, "g", TARGETS, rank=4, alpha=8.0)
    _randomize(base, "g")
    save_named_adapter(base, "g", str(tmp_path / "lora"), TARGETS)
    return tmp_path


def _inputs(cfg, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 3, 8, 8, generator=g)
    t = torch.rand(2, 3, generator=g) * 1000
    return x, t, torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)


def test_adapters_share_one_base_and_switch(tiny_cfg):
    model = _model(tiny_cfg)
    x, t, ctx = _inputs(tiny_cfg)
    ref = model(x, t, ctx)
    n_params = sum(p.numel() for p in model.parameters())
    add_adapter(model, "a", TARGETS, 4)
    add_adapter(model, "b", TARGETS, 2)
    assert sum(p.numel() for p in model.parameters()) == n_params + sum(p.numel() for n in "ab"
                                                                        for p in adapter_parameters(model, n))
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    with torch.no_grad():
        off = model(x, t, ctx)
        with use_adapter(model, "a"):
            ya = model(x, t, ctx)
            with use_adapter(model, "b"):
                yb = model(x, t, ctx)
            assert torch.equal(model(x, t, ctx), ya)          # restored on exit
    assert torch.equal(off, ref)                               # no adapter = the untouched base
    assert not torch.allclose(ya, ref) and not torch.allclose(yb, ya)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if ".lora_" in n]


def test_peft_on_diffusers_wan_matches_our_merged_weights(tiny_cfg, adapter_dir):
    """Adapter keys renamed with the converter's mapping; peft injects them into diffusers' WanTransformer3DModel."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    tmp = adapter_dir
    save_wan_weights(_model(tiny_cfg), str(tmp / "diffusers"), "diffusers")
    convert_adapter(str(tmp / "lora"), str(tmp / "lora_diffusers"), to="diffusers")
    conf = json.loads((tmp / "lora_diffusers" / ADAPTER_CONFIG).read_text())
    assert "attn1.to_q" in conf["target_modules"] and "ffn.net.0.proj" in conf["target_modules"]
    tensors = load_file(str(tmp / "lora_diffusers" / ADAPTER_WEIGHTS))
    assert "base_model.model.blocks.1.attn2.to_out.0.lora_B.weight" in tensors and len(tensors) == 2 * 10 * 2

    ref = WanTransformer3DModel.from_pretrained(str(tmp / "diffusers")).eval()
    inject_adapter_in_model(LoraConfig(r=conf["r"], lora_alpha=conf["lora_alpha"],
                                       target_modules=conf["target_modules"]), ref)
    result = set_peft_model_state_dict(ref, {k[len("base_model.model."):]: v for k, v in tensors.items()})
    assert not getattr(result, "unexpected_keys", [])
    ours = load_with_adapter(_model(tiny_cfg), str(tmp / "lora"), merge=True)
    x, t, ctx = _inputs(tiny_cfg)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = ref(x, t.repeat_interleave(16, dim=1), ctx).sample       # per-token timesteps (8x8 latents, 2x2 patch)
        base = _model(tiny_cfg)(x, t, ctx)
    assert (a - base).abs().max() > 1e-2                                # the adapter changes the output
    assert (a - b).abs().max().item() <= 1e-5


def test_merge_lora_cli_equals_runtime_switch(tiny_cfg, adapter_dir):
    tmp = adapter_dir
    for adapter in ("lora", "lora_d"):
        if adapter == "lora_d":   # a diffusers-named adapter merges the same
            convert_adapter(str(tmp / "lora"), str(tmp / "lora_d"), to="diffusers")
        assert main(["convert", "--src", str(tmp / "base.safetensors"), "--dst", str(tmp / f"merged_{adapter}"),
                     "--to", "native", "--merge-lora", str(tmp / adapter), "--quiet"]) == 0
    merged, merged_d = _model(tiny_cfg, seed=9), _model(tiny_cfg, seed=9)
    load_wan_weights(merged, str(tmp / "merged_lora"))
    load_wan_weights(merged_d, str(tmp / "merged_lora_d"))
    sd_d = merged_d.state_dict()
    assert all(torch.equal(v, sd_d[k]) for k, v in merged.state_dict().items())
    switched = _model(tiny_cfg)
    load_wan_weights(switched, str(tmp / "base.safetensors"))
    load_with_adapter(switched, str(tmp / "lora"), merge=False)
    prompts = torch.randn(2, tiny_cfg.text_len, tiny_cfg.text_dim, generator=torch.Generator().manual_seed(1))
    for steps in ([1000, 750, 500, 250], [1000, 667, 333], [1000, 500], [1000]):       # 4/3/2/1-step lists
        a = dmd.sample(merged, prompts, [0], steps, 1, 2, (8, 8))
        b = dmd.sample(switched, prompts, [0], steps, 1, 2, (8, 8))
        assert (a - b).abs().max().item() <= 1e-5, steps
    bare = dmd.sample(switched, prompts, [0], [1000], 1, 2, (8, 8), adapter=None)
    assert (bare - b).abs().max() > 1e-3                                 # switching the LoRA off changes samples


def test_bad_adapters_give_clear_errors(tiny_cfg, adapter_dir, tmp_path):
    tmp = adapter_dir
    conf = json.loads((tmp / "lora" / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(tmp / "lora" / ADAPTER_WEIGHTS))

    def variant(name, conf_changes=None, tensors_fn=None):
        d = tmp_path / name
        d.mkdir()
        (d / ADAPTER_CONFIG).write_text(json.dumps({**conf, **(conf_changes or {})}))
        save_file(tensors_fn(dict(tensors)) if tensors_fn else tensors, str(d / ADAPTER_WEIGHTS))
        return str(d)

    with pytest.raises(ValueError, match=r"target_modules \['attn1.to_q'\] match no linear module"):
        load_named_adapter(_model(tiny_cfg), "x", variant("targets", {"target_modules": ["attn1.to_q"]}))
    with pytest.raises(ValueError, match="not covered by target_modules"):
        load_named_adapter(_model(tiny_cfg), "x", variant("cover", {"target_modules": ["self_attn.q"]}))
    with pytest.raises(ValueError, match=r"rank 4 .* says r=8\. Fix"):
        load_named_adapter(_model(tiny_cfg), "x", variant("rank", {"r": 8}))
    with pytest.raises(ValueError, match="missing field 'lora_alpha'"):
        bad = {k: v for k, v in conf.items() if k != "lora_alpha"}
        d = variant("alpha")
        (tmp_path / "alpha" / ADAPTER_CONFIG).write_text(json.dumps(bad))
        load_named_adapter(_model(tiny_cfg), "x", d)
    model = _model(tiny_cfg)
    add_adapter(model, "x", TARGETS, rank=4, alpha=4.0)
    with pytest.raises(ValueError, match=r"exists with r=4, alpha=4.0 but the file has r=4, lora_alpha=8.0"):
        load_named_adapter(model, "x", str(tmp / "lora"))
    wide = preset_config("tiny", dim=96, num_heads=2, ffn_dim=128)
    with pytest.raises(ValueError, match=r"adapter is 64->64 but the base layer is 96->96.*another config"):
        load_named_adapter(_model(wide), "x", str(tmp / "lora"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json: LoRA adapter file missing"):
        load_named_adapter(_model(tiny_cfg), "x", str(tmp_path / "nowhere"))
    # a base checkpoint of another config under --merge-lora / load_base: strict loader names the mismatch
    save_wan_weights(_model(wide), str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="mis-shaped keys"):
        load_wan_weights(_model(tiny_cfg), str(tmp_path / "wide.safetensors"))
    assert main(["convert", "--src", str(tmp_path / "wide.safetensors"), "--dst", str(tmp_path / "m"), "--to",
                 "native", "--merge-lora", str(tmp / "lora"), "--num-heads", "2", "--quiet"]) == 2
    with pytest.raises(ValueError, match="another config"):
        from megatron_longlive.training.lora_switch import merge_lora_checkpoint
        merge_lora_checkpoint(str(tmp_path / "wide.safetensors"), str(tmp_path / "m2"), "native", str(tmp / "lora"),
                              num_heads=2, progress=False)
