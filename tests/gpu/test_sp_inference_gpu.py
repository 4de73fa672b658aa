"""GPU lane of SP inference: `longlive generate` at SP=2 on 2 GPUs (NCCL; 4-bit K/V on the wire with the NVFP4
cache) gives the latents of one GPU, BF16 and NVFP4 caches (fp32 model; TF32 may enter through cuDNN)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.test_sp_inference import tiny_weights, torchrun_generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


@pytest.mark.parametrize("kv", ["bf16", "nvfp4"])
def test_generate_sp2_nccl_equals_one_gpu(tmp_path, kv):
    weights = tiny_weights(tmp_path / "dit.safetensors")
    args = ("--dtype", "fp32", "--set", f"quant.kv_cache={kv}")
    (tmp_path / "sp1").mkdir()
    (tmp_path / "sp2").mkdir()
    _, one, _ = torchrun_generate(str(tmp_path / "sp1"), 1, weights, *args)
    _, two, _ = torchrun_generate(str(tmp_path / "sp2"), 2, weights, *args)
    torch.testing.assert_close(two, one, rtol=0, atol=1e-4)
