"""One DMD distillation step on CUDA (issue 11): the device-placement fix, fp32 CUDA == CPU, BF16 / NVFP4 bases.

Run on the GPU machine: `python -m pytest -q -m gpu tests/gpu/test_distill_gpu.py`.
"""
from __future__ import annotations

import math

import pytest
import torch

from bench import bench_distill_step as bench
from megatron_longlive.training import dmd

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

TINY = ["--preset", "tiny", "--height", "32", "--width", "32", "--chunk-frames", "2", "--rollout-frames", "4",
        "--critic-ratio", "2", "--rank", "4", "--steps", "1", "--warmup", "0"]


@pytest.mark.parametrize("init", ["direct", "standalone"])
def test_dmd_steps_fp32_cuda_equal_cpu(init):
    """Two critic+generator steps in fp32 (TF32 off) give the CPU losses: nothing on the wrong device, same math."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    losses = {}
    for dev in ("cpu", "cuda"):
        args = bench.parse_args([*TINY, "--device", dev, "--init", init, "--dtype", "fp32"])
        d = bench.build_distiller(args, "bf16")                  # (base "bf16" = unpacked; its dtype is fp32 here)
        if dev == "cuda":
            assert all(p.is_cuda for p in d.model.parameters()) and d.null_text.is_cuda
        losses[dev] = [(m["critic_loss"], m["generator_loss"]) for m in (d.train_step(), d.train_step())]
    # the critic loss is a plain MSE; the generator loss is 0.5 mean(g^2) of a small score difference
    # g = (x0_fake - x0_real) / mean|x - x0_real|, which amplifies fp32 summation-order noise, hence 5e-2
    for (c_cpu, g_cpu), (c_gpu, g_gpu) in zip(losses["cpu"], losses["cuda"]):
        assert math.isclose(c_cpu, c_gpu, rel_tol=1e-3) and math.isclose(g_cpu, g_gpu, rel_tol=5e-2), losses


@pytest.mark.parametrize("base", ["bf16", "nvfp4"])
def test_bench_step_on_cuda_trains_only_the_adapters(base):
    """The bench's step under BF16 autocast: finite losses, peak memory measured, the frozen base bitwise unchanged."""
    args = bench.parse_args([*TINY, "--device", "cuda"])
    d = bench.build_distiller(args, base)
    frozen = {k: v.clone() for k, v in d.model.state_dict().items() if ".lora_" not in k}
    gen0 = [p.detach().clone() for p in d.gen_params]
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        m = d.train_step()
    assert math.isfinite(m["critic_loss"]) and math.isfinite(m["generator_loss"])
    assert torch.cuda.max_memory_allocated() > 0
    after = d.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(p, q) for p, q in zip(d.gen_params, gen0))
    with torch.autocast("cuda", dtype=torch.bfloat16):   # few-step sampling with the adapter, CPU prompts and seeds
        x = dmd.sample(d.model, d.prompts, [0, 1], [1000, 500], 2, 4, (4, 4), adapter="generator")
    assert x.is_cuda and torch.isfinite(x).all()


def test_bench_main_on_cuda_records_peak_memory(tmp_path):
    import json

    out = tmp_path / "r.jsonl"
    assert bench.main([*TINY, "--device", "cuda", "--base", "bf16", "nvfp4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out)]
    peaks = [r["value"] for r in rows if r["metric"] == "peak_memory"]
    assert len(peaks) == 2 and all(p > 0 for p in peaks)
