"""bench/bench_train_step.py --quant on CUDA at the tiny scale: every precision variant builds and steps on the GPU
(bf16 autocast, activation checkpointing, packed NVFP4 base with bf16 adapters) and reports peak memory, and the
memory account still equals the real tensors there."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_all_variants_step_on_cuda(tmp_path):
    from bench import bench_train_step as bench
    from bench.train_variants import VARIANTS

    out = tmp_path / "r.jsonl"
    assert bench.main(["--preset", "tiny", "--device", "cuda", "--latent-frames", "4", "--height", "64", "--width",
                       "64", "--chunk-frames", "1", "--steps", "2", "--warmup", "1", "--quant", *VARIANTS,
                       "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out)]
    peaks = {r["variant"]: r["value"] for r in rows if r["metric"] == "peak_memory"}
    assert set(peaks) == set(VARIANTS) and all(v > 0 for v in peaks.values())


def test_bf16_lora_account_matches_cuda_tensors(tmp_path):
    from bench import memory_account as ma
    from bench.train_variants import build_variant_model, variant_tree
    from dataloaders.latent_dataset import random_latent_dataset
    from megatron_longlive.config import build_config
    from megatron_longlive.training.trainer import Trainer

    tree = variant_tree("nvfp4_lora", 8)
    cfg = build_config({"model": {"preset": "tiny"}, "quant": tree["quant"],
                        "data": {"source": "zarr", "path": str(tmp_path / "x"), "height": 32, "width": 32,
                                 "num_frames": 5},
                        "train": {"output_dir": str(tmp_path / "o"), "wandb_mode": "disabled", "precision": "bf16",
                                  **tree["train"]}})
    trainer = Trainer(cfg, dataset=random_latent_dataset(cfg, 1), device="cuda",
                      model=build_variant_model(cfg, "cuda"), progress=False)
    trainer.train_step()
    measured = ma.measured_state_bytes(trainer.model, trainer.optimizer)
    assert measured == ma.account(ma.meta_model(cfg, packed_dtype=torch.bfloat16))
