"""Run a small op so that backward keeps only its inputs, as they came (issue 6, training memory).

The float32 norms upcast a bf16 input and autograd keeps that float32 copy (and the norm's intermediates)
for backward: 4 bytes per element where the input itself has 2. `save_inputs(fn, *tensors)` runs
`fn(*tensors)` without building its graph and saves only `tensors` (bf16 stays bf16); backward runs `fn`
again on detached copies, under the same autocast state, and differentiates that graph with
`torch.autograd.grad`. The recomputed graph is the one plain autograd would have kept, so outputs and
gradients are bit for bit the same (bf16 -> float32 is exact; the recompute repeats the same kernels).

Only when autograd records (grad mode on and some input requires grad) does the `autograd.Function` run;
otherwise `fn` is called directly, so inference (no_grad, torch.compile, CUDA graphs) sees plain ops.
`fn` must be a pure function of `tensors` (no collectives, no randomness): it runs twice.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch


def save_inputs(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """fn(*tensors), with autograd keeping only `tensors` and recomputing fn in backward."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _SaveInputs.apply(fn, *tensors)
    return fn(*tensors)


def _autocast_state(tensors) -> tuple[str, bool, torch.dtype | None]:
    device = tensors[0].device.type
    if not torch.amp.is_autocast_available(device):   # e.g. `meta` (device-placement tests)
        return device, False, None
    return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


class _SaveInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, *tensors):
        ctx.fn, ctx.autocast = fn, _autocast_state(tensors)
        ctx.save_for_backward(*tensors)
        return fn(*tensors)   # grad mode is off inside Function.forward: no graph, nothing else kept

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, needs)]
        device, enabled, dtype = ctx.autocast
        autocast = torch.autocast(device, dtype=dtype, enabled=enabled) if dtype else contextlib.nullcontext()
        with torch.enable_grad(), autocast:
            out = ctx.fn(*inputs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (None, *(next(grads) if t.requires_grad else None for t in inputs))
