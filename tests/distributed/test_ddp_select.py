"""Gradient-reduction selection inside a real (1-process, gloo) grid, and a canary for megatron-core DDP on CPU.

megatron-core's DistributedDataParallel allocates its gradient buffers on the current CUDA device, so on CPU/gloo
our bucketed all-reduce is the path; if a megatron-core release ever runs it on CPU, the canary fails and the mcore
path should get a gloo equality test against ours."""
from __future__ import annotations

import pytest

from megatron_longlive.distributed.launch import spawn

pytestmark = pytest.mark.distributed


def _worker(rank, world, out_dir):
    import torch

    from megatron_longlive.config import build_config
    from megatron_longlive.distributed.grid import destroy_grid, init_grid
    from megatron_longlive.distributed.mcore_ddp import McoreGradSync
    from megatron_longlive.distributed.strategy import parallel_hooks
    from megatron_longlive.models.wan import WanDiT

    groups = init_grid(1, 1, backend="gloo")
    cfg = build_config({"parallel": {"ddp_impl": "auto"}})
    model = WanDiT(cfg.model)
    hooks = parallel_hooks(groups, out_dir, 1, model, cfg)
    auto_native = hooks.zero_grad is None and not isinstance(hooks.grad_sync, McoreGradSync)
    try:
        parallel_hooks(groups, out_dir, 1, model, build_config({"parallel": {"ddp_impl": "mcore"}}))
        mcore_error = None
    except ValueError as e:
        mcore_error = str(e)
    sync = McoreGradSync(model, groups, cfg.model)
    try:
        sync.zero_grad()                     # builds megatron-core's DDP on this CPU process
        canary = "megatron-core DDP constructed on CPU"
    except (AssertionError, RuntimeError) as e:
        canary = f"{type(e).__name__}: {e}"
    # the native path still reduces (here over one rank: gradients unchanged)
    x = torch.randn(1, cfg.model.in_channels, 2, 4, 4)
    model(x, torch.tensor([500.0]), torch.randn(1, cfg.model.text_len, cfg.model.text_dim)).pow(2).mean().backward()
    before = [p.grad.clone() for p in model.parameters()]
    hooks.grad_sync(list(model.parameters()))
    unchanged = all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    destroy_grid()
    return auto_native, mcore_error, canary, unchanged


def test_cpu_grid_selects_native_and_mcore_ddp_needs_cuda(tmp_path):
    auto_native, mcore_error, canary, unchanged = spawn(_worker, 1, str(tmp_path))[0]
    assert auto_native and unchanged
    assert mcore_error is not None and "parallel.ddp_impl=mcore on cpu" in mcore_error
    assert "CUDA" in canary, f"megatron-core DDP ran on CPU ({canary}): add a gloo mcore == native test"
