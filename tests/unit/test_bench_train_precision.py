"""bench/bench_train_step.py --quant on the tiny model on CPU: all four precision variants, built as training
builds them, timed and recorded with their ratios to bf16; the NVFP4+LoRA variant trains only the adapters."""
from __future__ import annotations

import json

import pytest
import torch

from bench import bench_train_step as bench
from bench.train_variants import VARIANTS, build_variant_model, count_quantized, variant_tree
from dataloaders.latent_dataset import random_latent_dataset
from megatron_longlive.config import build_config, preset_config
from megatron_longlive.quant.nvfp4.packed import PackedNVFP4Linear
from megatron_longlive.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "tiny", "--device", "cpu", "--latent-frames", "2", "--height", "32", "--width", "32",
        "--chunk-frames", "1", "--steps", "1", "--warmup", "0"]


def test_all_variants_run_on_cpu_and_record_ratios(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert bench.main([*TINY, "--quant", *VARIANTS, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [(r["variant"], r["metric"]) for r in rows] == [
        (v, m) for v in VARIANTS for m in ("step_time", "tokens_per_s", "state_memory")]
    by = {(r["variant"], r["metric"]): r for r in rows}
    # bf16 keeps the row names of the runs recorded before --quant existed
    assert by["bf16", "step_time"]["name"] == "tiny train step 2x32x32 chunk1 mb1 fp32"
    assert by["nvfp4_lora", "step_time"]["name"].endswith("fp32 nvfp4_lora r16")
    for (v, m), r in by.items():
        assert r["value"] > 0 and r["ratio_to_bf16"] == pytest.approx(r["value"] / by["bf16", m]["value"], rel=1e-2)
    assert by["bf16", "step_time"]["quantized_modules"] == {}
    assert by["fp8", "step_time"]["quantized_modules"] == {"FP8Linear": 20}       # 2 blocks x (8 attn + 2 ffn)
    assert by["nvfp4_emulated", "step_time"]["quantized_modules"] == {"NVFP4Linear": 20}
    assert by["nvfp4_lora", "step_time"]["quantized_modules"] == {"PackedNVFP4Linear": 20}
    # full fine-tunes hold the same states; NVFP4 + LoRA trains 16-rank adapters on the 10 target linears per block
    assert by["fp8", "state_memory"]["value"] == by["bf16", "state_memory"]["value"]
    assert by["nvfp4_lora", "state_memory"]["ratio_to_bf16"] < 0.5
    # rank-16 adapters, r * (in + out) each, on q/k/v/o of both attentions (dim -> dim) and ffn.0 / ffn.2
    m = preset_config("tiny")
    lora = m.num_layers * 16 * (8 * 2 * m.dim + 2 * (m.dim + m.ffn_dim))
    assert by["nvfp4_lora", "step_time"]["trainable_params"] == lora
    assert by["bf16", "step_time"]["trainable_params"] == sum(p.numel() for p in build_variant_model(
        _tiny_cfg("bf16", tmp_path, rank=0), "meta").parameters())
    table = capsys.readouterr().out
    assert "x bf16" in table and "nvfp4_lora r16" in table


def _tiny_cfg(variant: str, tmp_path, rank: int = 4):
    tree = variant_tree(variant, rank)
    return build_config({"model": {"preset": "tiny"},
                         "data": {"source": "zarr", "path": str(tmp_path / "none"), "height": 32, "width": 32,
                                  "num_frames": 5},
                         "quant": tree["quant"],
                         "train": {"output_dir": str(tmp_path / variant), "wandb_mode": "disabled", "max_steps": 3,
                                   "warmup_steps": 1, "lr": 1e-2, **tree["train"]}})


def test_nvfp4_lora_trains_only_the_adapters_on_a_frozen_packed_base(tmp_path):
    cfg = _tiny_cfg("nvfp4_lora", tmp_path)
    model = build_variant_model(cfg, "cpu")
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # Wan's zero head would give zero adapter gradients
    trainer = Trainer(cfg, dataset=random_latent_dataset(cfg, 2), device="cpu", model=model, progress=False)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    opt_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert opt_params and all(".lora_A." in names[id(p)] or ".lora_B." in names[id(p)] for p in opt_params)
    assert len(opt_params) == 2 * 20
    packed = {n: b.clone() for n, b in trainer.model.named_buffers()}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.endswith("lora_B.weight")}
    for _ in range(2):
        trainer.train_step()
    assert all(torch.equal(b, packed[n]) for n, b in trainer.model.named_buffers())
    assert all(torch.equal(p, frozen[n]) for n, p in trainer.model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, lora_b[n]) for n, p in trainer.model.named_parameters() if n in lora_b)
    assert sum(isinstance(m, PackedNVFP4Linear) for m in trainer.model.modules()) == 20


def test_variants_use_the_providers_keep_list(tmp_path):
    cfg = _tiny_cfg("nvfp4_emulated", tmp_path, rank=0)
    model = build_variant_model(cfg, "cpu")
    assert count_quantized(model)["NVFP4Linear"] == 20
    assert type(model.head.head) is torch.nn.Linear          # quant.keep_high_precision: head.*


def test_bad_arguments_fail_loudly(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--quant", "int8"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--quant", "bf16", "bf16"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])
        assert "CUDA is not available" in capsys.readouterr().err


def test_a_failing_variant_exits_nonzero_and_keeps_the_others(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    # 3 latent frames with 2-frame chunks: the trainer rejects the config, for every variant
    rc = bench.main([*TINY[:-6], "--latent-frames", "3", "--chunk-frames", "2", "--steps", "1", "--warmup", "0",
                     "--quant", "bf16", "--out", str(out)])
    assert rc == 1
    assert "FAILED bf16: ValueError" in capsys.readouterr().err
    assert not out.exists()
