"""The parallel grid (degree validation, launch discovery, real megatron-core groups on gloo) and the
Ulysses all-to-alls (forward layout and autograd) on real processes."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.distributed.grid import _first_slurm_host, discover_launch, validate_degrees
from megatron_longlive.distributed.launch import spawn


def test_validate_degrees_messages():
    assert validate_degrees(8, 2, 2, 12) == 2
    assert validate_degrees(3, 1, 3, 12) == 1
    with pytest.raises(ValueError, match="sp_size=3 must divide num_heads=10"):
        validate_degrees(3, 1, 3, 10)
    with pytest.raises(ValueError, match="tp_size=8 must divide num_heads=12"):
        validate_degrees(8, 8, 1, 12)
    with pytest.raises(ValueError, match="tp_size \\* sp_size a divisor of num_heads=12"):
        validate_degrees(16, 4, 4, 12)
    with pytest.raises(ValueError, match="world_size=6 is not divisible by tp_size\\*sp_size=4"):
        validate_degrees(6, 2, 2, 12)


def test_discover_launch_torchrun_slurm_single():
    info = discover_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                            "MASTER_PORT": "1234"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port, info.launcher) == \
        (3, 8, 1, "n1", 1234, "torchrun")
    info = discover_launch({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                            "SLURM_JOB_NODELIST": "gpu[03-05,9],cpu1"})
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.launcher) == \
        (5, 16, 1, "gpu03", "slurm")
    assert _first_slurm_host("node7") == "node7"
    assert discover_launch({}).launcher == "single"


def _grid_worker(rank, world, tp, sp):
    import torch.distributed as dist

    from megatron_longlive.distributed.grid import init_grid

    g = init_grid(tp_size=tp, sp_size=sp, num_heads=4)
    ranks = {name: (dist.get_process_group_ranks(getattr(g, name)) if getattr(g, name) is not None else None)
             for name in ("tp", "sp", "dp", "dp_sp")}
    return (g.tp_rank, g.sp_rank, g.dp_rank, g.dp_size, g.backend), ranks


@pytest.mark.distributed
@pytest.mark.parametrize("tp,sp", [(2, 1), (1, 2)])
def test_grid_groups_on_gloo(tp, sp):
    """4 ranks, megatron-core order tp-cp-dp: TP neighbours first, then SP (cp), then DP; size-1 groups are None."""
    out = spawn(_grid_worker, 4, tp, sp)
    for rank, ((tp_rank, sp_rank, dp_rank, dp_size, backend), ranks) in enumerate(out):
        assert backend == "gloo" and dp_size == 2
        assert (tp_rank, sp_rank, dp_rank) == (rank % tp, (rank // tp) % sp, rank // 2)
        mp_base = rank - rank % 2  # the tp*sp = 2 model-parallel neighbours
        assert ranks["tp" if tp == 2 else "sp"] == [mp_base, mp_base + 1]
        assert ranks["sp" if tp == 2 else "tp"] is None
        assert ranks["dp"] == [rank % 2, rank % 2 + 2]
        assert ranks["dp_sp"] == ([rank % 2, rank % 2 + 2] if tp == 2 else [0, 1, 2, 3])


def _ulysses_worker(rank, world):
    from megatron_longlive.distributed.grid import init_grid
    from megatron_longlive.distributed.ulysses import all_to_all_heads_to_seq, all_to_all_seq_to_heads

    g = init_grid(1, world, num_heads=4)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(2, 6 * world, 4, 3, generator=gen)         # [B, S, H, D], same on every rank
    weight = torch.randn(2, 6 * world, 4, 3, generator=gen)
    local = full[:, 6 * rank: 6 * (rank + 1)].clone().requires_grad_()
    heads = all_to_all_seq_to_heads(local, g.sp)                   # [B, S, H/sp, D]
    h = 4 // world
    forward_ok = torch.equal(heads, full[:, :, h * rank: h * (rank + 1)])
    back = all_to_all_heads_to_seq(heads * 2, g.sp)                # [B, S/sp, H, D]
    round_ok = torch.equal(back, 2 * local)
    (back * weight[:, 6 * rank: 6 * (rank + 1)]).sum().backward()
    grad_ok = torch.equal(local.grad, 2 * weight[:, 6 * rank: 6 * (rank + 1)])
    return forward_ok, round_ok, grad_ok, _plan_roundtrip(rank, world, g.sp, gen)


def _plan_roundtrip(rank, world, group, gen) -> bool:
    """The Wan SP plan shards tokens / per-frame t by the balanced layout; gather_output restores the order."""
    from megatron_longlive.distributed.balanced_sp import (TFLayout, gathered_order, local_seq_frames,
                                                           local_token_index)
    from megatron_longlive.distributed.sp_plan import gather_output, shard_input
    from megatron_longlive.models.wan.sp_plan import WAN_SP_PLAN

    layout = TFLayout(num_chunks=2 * world, chunk_frames=1, tokens_per_frame=3, sp_size=world)
    tokens = torch.randn(2, layout.seq_len, 5, generator=gen)              # [B, S, D], global order
    t = torch.randn(2, 2 * layout.num_frames, generator=gen)               # [B, 2F]
    index = local_token_index(layout, rank)
    local_tokens = shard_input(WAN_SP_PLAN, "tokens", tokens, index, 3)
    local_t = shard_input(WAN_SP_PLAN, "t", t, index, 3)
    text = shard_input(WAN_SP_PLAN, "context", t, index, 3)               # replicated: untouched
    back = gather_output(WAN_SP_PLAN, "head", local_tokens, gathered_order(layout), group)
    return (torch.equal(back, tokens) and torch.equal(local_t, t[:, local_seq_frames(layout, rank)])
            and text is t)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_all_to_all_layout_and_grad(world):
    """Also: the SP plan's shard_input / gather_output round trip under the balanced layout."""
    assert spawn(_ulysses_worker, world) == [(True, True, True, True)] * world
