"""Build the tiny-model fidelity example in examples/eval/tiny_model/ (CPU; about 20 minutes on a busy 2-core box).

Weights: the tiny DiT (examples/configs/tiny.yaml) with Wan's seeded init and a non-zero head (Wan's init
zeroes the head, which makes every sampler return its input noise, so all variants would agree trivially).
They are random, not trained: the numbers show the machinery and the size of each setting's effect on
this model, not video quality. Then runs the command a user would:

  python examples/eval/make_tiny_model_example.py     # writes build/eval_example/tiny_random.safetensors, then:
  longlive eval -c examples/configs/tiny.yaml --checkpoint build/eval_example/tiny_random.safetensors \
      --set data.num_videos=4 --set data.path=build/eval_example/synthetic_data \
      --prompt "a red square slides right@0" --prompt "a blue circle moves down@4" \
      --variant bf16 --variant steps2 infer.denoising_steps=[1000,500] \
      --variant nvfp4_ptq quant.linear=nvfp4_emulated --variant nvfp4_kv quant.kv_cache=nvfp4 \
      --variant nvfp4_qat quant.linear=nvfp4_emulated train.lr=1e-4 qat.steps=20 \
      --variant nvfp4_qat_distill quant.linear=nvfp4_emulated train.lr=1e-4 qat.steps=20 qat.loss=distill \
      --variant bf16_ft train.lr=1e-4 qat.steps=20 \
      --out examples/eval/tiny_model
"""
from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

from megatron_longlive.cli.main import main
from megatron_longlive.config import preset_config
from megatron_longlive.models.wan import WanDiT

WEIGHTS = "build/eval_example/tiny_random.safetensors"


def main_() -> int:
    os.makedirs(os.path.dirname(WEIGHTS), exist_ok=True)
    torch.manual_seed(0)
    model = WanDiT(preset_config("tiny"))
    model.init_weights()
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, WEIGHTS)
    sys.argv = ["longlive", "eval", "-c", "examples/configs/tiny.yaml", "--checkpoint", WEIGHTS,
                "--set", "data.num_videos=4", "--set", "data.path=build/eval_example/synthetic_data",
                "--prompt", "a red square slides right@0", "--prompt", "a blue circle moves down@4",
                "--variant", "bf16", "--variant", "steps2", "infer.denoising_steps=[1000,500]",
                "--variant", "nvfp4_ptq", "quant.linear=nvfp4_emulated",
                "--variant", "nvfp4_kv", "quant.kv_cache=nvfp4",
                "--variant", "nvfp4_qat", "quant.linear=nvfp4_emulated", "train.lr=1e-4", "qat.steps=20",
                "--variant", "nvfp4_qat_distill", "quant.linear=nvfp4_emulated", "train.lr=1e-4", "qat.steps=20",
                "qat.loss=distill",
                "--variant", "bf16_ft", "train.lr=1e-4", "qat.steps=20",
                "--out", "examples/eval/tiny_model"]
    return main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main_())
