"""`longlive generate --lora`: a few-step adapter on a base checkpoint equals the checkpoint merged by
`longlive convert --merge-lora` (an independent path), and changes the output."""
from __future__ import annotations

import torch

from generate_helpers import GEN, tiny_dit

from megatron_longlive.cli.main import main
from megatron_longlive.models.wan.convert import save_wan_weights
from megatron_longlive.training.lora_switch import add_adapter, adapter_parameters, save_named_adapter


def test_generate_with_lora_equals_merged_checkpoint(tmp_path, tiny_cfg):
    base = tiny_dit(tiny_cfg, head_std=0.02)
    save_wan_weights(base, tmp_path / "base.safetensors")
    targets = ["self_attn.q", "ffn.0"]
    add_adapter(base, "fewstep", targets, rank=4)
    with torch.no_grad():
        for p in adapter_parameters(base, "fewstep"):
            p.normal_(std=0.2)  # a non-zero LoRA (fresh ones have B = 0)
    save_named_adapter(base, "fewstep", str(tmp_path / "adapter"), targets)
    assert main(["convert", "--src", str(tmp_path / "base.safetensors"), "--dst", str(tmp_path / "merged.safetensors"),
                 "--to", "native", "--merge-lora", str(tmp_path / "adapter"), "--quiet"]) == 0

    def generate(checkpoint, name, *extra):
        latents = tmp_path / f"{name}.pt"
        assert main(["generate", "--checkpoint", str(checkpoint), "--out", str(tmp_path / f"{name}.mp4"),
                     "--latents-out", str(latents), *extra, *GEN]) == 0
        return torch.load(latents)

    plain = generate(tmp_path / "base.safetensors", "plain")
    with_lora = generate(tmp_path / "base.safetensors", "lora", "--lora", str(tmp_path / "adapter"))
    merged = generate(tmp_path / "merged.safetensors", "merged")
    get = (lambda d: d["latents"] if isinstance(d, dict) else d)
    torch.testing.assert_close(get(with_lora), get(merged), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(get(with_lora), get(plain), atol=1e-3)


def test_generate_with_missing_lora_dir_fails_clearly(tmp_path, capsys):
    assert main(["generate", "--lora", str(tmp_path / "nope"), "--out", str(tmp_path / "x.mp4"), *GEN]) == 2
    assert "--lora" in capsys.readouterr().err


def test_lora_resolves_a_distill_output_directory(tmp_path, tiny_cfg):
    """--lora accepts what `longlive distill` writes: its output dir (newest step_*/generator), one step dir
    (generator/), or the adapter dir itself; a dir without an adapter names the three places it looked."""
    import os

    import pytest

    from megatron_longlive.training.lora import resolve_adapter_dir

    model = tiny_dit(tiny_cfg, head_std=0.02)
    add_adapter(model, "fewstep", ["self_attn.q"], rank=2)
    out = tmp_path / "distill"
    for step in ("step_000010", "step_000020"):
        for role in ("generator", "critic"):
            save_named_adapter(model, "fewstep", str(out / step / role), ["self_attn.q"])
    newest = str(out / "step_000020" / "generator")
    assert resolve_adapter_dir(str(out)) == newest
    assert resolve_adapter_dir(str(out / "step_000010")) == str(out / "step_000010" / "generator")
    assert resolve_adapter_dir(newest) == newest
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="step_\\*/generator"):
        resolve_adapter_dir(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_adapter_dir(str(tmp_path / "nope"))
