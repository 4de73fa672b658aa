"""Fast streaming chunk pass (issue 9 item 3): regional `torch.compile` of the DiT blocks plus CUDA-graph replay.

`ChunkStep(model, cache, mode)` is called like `model.forward_tokens(tokens, t, context_kv, positions,
kv_cache=cache)` for one chunk pass of the streaming engine. Modes:

  eager               the model as written
  compile             every block runs through ONE `torch.compile`d function (the 30 blocks of a 1.3B model
                      share its code, so it compiles once): norms, modulation, RoPE, GELU, residuals and the
                      FP8 activation quantization of `quant/fp8.py` fuse into few kernels. The cache's
                      `LayerHook` is excluded from compilation (one graph break per block), so the cache's
                      Python bookkeeping never becomes a compile guard.
  cuda_graph          the whole pass is captured once per cache state and replayed: no launch overhead, no
                      host work inside a chunk. Inputs are copied into static buffers; the cache buffers are
                      written in place by the captured kernels.
  compile+cuda_graph  both (the fastest on a GPU).

A cache state is `cache.context_signature()` = (attended tokens, needs a mask). Only the steady state
(every region full, no mask) is compiled and captured: one compiled shape and one graph serve the whole
stream. The first chunks (while sinks and window fill) and passes that need a mask (an empty shot sink
after a new shot) run eagerly, so no time goes into compiling shapes that occur a few times.
Same inputs give the same outputs as eager up to kernel fusion (compile) and bitwise for cuda_graph.
"""
from __future__ import annotations

from typing import Literal

import torch

from ..models.wan.model import call_block

StepMode = Literal["eager", "compile", "cuda_graph", "compile+cuda_graph"]
STEP_MODES = ("eager", "compile", "cuda_graph", "compile+cuda_graph")


def resolve_step_mode(mode: str, device: torch.device) -> str:
    """`auto` -> the fastest mode the device supports (compile+cuda_graph on CUDA, eager elsewhere)."""
    if mode == "auto":
        return "compile+cuda_graph" if device.type == "cuda" else "eager"
    if mode not in STEP_MODES:
        raise ValueError(f"infer.chunk_step={mode!r}: choose one of auto, {', '.join(STEP_MODES)}")
    if "cuda_graph" in mode and device.type != "cuda":
        raise ValueError(f"infer.chunk_step={mode!r} needs a CUDA device, the model is on {device}. "
                         "Fix: use infer.chunk_step=eager or compile on CPU")
    return mode


class _Graph:
    """One captured pass: static inputs, the graph, its output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple, out: torch.Tensor):
        self.graph, self.inputs, self.out = graph, inputs, out


class ChunkStep:
    """A `forward_tokens` for chunk passes over one `KVCache` (see module docstring)."""

    def __init__(self, model, cache, mode: StepMode = "eager"):
        self.model, self.cache = model, cache
        self.mode = resolve_step_mode(mode, next(model.parameters()).device)
        self._block = torch.compile(call_block, dynamic=False) if "compile" in self.mode else None
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self._ctx_static: list | None = None    # static copy of the prompt's cross-attention K/V
        self._ctx_source: list | None = None    # the context_kv object last copied into it
        self.captures = 0                       # graphs captured so far (tests/benchmarks read it)

    @property
    def compiled_block(self):
        """The compiled `call_block` every block of a compiled pass runs through (None unless mode compiles)."""
        return self._block

    def _eager(self, tokens, t, context_kv, positions, run_block=None, need_output=True):
        return self.model.forward_tokens(tokens, t, context_kv, positions, kv_cache=self.cache, run_block=run_block,
                                         need_output=need_output)

    def steady(self) -> bool:
        """True when the next chunk pass has the one compiled shape: every region full, no mask (the passes
        while the cache fills, or with an empty region, run eagerly)."""
        end, needs_mask = self.cache.context_signature()
        return not needs_mask and end == self.cache.layout.num_tokens

    def __call__(self, tokens: torch.Tensor, t: torch.Tensor, context_kv: list, positions: torch.Tensor,
                 need_output: bool = True) -> torch.Tensor | None:
        """need_output=False: a pass that only writes the cache (the context pass; its own graph), returns None."""
        if self.mode == "eager" or not self.steady():
            return self._eager(tokens, t, context_kv, positions, need_output=need_output)
        if self.mode == "compile":
            return self._eager(tokens, t, context_kv, positions, self._block, need_output)
        key = (self.cache.layout.num_tokens, tuple(tokens.shape), need_output)
        return self._replay(key, tokens, t, context_kv, positions)

    # ----- CUDA graphs ----------------------------------------------------------------------------------
    def _static_context(self, context_kv: list) -> list:
        """Copy a new prompt's K/V into the static buffers the graphs read (once per prompt)."""
        if self._ctx_static is None or any(a.shape != b.shape for (a, _), (b, _) in zip(self._ctx_static, context_kv)):
            if self._graphs:
                self._graphs.clear()            # text length changed: graphs read the old buffers
            self._ctx_static = [(k.clone(), v.clone()) for k, v in context_kv]
        elif context_kv is not self._ctx_source:
            for (sk, sv), (k, v) in zip(self._ctx_static, context_kv):
                sk.copy_(k)
                sv.copy_(v)
        self._ctx_source = context_kv
        return self._ctx_static

    def _replay(self, key: tuple, tokens, t, context_kv, positions) -> torch.Tensor:
        ctx = self._static_context(context_kv)
        g = self._graphs.get(key)
        if g is None:
            g = self._capture(key, tokens, t, ctx, positions)
        for dst, src in zip(g.inputs, (tokens, t, positions)):
            dst.copy_(src)
        g.graph.replay()
        return None if g.out is None else g.out.clone()

    def _capture(self, key: tuple, tokens, t, ctx, positions) -> _Graph:
        # Warm up on a side stream (compiles, autotunes, sets cuDNN plans), then capture. Every pass of
        # this state rewrites the current chunk's cache region, so the warm-up passes change nothing else.
        inputs = (tokens.clone(), t.clone(), positions.clone())
        need_output = key[-1]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._eager(*inputs[:2], ctx, inputs[2], self._block, need_output)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):  # a decode thread may run
            out = self._eager(*inputs[:2], ctx, inputs[2], self._block, need_output)
        self._graphs[key] = _Graph(graph, inputs, out)
        self.captures += 1
        return self._graphs[key]
