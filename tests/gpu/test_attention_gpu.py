"""CUDA path of the attention core: FlexAttention with a ChunkMask equals dense masked SDPA."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.models.wan import attention as attn_mod
from megatron_longlive.models.wan.attention import AttentionCore
from megatron_longlive.training.teacher_forcing import teacher_forcing_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("num_chunks, chunk_frames, tokens_per_frame", [(3, 2, 256), (4, 3, 200)])
def test_flex_equals_dense_on_teacher_forcing_mask(num_chunks, chunk_frames, tokens_per_frame, monkeypatch):
    torch.manual_seed(0)
    mask = teacher_forcing_mask(num_chunks, chunk_frames, tokens_per_frame, device="cuda")
    s = mask.q_blocks.numel()
    q, k, v = (torch.randn(2, s, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    core = AttentionCore()
    monkeypatch.setattr(attn_mod, "_DENSE_LIMIT", 0)  # force the flex path
    flex = core(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v)), attn_mask=mask.dense()).transpose(1, 2)
    err = (flex.float() - ref).norm() / ref.norm()
    assert err < 1e-2, err
