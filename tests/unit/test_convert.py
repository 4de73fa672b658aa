"""Weight conversion official <-> diffusers <-> native, checked against diffusers' own WanTransformer3DModel.

The diffusers model is the independent oracle: weights travel through our converter *on disk* and
diffusers' `from_pretrained` / `save_pretrained` read and write them; outputs must agree (float32,
max abs diff <= 1e-5), round trips must be bitwise, and bad checkpoints must fail naming the keys.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_longlive.config import preset_config
from megatron_longlive.models.wan import WanDiT
from megatron_longlive.models.wan import checkpoint_io as cio
from megatron_longlive.models.wan.convert import (CheckpointMismatchError, convert_checkpoint, infer_config,
                                                  load_wan_weights, rename_keys, save_wan_weights, summarize)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _diffusers_model(cfg, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                                 attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
                                 out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                                 ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers).eval()


def _inputs(cfg, batch=2, frames=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, frames, 16, 16, generator=g)
    t = torch.rand(batch, frames, generator=g) * 1000  # per-frame timesteps [B, F], distinct per frame
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return x, t, ctx


def _both_forwards(ours, ref, cfg):
    x, t, ctx = _inputs(cfg)
    tokens_per_frame = (16 // cfg.patch_size[1]) * (16 // cfg.patch_size[2])
    with torch.no_grad():
        a = ours(x, t, ctx)
        # diffusers takes per-token timesteps [B, S]: expand each frame's t over its tokens
        b = ref(x, t.repeat_interleave(tokens_per_frame, dim=1), ctx).sample
    return a, b


def _read_dir(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


# ----- equivalence with diffusers through the converter ---------------------------------------------
def test_native_saved_then_converted_loads_in_diffusers_and_matches(tiny_model, tiny_cfg, tmp_path):
    from diffusers import WanTransformer3DModel

    save_wan_weights(tiny_model, tmp_path / "native", max_shard_size="40KB")
    assert (tmp_path / "native" / "model.safetensors.index.json").exists()
    convert_checkpoint(str(tmp_path / "native"), str(tmp_path / "diffusers"), "diffusers", max_shard_size="60KB",
                       progress=False)
    assert (tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ref = WanTransformer3DModel.from_pretrained(str(tmp_path / "diffusers")).eval()
    # every parameter diffusers expects came from our files, none left over
    assert set(_read_dir(tmp_path / "diffusers")) == set(ref.state_dict())
    a, b = _both_forwards(tiny_model, ref, tiny_cfg)
    assert (a - b).abs().max().item() <= 1e-5
    assert a.abs().max().item() > 0.1  # a real signal, not zeros


def test_diffusers_save_pretrained_converted_to_native_matches(tiny_cfg, tmp_path):
    ref = _diffusers_model(tiny_cfg, seed=7)  # diffusers' own random init
    ref.save_pretrained(str(tmp_path / "diffusers"), max_shard_size="50KB")
    summary = convert_checkpoint(str(tmp_path / "diffusers"), str(tmp_path / "native"), "native", progress=False)
    assert summary["source_format"] == "diffusers" and summary["num_heads_from"] == "config.json"
    ours = WanDiT(tiny_cfg).eval()
    assert load_wan_weights(ours, str(tmp_path / "native")) == "native"
    a, b = _both_forwards(ours, ref, tiny_cfg)
    assert (a - b).abs().max().item() <= 1e-5
    # and directly from the diffusers directory, no intermediate file
    direct = WanDiT(tiny_cfg).eval()
    assert load_wan_weights(direct, str(tmp_path / "diffusers")) == "diffusers"
    assert all(torch.equal(p, q) for p, q in zip(ours.state_dict().values(), direct.state_dict().values()))


def test_key_mapping_equals_diffusers_single_file_converter(tiny_model):
    """A second, independent implementation of official -> diffusers names: diffusers' own single-file loader."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = tiny_model.state_dict()
    theirs = convert_wan_transformer_to_diffusers({"model.diffusion_model." + k: v for k, v in sd.items()})
    ours = rename_keys(list(sd), "native", "diffusers")  # {diffusers name: native name}
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], sd[ours[k]]) for k in theirs)


# ----- bitwise round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shard", ["5GB", "30KB"])
def test_round_trips_are_bitwise(tiny_model, tiny_cfg, tmp_path, dtype, shard):
    from diffusers import WanTransformer3DModel

    model = tiny_model.to(dtype)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    save_wan_weights(model, tmp_path / "n0", max_shard_size=shard)
    hops = [("n0", "official", "o1"), ("o1", "diffusers", "d1"), ("d1", "native", "n1"), ("n1", "diffusers", "d2"),
            ("d2", "official", "o2"), ("o2", "native", "n2")]
    for src, fmt, dst in hops:
        convert_checkpoint(str(tmp_path / src), str(tmp_path / dst), fmt, max_shard_size=shard, progress=False)
        sharded = (tmp_path / dst / f"{cio.BASE_NAMES[fmt]}.safetensors.index.json").exists()
        assert sharded == (shard == "30KB")
    for name in ("n0", "o1", "n1", "o2", "n2"):
        got = _read_dir(tmp_path / name)
        assert set(got) == set(original), name
        assert all(got[k].dtype == dtype and torch.equal(got[k], original[k]) for k in original), name
    with torch.device("meta"):
        diffusers_keys = set(_diffusers_model(tiny_cfg).state_dict())
    for name in ("d1", "d2"):
        got = _read_dir(tmp_path / name)
        assert set(got) == diffusers_keys
        back = rename_keys(list(got), "diffusers", "native")
        assert all(torch.equal(got[old], original[new]) for new, old in back.items())
    # diffusers reads the bf16 / fp32 files and hands back the same bytes
    ref = WanTransformer3DModel.from_pretrained(str(tmp_path / "d2"), torch_dtype=dtype)
    d2 = _read_dir(tmp_path / "d2")
    assert all(torch.equal(v, d2[k]) for k, v in ref.state_dict().items())


def test_dtype_cast_and_single_file_output(tiny_model, tmp_path):
    save_wan_weights(tiny_model, tmp_path / "n")
    convert_checkpoint(str(tmp_path / "n"), str(tmp_path / "one.safetensors"), "diffusers", dtype="bf16",
                       progress=False)
    got = load_file(str(tmp_path / "one.safetensors"))
    sd = tiny_model.state_dict()
    for native, theirs in rename_keys(list(got), "diffusers", "native").items():
        assert got[theirs].dtype == torch.bfloat16 and torch.equal(got[theirs], sd[native].to(torch.bfloat16))


def test_official_config_round_trips_and_is_read_back(tiny_model, tmp_path):
    save_wan_weights(tiny_model, tmp_path / "o", to="official")
    cfg_json = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg_json["_class_name"] == "WanModel"
    assert {k: cfg_json[k] for k in ("dim", "in_dim", "out_dim", "num_heads", "num_layers", "ffn_dim", "text_len")} == \
        dict(dim=64, in_dim=16, out_dim=16, num_heads=2, num_layers=2, ffn_dim=128, text_len=16)
    fmt, cfg = cio.read_config_json(cfg_json)
    assert fmt == "official" and cfg == tiny_model.cfg


@pytest.mark.parametrize("name", ["wan2.1-1.3b", "wan2.2-ti2v-5b", "wan2.1-14b"])
def test_preset_configs_through_diffusers_and_official_config_json(name):
    """Our diffusers config.json builds diffusers' class with the official parameter count; all flavours read back."""
    from diffusers import WanTransformer3DModel

    cfg = preset_config(name)
    with torch.device("meta"):
        ref = WanTransformer3DModel.from_config(cio.config_to_diffusers(cfg))
        ours = WanDiT(cfg)
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in ours.parameters())
    for fmt in ("native", "official", "diffusers"):
        assert cio.read_config_json(json.loads(json.dumps(cio.config_json_for(fmt, cfg)))) == (fmt, cfg)
    # shapes alone identify the preset (heads come from it), in both key flavours
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert infer_config(shapes, "official") == (cfg, f"preset {name}")
    dshapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert infer_config(dshapes, "diffusers")[0] == cfg


def test_published_config_files_read_as_the_presets():
    """config.json files as published for Wan2.1-T2V-1.3B (official repo and -Diffusers transformer/)."""
    official = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06, "ffn_dim": 8960,
                "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12, "num_layers": 30, "out_dim": 16,
                "text_len": 512}
    diffusers = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0", "added_kv_proj_dim": None,
                 "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256,
                 "image_dim": None, "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
                 "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
                 "text_dim": 4096}
    assert cio.read_config_json(official) == ("official", preset_config("wan2.1-1.3b"))
    assert cio.read_config_json(diffusers) == ("diffusers", preset_config("wan2.1-1.3b"))
    with pytest.raises(ValueError, match="model_type='i2v' is not supported"):
        cio.read_config_json({**official, "model_type": "i2v"})
    with pytest.raises(ValueError, match="image_dim=1280"):
        cio.read_config_json({**diffusers, "image_dim": 1280})


# ----- wrappers, LoRA keys, info --------------------------------------------------------------------------
def test_pt_container_with_comfy_prefix_loads(tiny_model, tiny_cfg, tmp_path):
    sd = {"model.diffusion_model." + k: v for k, v in tiny_model.state_dict().items()}
    torch.save({"generator_ema": sd, "step": torch.tensor(3)}, tmp_path / "ckpt.pt")
    other = WanDiT(tiny_cfg)
    assert load_wan_weights(other, str(tmp_path / "ckpt.pt")) == "official"
    assert all(torch.equal(p, q) for p, q in zip(tiny_model.state_dict().values(), other.state_dict().values()))
    torch.save({"a": sd, "b": 1}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="--state-key"):
        load_wan_weights(other, str(tmp_path / "two.pt"))
    load_wan_weights(other, str(tmp_path / "two.pt"), state_key="a")


def test_lora_keys_convert_and_are_reported(tiny_model, tmp_path):
    from safetensors.torch import save_file

    sd = dict(tiny_model.state_dict())
    sd["blocks.0.self_attn.q.lora_A.weight"] = torch.randn(4, 64)
    sd["blocks.0.self_attn.q.lora_B.weight"] = torch.randn(64, 4)
    save_file(sd, str(tmp_path / "with_lora.safetensors"))
    s = summarize(cio.open_checkpoint(tmp_path / "with_lora.safetensors"))
    assert s["has_lora"] and s["num_lora_parameters"] == 512
    assert s["num_parameters"] == sum(v.numel() for v in tiny_model.state_dict().values())
    assert s["config"]["preset"] == "tiny" and s["num_heads_from"] == "preset tiny"
    convert_checkpoint(str(tmp_path / "with_lora.safetensors"), str(tmp_path / "d"), "diffusers", progress=False)
    got = _read_dir(tmp_path / "d")
    assert torch.equal(got["blocks.0.attn1.to_q.lora_B.weight"], sd["blocks.0.self_attn.q.lora_B.weight"])
    with pytest.raises(CheckpointMismatchError, match="LoRA"):
        load_wan_weights(WanDiT(tiny_model.cfg), str(tmp_path / "with_lora.safetensors"))


def test_info_on_a_peft_adapter_directory(tiny_cfg, tmp_path):
    from megatron_longlive.config import TrainConfig
    from megatron_longlive.training.lora import apply_lora, save_adapter

    model = WanDiT(tiny_cfg)
    apply_lora(model, TrainConfig().lora_targets, rank=4)
    save_adapter(model, str(tmp_path / "adapter"))
    s = summarize(cio.open_checkpoint(tmp_path / "adapter"))
    assert s["prefix"] == "base_model.model." and s["format"] == "official"
    assert s["has_lora"] and s["num_lora_tensors"] == 2 * 10 * tiny_cfg.num_layers and s["num_parameters"] == 0
    assert s["config"] is None and "only LoRA adapter tensors" in s["config_error"]


def test_cli_convert_and_info_end_to_end(tiny_model, tmp_path, capsys):
    from megatron_longlive.cli.main import main

    save_wan_weights(tiny_model, tmp_path / "n")
    # a real process: the console entry point's module, its progress bar and exit code
    r = subprocess.run([sys.executable, "-m", "megatron_longlive.cli.main", "convert", "--src", str(tmp_path / "n"),
                        "--dst", str(tmp_path / "d"), "--to", "diffusers", "--max-shard-size", "50KB", "--dtype", "bf16"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "shards" in r.stderr and "converted native -> diffusers" in r.stdout  # tqdm progress over shards
    assert len([f for f in os.listdir(tmp_path / "d") if f.endswith(".safetensors")]) > 1
    assert main(["info", str(tmp_path / "d"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "diffusers" and info["config"]["dim"] == 64 and info["config"]["num_heads"] == 2
    assert info["parameters_by_dtype"] == {"bfloat16": info["num_parameters"]} and not info["has_lora"]
    assert main(["info", str(tmp_path / "n")]) == 0
    text = capsys.readouterr().out
    assert "format:      native" in text and "heads=2" in text and "lora:        no" in text
    assert main(["convert", "--src", str(tmp_path / "n"), "--dst", str(tmp_path / "d"), "--to", "diffusers"]) == 2
    assert "already holds weights" in capsys.readouterr().err


# ----- bad checkpoints -----------------------------------------------------------------------------------
def _expect_mismatch(model, sd):
    with pytest.raises(CheckpointMismatchError) as e:
        load_wan_weights(model, sd)
    return str(e.value)


def test_missing_unexpected_and_misshaped_keys_are_listed(tiny_model, tiny_cfg):
    sd = dict(tiny_model.state_dict())
    target = WanDiT(tiny_cfg)
    msg = _expect_mismatch(target, {k: v for k, v in sd.items() if k not in ("blocks.1.ffn.2.bias", "head.modulation")})
    assert "missing keys (2)" in msg and "blocks.1.ffn.2.bias" in msg and "head.modulation" in msg
    msg = _expect_mismatch(target, {**sd, "blocks.0.self_attn.extra.weight": torch.zeros(3)})
    assert "unexpected keys (1)" in msg and "blocks.0.self_attn.extra.weight" in msg
    bigger = WanDiT(preset_config("tiny", ffn_dim=96, num_layers=3))
    msg = _expect_mismatch(target, bigger.state_dict())
    assert "blocks.0.ffn.0.weight (expected (128, 64), got (96, 64))" in msg
    assert "unexpected keys" in msg and "blocks.2.modulation" in msg
    assert "Hint: this looks like an official checkpoint of a custom model (dim=64, num_layers=3, ffn_dim=96" in msg
    # nothing was loaded into the target by the failed attempts
    fresh = WanDiT(tiny_cfg)
    assert not torch.equal(target.blocks[0].ffn[0].weight, fresh.blocks[0].ffn[0].weight)


def test_hint_names_the_preset_of_a_big_checkpoint(tiny_cfg):
    """A (partial) diffusers-named 1.3B checkpoint loaded into the tiny model says which preset it is."""
    big = preset_config("wan2.1-1.3b")
    shapes = {"patch_embedding.weight": (1536, 16, 1, 2, 2), "condition_embedder.text_embedder.linear_1.weight": (1536, 4096),
              "condition_embedder.time_embedder.linear_1.weight": (1536, 256), "blocks.0.ffn.net.0.proj.weight": (8960, 1536),
              "blocks.0.attn1.norm_q.weight": (1536,), "blocks.0.norm2.weight": (1536,), "blocks.29.norm2.weight": (1536,),
              "proj_out.weight": (64, 1536)}
    sd = {k: torch.empty(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    msg = _expect_mismatch(WanDiT(tiny_cfg), sd)
    assert "this looks like a diffusers checkpoint of a wan2.1-1.3b model (dim=1536, num_layers=30" in msg
    assert "your config is tiny (dim=64" in msg and "Fix: set model.preset=wan2.1-1.3b" in msg
    assert "blocks.29.norm3.weight" in msg  # keys are reported with native names
    assert big.num_layers == 30


def test_conversion_rejects_unknown_keys_and_inconsistent_config(tiny_model, tmp_path):
    from safetensors.torch import save_file

    sd = dict(tiny_model.state_dict())
    save_file({**sd, "blocks.0.cross_attn.k_img.weight": torch.zeros(64, 64), "img_emb.proj.0.weight": torch.zeros(8)},
              str(tmp_path / "i2v.safetensors"))
    with pytest.raises(ValueError, match=r"2 key\(s\).*blocks.0.cross_attn.k_img.weight.*img_emb.proj.0.weight"):
        convert_checkpoint(str(tmp_path / "i2v.safetensors"), str(tmp_path / "x"), "diffusers", progress=False)
    save_wan_weights(tiny_model, tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["model"]["ffn_dim"] = 256
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json disagrees with the weights on ffn_dim \(config 256, weights 128\)"):
        convert_checkpoint(str(tmp_path / "bad"), str(tmp_path / "y"), "official", progress=False)
    with pytest.raises(ValueError, match="not a size"):
        cio.parse_size("5 apples")
    assert cio.parse_size("5GB") == 5 * 10**9 and cio.parse_size("2MiB") == 2 * 2**20
