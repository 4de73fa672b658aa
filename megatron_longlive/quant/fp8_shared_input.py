"""Channel-recipe FP8 linears that read the same tensor (a self-attention's q, k, v) as one linear per pass.

Under quant.fp8_recipe=channel_delayed a linear's x codes depend only on x and on x's delayed channel scales, so
linears of one input with one shared x history quantize it to the same bytes. `SameInputGroup` runs them as one
linear of their concatenated weights [sum N, K] (`SameInputFunction`):

  forward   x quantized once; one fprop GEMM [M, K] x [K, sum N]; each member's output is its column slice (a view)
  backward  each member's dy quantized (its own delayed scales) into its column slice of one [M, sum N] code buffer
            and its row slice of the transposed one; one dgrad GEMM reducing over all sum N (dx summed in the
            tensor cores' fp32 accumulator, not as three bf16 products added), one wgrad GEMM for all the weights
            ([sum N, K]: 432 output tiles of 128 x 128 at the 1.3B q/k/v instead of three GEMMs of 144 tiles, the
            second wave of each nearly empty on 132 SMs)

Outputs, weight and bias gradients and every scale history are those of separate channel linears sharing x's
history (the same codes, scales and per-element products). dx differs in rounding: it is summed before its one
bf16 rounding, and the folded W^T's rowwise scale is one per input channel across all members (separate linears
scale each member's rows on their own); tests/unit/test_fp8_shared_input.py measures both against float64.

The group keeps the outputs of its last input, keyed by the tensor object (a weak reference, its version
counter) so a freed or modified tensor never matches: the first member called computes all of them, the others
take theirs, and once each member has taken its output the group holds nothing. A member called again on the
same input (or an input of its own) runs the whole group again. The backward rolls x's history once and each
member's dy history; a member whose output got no gradient gets none, and its history does not roll (zero codes
stand in for its dy in the shared GEMMs), as if its own backward had not run. A
recomputed forward (activation checkpointing) recomputes the group with the same scales. Modules declare which
children read the same tensor (`same_input`, a model fact: WanSelfAttention's q, k, v; WanCrossAttention's k,
v); `share_input_quantization` wires them from outside the model (STYLE.md §2). Under tensor parallelism the
members are column shards of one group: x enters the TP region once for all of them (one all-reduce of dx in the
backward instead of one per member) and the GEMMs run on the concatenated shards.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .fp8 import TOKEN_PAD
from .fp8_channel import (DelayedChannelScale, backward_gemms, fold_dgrad_weight, fprop, quantize_channelwise,
                          quantize_operand)


class _ConcatScales:
    """The members' dy histories seen as one history of sum N channels (what fprop and the dgrad's weight fold
    read): ready when all are, scales concatenated in member order. A member not yet bootstrapped (its output
    never got a gradient) contributes ones: they only scale its zero codes."""

    def __init__(self, members: list[nn.Module]):
        self.states: list[DelayedChannelScale] = [m.dy_scale for m in members]
        self.weights = [m.weight for m in members]      # the widths and device of the ones

    @property
    def ready(self) -> bool:
        return all(s.ready for s in self.states)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [s.scales() if s.ready else (torch.ones(w.shape[0], device=w.device),) * 2
                 for s, w in zip(self.states, self.weights)]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


class SameInputGroup:
    """Linears (FP8Linear, channel recipe; unsharded or column shards of one TP group) that read one tensor:
    one x history, one GEMM per pass."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self.x_scale = members[0].x_scale
        self.dy_scales = _ConcatScales(members)
        self._key: tuple | None = None          # (weakref to x, x._version)
        self._outs: list | None = None          # the members' outputs not yet taken (None once taken)

    def __getstate__(self) -> dict:
        """Copies (deepcopy of a wired model, pickling) leave the cached outputs behind: autograd tensors and a
        weak reference, meaningless in a copy."""
        return dict(self.__dict__, _key=None, _outs=None)

    def output(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """member(x) of a training forward: taken from the group's outputs for x when computed and not yet taken,
        else computes all (under TP: the column shards, x entering the region once, so dx is all-reduced once)."""
        i = next(j for j, m in enumerate(self.members) if m is member)
        key = self._key
        if not (key is not None and key[0]() is x and key[1] == x._version and self._outs[i] is not None):
            first = self.members[0]            # the members share every setting (share_input_quantization)
            x_in = x
            if first.tp_group is not None:
                from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

                x_in = copy_to_tensor_model_parallel_region(x, group=first.tp_group)
            emulate, out_dtype = first.training_settings(x)
            params = [t for m in self.members for t in (m.weight, m.bias)]
            with torch.autocast(x.device.type, enabled=False):
                outs = SameInputFunction.apply(x_in, self, emulate, out_dtype, first.fast_accum,
                                               first.fast_accum_backward, *params)
            self._key, self._outs = (weakref.ref(x), x._version), list(outs)
        out, self._outs[i] = self._outs[i], None
        if all(o is None for o in self._outs):  # every member has its output: hold nothing until the next input
            self._key = self._outs = None
        return out


class SameInputFunction(torch.autograd.Function):
    """The members' y_i = x W_i^T + b_i as one channel-recipe linear of the concatenated weights. Saves x's
    transposed codes (1 byte/value, once), the weights (parameters: no copy) and the forward's scale snapshots."""

    @staticmethod
    def forward(ctx, x, group: SameInputGroup, emulate: bool, out_dtype: torch.dtype, fast_accum: bool,
                fast_accum_backward: bool, *params):
        weights, biases = params[0::2], params[1::2]
        sizes = [w.shape[0] for w in weights]
        lead = x.shape[:-1]
        s_x, qx, qx_t = quantize_operand(x.reshape(-1, x.shape[-1]), group.x_scale)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else weights[0].new_zeros(n) for b, n in zip(biases, sizes)])
        y, wsaved = fprop(qx, s_x, torch.cat(weights), bias, group.dy_scales, emulate, out_dtype, fast_accum)
        ctx.save_for_backward(qx_t, s_x, *weights, *(wsaved or ()))
        ctx.group, ctx.emulate, ctx.fast_backward = group, emulate, fast_accum_backward
        ctx.sizes, ctx.has_bias = sizes, [b is not None for b in biases]
        ctx.x_meta = (x.shape, x.dtype, weights[0].dtype)
        ctx.set_materialize_grads(False)       # an unused member's dy stays None (not a zero tensor to quantize)
        return tuple(y.split(sizes, dim=-1)[i].view(*lead, n) for i, n in enumerate(sizes))

    @staticmethod
    def backward(ctx, *dys):
        group, sizes = ctx.group, ctx.sizes
        qx_t, s_x, *rest = ctx.saved_tensors
        weights, wsaved = rest[:len(sizes)], rest[len(sizes):]
        x_shape, x_dtype, w_dtype = ctx.x_meta
        used = [dy is not None for dy in dys]
        dy2s = [dy.reshape(-1, n) if dy is not None else None for dy, n in zip(dys, sizes)]
        for state, dy2 in zip(group.dy_scales.states, dy2s):
            if dy2 is not None and not state.ready:     # dy's first call: its history starts from its amaxes
                state.bootstrap(dy2)
        if wsaved:                              # the forward folded W^T with dy's scales already
            qw_t, sw_t, s_dy, inv_dy = wsaved
        else:
            s_dy, inv_dy = group.dy_scales.scales()
            qw_t, sw_t = fold_dgrad_weight(torch.cat(weights), s_dy)
        m = x_shape[:-1].numel()
        total = sum(sizes)
        mp = (m + TOKEN_PAD - 1) // TOKEN_PAD * TOKEN_PAD
        qdy = torch.empty(m, total, dtype=torch.float8_e4m3fn, device=qx_t.device)
        qdy_t = torch.empty(total, mp, dtype=torch.float8_e4m3fn, device=qx_t.device)
        needs = ctx.needs_input_grad[6:]
        dbs, start = [], 0
        for state, dy2, n, has_bias, need_b in zip(group.dy_scales.states, dy2s, sizes, ctx.has_bias, needs[1::2]):
            cols = slice(start, start + n)
            start += n
            if dy2 is None:
                qdy[:, cols].view(torch.uint8).zero_()
                qdy_t[cols].view(torch.uint8).zero_()
                dbs.append(None)
                continue
            want_db = has_bias and need_b
            _, _, *db = quantize_channelwise(dy2, inv_dy[cols], state.pending, col_sum=want_db,
                                             out=(qdy[:, cols], qdy_t[cols]))
            dbs.append(db[0].to(dy2.dtype) if want_db else None)
        dx, dw = backward_gemms(qdy, qdy_t, s_dy, qw_t, sw_t, qx_t, s_x, ctx.needs_input_grad[0],
                                any(needs[0::2]), ctx.emulate, x_dtype, w_dtype, ctx.fast_backward)
        dws = [g if u else None for g, u in zip(dw.split(sizes), used)] if dw is not None else [None] * len(sizes)
        group.x_scale.roll()
        for state, u in zip(group.dy_scales.states, used):
            if u:
                state.roll()
        grads = [g for pair in zip(dws, dbs) for g in pair]
        return (None if dx is None else dx.view(x_shape), None, None, None, None, None, *grads)


def _channel_linear(m: nn.Module) -> bool:
    """A trainable channel-recipe FP8Linear, unsharded or column-parallel (its input whole on every rank)."""
    from .fp8 import FP8Linear

    return (isinstance(m, FP8Linear) and m.recipe == "channel_delayed" and m.qweight is None
            and m.style in ("replicated", "column"))


def share_input_quantization(model: nn.Module) -> int:
    """For every module naming children that read one tensor (`same_input`) that are all channel-recipe FP8
    linears of one input width, weight dtype, sharding (unsharded, or column shards of one TP group) and GEMM
    settings: one x history and one SameInputGroup for them. Returns how many groups were wired."""
    groups = 0
    for module in model.modules():
        names = getattr(module, "same_input", ())
        members = [getattr(module, n, None) for n in names]
        if len(members) < 2 or not all(_channel_linear(m) for m in members):
            continue
        settings = {(m.in_features, m.weight.dtype, m.weight.device, m.style, id(m.tp_group), m.emulate, m.fast_accum,
                     m.fast_accum_backward) for m in members}
        if len(settings) != 1:
            continue
        for m in members:
            m.x_scale = members[0].x_scale
        group = SameInputGroup(members)
        for m in members:
            m.same_input_group = group
        groups += 1
    return groups
