"""GPU lane of Balanced SP: `longlive train` at SP=2 on 2 GPUs (NCCL) matches SP=1 on one GPU, and the
FlexAttention path gives the dense result on the rank-major (gathered) teacher-forcing mask."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.distributed.balanced_sp import TFLayout, sp_mask
from megatron_longlive.models.wan import attention as attn_mod
from megatron_longlive.models.wan.attention import AttentionCore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("kind", ["balanced", "naive"])
def test_flex_equals_dense_on_gathered_tf_mask(kind, monkeypatch):
    torch.manual_seed(0)
    mask = sp_mask(TFLayout(num_chunks=4, chunk_frames=2, tokens_per_frame=200, sp_size=2, kind=kind), "cuda")
    s = mask.q_blocks.numel()
    q, k, v = (torch.randn(1, s, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    monkeypatch.setattr(attn_mod, "_DENSE_LIMIT", 0)  # force the flex path
    flex = AttentionCore()(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v)), attn_mask=mask.dense()).transpose(1, 2)
    assert (flex.float() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_longlive_train_sp2_nccl_matches_sp1(tmp_path):
    from tests.distributed.tf_harness import run_longlive_train

    sp2 = run_longlive_train(str(tmp_path / "sp2"), 2, "parallel.sp_size=2")
    sp1 = run_longlive_train(str(tmp_path / "sp1"), 1)
    for a, b in zip(sp2, sp1):  # fp32; cuDNN may use TF32 in the patch-embedding conv
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
