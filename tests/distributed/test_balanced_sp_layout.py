"""Pure Balanced-SP layout functions: chunk ownership, the gathered order, the permuted teacher-forcing
mask (checked against the mask rule of DESIGN.md §3 written out per token), loss-token balance."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.distributed.balanced_sp import (TFLayout, balance_report, gathered_order, local_frame_info,
                                                       local_token_index, loss_tokens_per_rank, rank_chunks,
                                                       sp_mask)
from megatron_longlive.training.teacher_forcing import teacher_forcing_mask


def rule(q_chunk, q_noisy, k_chunk, k_noisy) -> bool:
    """DESIGN.md §3, token by token."""
    if not q_noisy:
        return (not k_noisy) and k_chunk <= q_chunk
    return ((not k_noisy) and k_chunk < q_chunk) or (k_noisy and k_chunk == q_chunk)


def test_rank_chunks_contiguous_and_complete():
    layout = TFLayout(num_chunks=8, chunk_frames=3, tokens_per_frame=5, sp_size=4)
    assert [list(rank_chunks(layout, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("sp", [1, 2, 4])
def test_balanced_local_layout_is_clean_then_noisy_of_same_chunks(sp):
    layout = TFLayout(num_chunks=4, chunk_frames=2, tokens_per_frame=3, sp_size=sp)
    f, tpf = layout.num_frames, layout.tokens_per_frame
    for r in range(sp):
        frames, noisy = local_frame_info(layout, r)
        half = frames.numel() // 2
        assert not noisy[:half].any() and noisy[half:].all()
        assert torch.equal(frames[:half], frames[half:])  # x_r and z_r cover the same video frames
        assert set((frames // layout.chunk_frames).tolist()) == set(rank_chunks(layout, r))
        idx = local_token_index(layout, r)
        # clean tokens sit in the first half of the global [clean | noisy] sequence, noisy in the second
        assert (idx[: half * tpf] < f * tpf).all() and (idx[half * tpf:] >= f * tpf).all()


@pytest.mark.parametrize("kind", ["balanced", "naive"])
@pytest.mark.parametrize("sp", [1, 2, 4])
def test_gathered_order_is_permutation_and_mask_follows_rule(kind, sp):
    layout = TFLayout(num_chunks=4, chunk_frames=2, tokens_per_frame=3, sp_size=sp, kind=kind)
    order = gathered_order(layout)
    assert torch.equal(order.sort().values, torch.arange(layout.seq_len))
    per_chunk = layout.chunk_frames * layout.tokens_per_frame
    half = layout.seq_len // 2
    chunk = (order % half) // per_chunk
    noisy = order >= half
    expected = torch.tensor([[rule(chunk[i], noisy[i], chunk[j], noisy[j]) for j in range(order.numel())]
                             for i in range(order.numel())])
    got = sp_mask(layout).dense()
    assert torch.equal(got, expected)
    base = teacher_forcing_mask(4, 2, 3).dense()
    assert torch.equal(got, base[order][:, order])


def test_balanced_first_rank_major_blocks():
    """Gathered order for SP=2, one frame per chunk, one token per frame: [x0 x1 z0 z1 | x2 x3 z2 z3]."""
    layout = TFLayout(num_chunks=4, chunk_frames=1, tokens_per_frame=1, sp_size=2)
    assert gathered_order(layout).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


@pytest.mark.parametrize("sp", [2, 4, 8])
def test_loss_tokens_equal_per_rank_balanced_not_naive(sp):
    balanced = TFLayout(num_chunks=8, chunk_frames=3, tokens_per_frame=10, sp_size=sp)
    naive = TFLayout(num_chunks=8, chunk_frames=3, tokens_per_frame=10, sp_size=sp, kind="naive")
    loss = loss_tokens_per_rank(balanced)
    assert loss == [8 * 3 * 10 // sp] * sp and sum(loss) == 8 * 3 * 10
    assert balance_report(balanced)["loss_max_over_min"] == 1.0
    naive_loss = loss_tokens_per_rank(naive)
    assert sum(naive_loss) == 8 * 3 * 10
    assert naive_loss[: sp // 2] == [0] * (sp // 2)  # the first half of the ranks hold only clean tokens
    assert balance_report(naive)["loss_max_over_min"] == float("inf")


def test_uneven_layouts_are_rejected_with_a_fix():
    with pytest.raises(ValueError, match="num_chunks=5 must be divisible by sp_size=2"):
        TFLayout(num_chunks=5, chunk_frames=1, tokens_per_frame=4, sp_size=2).check_even()
    with pytest.raises(ValueError, match="sp_layout"):
        TFLayout(num_chunks=4, chunk_frames=1, tokens_per_frame=4, sp_size=2, kind="zigzag")
