"""bench/memory_account.py: the meta-device memory model equals, byte for byte, the real tensors (parameters,
buffers, gradients, AdamW state) of the tiny model after one Trainer step, for every precision variant."""
from __future__ import annotations

import json

import pytest
import torch

from bench import memory_account as ma
from bench.train_variants import VARIANTS, build_variant_model, variant_tree
from dataloaders.latent_dataset import random_latent_dataset
from megatron_longlive.config import build_config
from megatron_longlive.training.trainer import TeacherForcingStep, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(variant, tmp_path, rank=4):
    tree = variant_tree(variant, rank if variant == "nvfp4_lora" else 0)
    return build_config({"model": {"preset": "tiny"},
                         "data": {"source": "zarr", "path": str(tmp_path / "none"), "height": 32, "width": 32,
                                  "num_frames": 5},
                         "quant": tree["quant"],
                         "train": {"output_dir": str(tmp_path / variant), "wandb_mode": "disabled", "max_steps": 2,
                                   "warmup_steps": 1, **tree["train"]}})


def _measure(cfg, packed_dtype=None, autocast=None):
    model = build_variant_model(cfg, "cpu", packed_dtype=packed_dtype)
    strategy = TeacherForcingStep(cfg.train.chunk_frames, device=torch.device("cpu"), autocast_dtype=autocast)
    trainer = Trainer(cfg, dataset=random_latent_dataset(cfg, 1), device="cpu", model=model, progress=False,
                      strategy=strategy)
    trainer.train_step()
    return ma.measured_state_bytes(trainer.model, trainer.optimizer)


@pytest.mark.parametrize("variant", VARIANTS)
def test_account_equals_real_tensor_bytes_after_one_step(variant, tmp_path):
    cfg = _cfg(variant, tmp_path)
    measured = _measure(cfg, packed_dtype=torch.float32)
    modelled = ma.account(ma.meta_model(cfg, packed_dtype=torch.float32))
    assert measured == modelled
    assert measured["adamw_moments"] == 2 * measured["gradients"] > 0


def test_bf16_lora_on_packed_base_as_on_the_gpu(tmp_path):
    """The GPU configuration of nvfp4_lora: bf16 base and adapters (so bf16 grads and AdamW moments)."""
    cfg = _cfg("nvfp4_lora", tmp_path, rank=8)
    measured = _measure(cfg, packed_dtype=torch.bfloat16, autocast=torch.bfloat16)
    modelled = ma.account(ma.meta_model(cfg, packed_dtype=torch.bfloat16))
    assert measured == modelled
    fp32 = ma.account(ma.meta_model(cfg, packed_dtype=torch.float32))
    assert 2 * modelled["adamw_moments"] == fp32["adamw_moments"]


def test_full_finetune_of_the_13b_config_is_16_bytes_per_parameter():
    """Independent parameter count (checked against diffusers' class in the model tests): 1,418,996,800."""
    model = ma.meta_model(ma.variant_config("wan2.1-1.3b", "bf16"))
    tensors = sum(1 for _ in model.parameters())
    assert ma.account(model)["total"] == 1_418_996_800 * 16 + 4 * tensors


def test_script_prints_and_records_the_model_ratio(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert ma.main(["--preset", "tiny", "--variants", "bf16", "nvfp4_lora", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["kind"] for r in rows] == ["model", "model"]
    assert all("not a measurement" in r["name"] for r in rows)
    assert rows[0]["ratio_to_bf16"] == 1.0 and 0 < rows[1]["ratio_to_bf16"] < 1
    assert "MODEL (not a measurement)" in capsys.readouterr().out
