"""The DiT's elementwise chains (float32 norms, modulation, gated residuals, RoPE), optionally through torch.compile.

Each of these functions is a chain of float32 ops over a whole activation tensor. Eager PyTorch runs every op as
its own kernel with a float32 intermediate in device memory (a norm + modulation moves ~40 bytes per value where
one fused kernel moves 4): in the 1.3B training step such kernels took 36% of the device time (bench/RESULTS.md,
session 15). `enable(True)` (`train.compile_elementwise`, set by the trainer) runs every `@elementwise` function as
an Inductor-generated kernel instead: inside `save_inputs` its forward compiles to a no-grad graph and the
backward's recompute + gradient to one joint graph, so what backward keeps is unchanged.

Off unless enabled (the trainer enables it on CUDA by default; the CPU, inference and tests run eagerly) and bypassed
while torch is already compiling (an outer `torch.compile`, e.g. the streaming chunk step, traces the plain
function) or a CUDA graph is being captured (the graphed chunk step captures the eager kernels). Inductor is asked to keep eager's intermediate bf16 roundings (`emulate_precision_casts`): on the CPU the
activations come out bitwise equal to eager; Triton kernels on CUDA keep some of those intermediates in float32, so
values move by up to a unit in the last place, towards exact math (tests/gpu/test_compiled_ops_gpu.py measures both
against float64). The 1.3B training step on an H100 (bench/RESULTS.md, session 17): 6.59 -> 4.84 s in bf16.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

_ENABLED = False


def enable(flag: bool = True) -> None:
    """Run the `@elementwise` functions compiled (True) or eagerly (False), process-wide."""
    global _ENABLED
    _ENABLED = bool(flag)


def enabled() -> bool:
    return _ENABLED


def _capturing() -> bool:
    """A CUDA graph capture is under way: compiling there could launch benchmark runs into the graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def elementwise(fn: Callable) -> Callable:
    """Mark a pure function of tensors (and constant Python scalars) as a fusible elementwise chain."""
    compiled: Callable | None = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        if not _ENABLED or torch.compiler.is_compiling() or _capturing():
            return fn(*args, **kwargs)
        if compiled is None:     # static shapes first; a second shape recompiles once with dynamic ones
            compiled = torch.compile(fn, options={"emulate_precision_casts": True})
        return compiled(*args, **kwargs)

    run.eager = fn
    return run
