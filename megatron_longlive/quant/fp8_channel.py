"""Channel-scaled FP8 training recipe (`quant.fp8_recipe=channel_delayed`): one E4M3 copy per activation, one pass.

The rowwise recipe (fp8.py) scales x and dy per token for the GEMMs that reduce over channels and per channel for
the wgrad, which reduces over tokens: two different codes, and the per-channel amax exists only after a full read,
so quantizing costs 6 bytes per value. Here every activation operand gets ONE scale per channel, known before the
call (delayed scaling: the max of the last `history` steps' channel amaxes, times 2**margin of headroom), so its codes are pointwise
(fp8_channel_triton: 4 bytes per value, and fusable into whatever produced the tensor) and serve all three GEMMs:

  x  ~= qx  * s_x[k]     (k: input channel)         dy ~= qdy * s_dy[n]   (n: output channel)
  fprop  y  = qx . (W * s_x[None, :])^T                     the channel scale folded into the (small) weight,
  dgrad  dx = qdy . ((W * s_dy[:, None])^T)^T                quantized rowwise per call (fp8_triton, `fold`)
  wgrad  dW = s_dy[n] s_x[k] (qdy^T . qx^T^T)                rowwise scales of the transposed codes: exact

Every GEMM is torch._scaled_mm with rowwise scales (ones for the activation side of fprop and dgrad); `emulate`
computes the same products in fp32 (the oracle). Values beyond the delayed scale's range saturate at +-448 and
raise the next step's scale; the headroom (default 2 binades) makes that rare at no cost in precision (E4M3 is
floating point: on N(0, 1) data the relative error is 2.64e-2 with 0 to 4 binades of headroom alike). The first
call of each operand measures its amax first (two passes, once).

State: one DelayedChannelScale per operand (x, dy) per linear. Each call max-accumulates its channel amaxes; the
history rolls once per backward of the linear, after dy is quantized. So a recomputed forward (activation
checkpointing) quantizes with the same scales as the first forward, and the backward uses the dy scale the
forward folded into W^T (saved with the other tensors, so interleaved forwards/backwards stay exact). The
histories are not part of the model's state dict (checkpoints stay interchangeable with BF16 models); they
travel in the checkpoint's per-rank local state (fp8_state.py), so a resumed run continues bit-identically.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import FP8_E4M3_MAX
from .fp8 import TOKEN_PAD, amax_scales, fp8_gemm, quantize_both
from .linear_base import pad_tokens


channel_scales = amax_scales      # channel amaxes [C] -> (decode scales, encode multipliers), as for rows


def apply_op_torch(t: torch.Tensor, op: str = "identity", h: torch.Tensor | None = None) -> torch.Tensor:
    """The producer step a fused quantization applies first (eager torch, in t's dtype): identity, the FFN's
    GELU (tanh) of fc1's output, or its backward (t = gradient at the GELU output, h = fc1's output)."""
    if op == "identity":
        return t
    if op == "gelu":
        return F.gelu(t, approximate="tanh")
    if op == "gelu_backward":
        return torch.ops.aten.gelu_backward(t, h, approximate="tanh")
    raise ValueError(f"unknown op {op!r} (identity, gelu, gelu_backward)")


def quantize_channelwise_torch(t: torch.Tensor, inv: torch.Tensor,
                               pad: int = TOKEN_PAD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The definition: t [M, K], inv [K] -> (q [M, K] e4m3, q^T [K, MP] e4m3 (tokens zero-padded to a multiple of
    pad), amax [K] fp32) with q = e4m3_rne(clamp(t * inv, -448, 448))."""
    tf = t.float()
    q = (tf * inv.float()[None, :]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    q_t = pad_tokens(q.view(torch.uint8).t(), pad).contiguous().view(torch.float8_e4m3fn)
    return q, q_t, tf.abs().amax(0)


def quantize_channelwise(t: torch.Tensor, inv: torch.Tensor, amax_bits: torch.Tensor, col_sum: bool = False,
                         op: str = "identity", h: torch.Tensor | None = None,
                         out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(q, q^T) [+ fp32 column sums] of v = op(t, h) with encode multipliers inv; max-accumulates v's channel amaxes
    into amax_bits [K] (int32 fp32 bits). One Triton pass on CUDA (bitwise equal without an op), torch elsewhere.
    out: (q, q^T) buffers to write (slices of wider code buffers, fp8_channel_triton.check_code_buffers)."""
    if t.is_cuda:
        from .fp8_channel_triton import quantize_channelwise as fused
        return fused(t, inv, amax_bits, col_sum=col_sum, op=op, h=h, out=out)
    v = apply_op_torch(t, op, h)
    q, q_t, amax = quantize_channelwise_torch(v, inv)
    if out is not None:
        from .fp8_channel_triton import check_code_buffers

        check_code_buffers(*out, *q.shape, q_t.shape[1])
        q, q_t = out[0].copy_(q), out[1].copy_(q_t)
    torch.maximum(amax_bits, amax.view(torch.int32), out=amax_bits)
    return (q, q_t, v.float().sum(0)) if col_sum else (q, q_t)


def roll_history_torch(history: torch.Tensor, pending: torch.Tensor, cursor: int, margin: int):
    """The roll, in place: history[cursor] (the oldest row) <- pending's amaxes, pending <- 0; returns the new
    (decode scale, encode multiplier) [C] of 2**margin * (max over history rows). Fresh scale tensors each roll, so
    a snapshot a forward saved for its backward never changes."""
    history[cursor] = pending.view(torch.float32)
    pending.zero_()
    return channel_scales(history.amax(0) * 2.0 ** margin)


def roll_history(history: torch.Tensor, pending: torch.Tensor, cursor: int, margin: int):
    """roll_history_torch in one Triton launch on CUDA (fp8_channel_triton.roll_history, bitwise equal)."""
    if history.is_cuda:
        from .fp8_channel_triton import roll_history as fused
        return fused(history, pending, cursor, margin)
    return roll_history_torch(history, pending, cursor, margin)


class DelayedChannelScale:
    """Channel amax history of one operand: scales come from the max over the last `length` rolled amaxes,
    times 2**margin. The history is a ring buffer (the max does not care about row order): a roll overwrites the
    oldest row and computes the next scales, one launch on CUDA. Tensors live on the device of the first call;
    nothing here synchronizes with the host."""

    def __init__(self, length: int = 16, margin: int = 2):
        if length < 1:
            raise ValueError(f"quant.fp8_amax_history: must be >= 1, got {length}")
        if not 0 <= margin <= 8:
            raise ValueError(f"quant.fp8_amax_margin: binades of headroom in 0..8, got {margin}")
        self.length, self.margin = length, margin
        self.history: torch.Tensor | None = None     # [length, C] fp32 ring buffer
        self.cursor = 0                              # its oldest row: the next roll overwrites it
        self.pending: torch.Tensor | None = None     # [C] int32: fp32 bits of this step's running channel amax
        self._scales: tuple[torch.Tensor, torch.Tensor] | None = None
        self.group = None                            # ranks holding other tokens of the batch (reduce_amaxes_over)

    @property
    def ready(self) -> bool:
        return self.history is not None

    def bootstrap(self, t2: torch.Tensor) -> None:
        """First call: the history starts from t2's own channel amaxes (one extra read, once), rolled in."""
        amax = t2.float().abs().amax(0)
        self.history = torch.zeros(self.length, amax.numel(), dtype=torch.float32, device=amax.device)
        self.pending = amax.view(torch.int32).clone()
        self.cursor = 0
        self.roll()

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(decode scale [C], encode multiplier [C]) of the current history (fixed until the next roll)."""
        return self._scales

    def newest_first(self) -> torch.Tensor:
        """The history rows from the latest roll back to the oldest (for inspection and tests)."""
        order = [(self.cursor - 1 - i) % self.length for i in range(self.length)]
        return self.history[order]

    def roll(self) -> None:
        """Push this step's amaxes into the history (the next call's scales) and start a new step. With a group,
        the amaxes are first max-reduced over it, so every rank rolls the amaxes of all the batch's tokens."""
        if self.group is not None:
            import torch.distributed as dist

            # fp32 bits of amaxes >= 0 order like int32: an integer MAX is the float MAX
            dist.all_reduce(self.pending, op=dist.ReduceOp.MAX, group=self.group)
        self._scales = roll_history(self.history, self.pending, self.cursor, self.margin)
        self.cursor = (self.cursor + 1) % self.length

    def state_dict(self) -> dict:
        """Everything the next step's quantization depends on (CPU copies), for checkpoints (fp8_state.py)."""
        if not self.ready:
            return {"length": self.length, "margin": self.margin, "ready": False}
        return {"length": self.length, "margin": self.margin, "ready": True, "cursor": self.cursor,
                "history": self.history.cpu(), "pending": self.pending.cpu(),
                "scale": self._scales[0].cpu(), "inverse": self._scales[1].cpu()}

    def load_state_dict(self, state: dict, device) -> None:
        """Restore a state_dict() onto `device`; a different history length or margin is a config change."""
        if (state["length"], state["margin"]) != (self.length, self.margin):
            raise ValueError(f"FP8 amax history saved with quant.fp8_amax_history={state['length']}, "
                             f"quant.fp8_amax_margin={state['margin']}, this run has {self.length}, {self.margin}. "
                             f"Fix: resume with the saved values.")
        if not state["ready"]:
            self.history = self.pending = self._scales = None
            self.cursor = 0
            return
        self.history, self.pending = state["history"].to(device), state["pending"].to(device)
        self._scales = (state["scale"].to(device), state["inverse"].to(device))
        self.cursor = int(state["cursor"])


def delayed_scales(model: torch.nn.Module):
    """(name.x_scale / name.dy_scale, DelayedChannelScale) of every channel-recipe linear of `model`, each
    history once (q, k and v may share one: fp8_shared_input.py), in module order."""
    seen: set[int] = set()
    for name, module in model.named_modules():
        for attr in ("x_scale", "dy_scale"):
            scale = getattr(module, attr, None)
            if isinstance(scale, DelayedChannelScale) and id(scale) not in seen:
                seen.add(id(scale))
                yield f"{name}.{attr}", scale


def reduce_amaxes_over(model: torch.nn.Module, group) -> int:
    """Make every delayed scale of `model` max-reduce its step's channel amaxes over `group` before rolling:
    the data x sequence parallel group (ranks holding other tokens of the same batch), so each rank quantizes
    with the scales one process holding the whole batch would use (SP=N reproduces SP=1) and DP replicas
    quantize alike. Applied from outside the model by the training strategy; returns how many histories."""
    count = 0
    for _, scale in delayed_scales(model):
        scale.group = group
        count += 1
    return count


def quantize_operand(t2: torch.Tensor, state: DelayedChannelScale, col_sum: bool = False, op: str = "identity",
                     h: torch.Tensor | None = None):
    """(decode scales [K], q, q^T[, column sums]) of op(t2) with the state's delayed scales; the state's first
    call starts its history from op(t2)'s own amaxes."""
    if not state.ready:
        state.bootstrap(apply_op_torch(t2, op, h))
    scale, inv = state.scales()
    return (scale, *quantize_channelwise(t2, inv, state.pending, col_sum=col_sum, op=op, h=h))


_ONES: dict[torch.device, torch.Tensor] = {}


def ones_column(rows: int, device) -> torch.Tensor:
    """The activation-side rowwise scales of fprop and dgrad (the channel scales live in the weight): all ones
    [rows, 1], a view of one per-device column that only grows (to the largest token count seen) and is only ever
    read, so no fill kernel per GEMM and one small buffer whatever the batch shapes."""
    device = torch.device(device)
    have = _ONES.get(device)
    if have is None or have.shape[0] < rows:
        _ONES[device] = have = torch.ones(max(rows, 2 * (0 if have is None else have.shape[0])), 1, device=device)
    return have[:rows]


def fprop(qx, s_x, weight, bias, dys: DelayedChannelScale, emulate: bool, out_dtype, fast_accum: bool):
    """y = qx . (W * s_x)^T (+ b); also quantizes W^T * s_dy for the dgrad when dy's scales exist already.
    Returns y and what the backward needs of the weight (its codes and dy's scale snapshot, or None)."""
    dy_scales = dys.scales() if dys.ready else None
    fold_n = dy_scales[0] if dy_scales is not None else torch.ones(weight.shape[0], device=weight.device)
    qw, sw, qw_t, sw_t = quantize_both(weight, fold=(s_x, fold_n))
    y = fp8_gemm(qx, ones_column(qx.shape[0], qx.device), qw, sw, emulate, out_dtype, bias, fast_accum)
    return y, ((qw_t, sw_t, *dy_scales) if dy_scales is not None else None)


def dgrad_weight(weight, dys: DelayedChannelScale, dy2, op: str = "identity", h=None, saved=None):
    """(qw_t, sw_t, s_dy, inv_dy) for the dgrad: the forward's snapshot, or (dy's first call) made here from
    the scales bootstrapped on this dy."""
    if saved is not None:
        return saved
    if not dys.ready:
        dys.bootstrap(apply_op_torch(dy2, op, h))
    s_dy, inv_dy = dys.scales()
    return (*fold_dgrad_weight(weight, s_dy), s_dy, inv_dy)


def fold_dgrad_weight(weight: torch.Tensor, s_dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qw_t, sw_t): W^T * s_dy quantized rowwise (per input channel), the dgrad's weight operand."""
    _, _, qw_t, sw_t = quantize_both(weight, fold=(torch.ones(weight.shape[1], device=weight.device), s_dy))
    return qw_t, sw_t


def backward_gemms(qdy, qdy_t, s_dy, qw_t, sw_t, qx_t, s_x, need_dx: bool, need_dw: bool, emulate: bool,
                   x_dtype, w_dtype, fast_accum: bool = False):
    """dx = qdy . (W^T * s_dy)^T and dW = s_dy s_x (qdy^T . qx^T^T); None where not needed."""
    dx = dw = None
    if need_dx:
        dx = fp8_gemm(qdy, ones_column(qdy.shape[0], qdy.device), qw_t, sw_t, emulate, x_dtype, fast_accum=fast_accum)
    if need_dw:
        dw = fp8_gemm(qdy_t, s_dy[:, None], qx_t, s_x[:, None], emulate, w_dtype, fast_accum=fast_accum)
    return dx, dw


class FP8ChannelLinearFunction(torch.autograd.Function):
    """y = x W^T + b with the channel-scaled recipe. Saves x's transposed codes (1 byte/value), the weight
    (a parameter: no copy) and the forward's scale snapshots."""

    @staticmethod
    def forward(ctx, x, weight, bias, xs: DelayedChannelScale, dys: DelayedChannelScale, emulate: bool,
                out_dtype: torch.dtype, fast_accum: bool = False, fast_accum_backward: bool = False):
        lead = x.shape[:-1]
        s_x, qx, qx_t = quantize_operand(x.reshape(-1, x.shape[-1]), xs)
        y, wsaved = fprop(qx, s_x, weight, bias, dys, emulate, out_dtype, fast_accum)
        ctx.save_for_backward(qx_t, s_x, weight, *(wsaved or ()))
        ctx.states, ctx.emulate, ctx.has_bias = (xs, dys), emulate, bias is not None
        ctx.fast_backward = fast_accum_backward
        ctx.x_meta = (x.shape, x.dtype, weight.dtype)
        return y.view(*lead, -1)

    @staticmethod
    def backward(ctx, dy):
        qx_t, s_x, weight, *wsaved = ctx.saved_tensors
        xs, dys = ctx.states
        x_shape, x_dtype, w_dtype = ctx.x_meta
        dy2 = dy.reshape(-1, dy.shape[-1])
        qw_t, sw_t, s_dy, inv_dy = dgrad_weight(weight, dys, dy2, saved=wsaved or None)
        want_db = ctx.has_bias and ctx.needs_input_grad[2]
        qdy, qdy_t, *db = quantize_channelwise(dy2, inv_dy, dys.pending, col_sum=want_db)   # the folded scales
        dx, dw = backward_gemms(qdy, qdy_t, s_dy, qw_t, sw_t, qx_t, s_x, ctx.needs_input_grad[0],
                                ctx.needs_input_grad[1], ctx.emulate, x_dtype, w_dtype, ctx.fast_backward)
        xs.roll()
        dys.roll()
        return (None if dx is None else dx.view(x_shape), dw, db[0].to(dy.dtype) if want_db else None,
                None, None, None, None, None, None)


class FP8ChannelFFNFunction(torch.autograd.Function):
    """fc2(gelu_tanh(fc1(x))) with both linears in the channel recipe and the GELU fused into the quantizers:
    forward, fc1's output h becomes fc2's codes in one pass (no BF16 GELU output); backward, the gradient at the
    GELU output and h become fc1's dy codes in one pass (no BF16 dy). Saves h (as the BF16 GELU does), the
    transposed codes of x and of gelu(h) (1 byte/value each), the folded dgrad weights and the scale snapshots."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, fc1, fc2, emulate: bool, out_dtype: torch.dtype, fast_accum: bool):
        lead, k = x.shape[:-1], x.shape[-1]
        s_x, qx, qx_t = quantize_operand(x.reshape(-1, k), fc1.x_scale)
        h, w1saved = fprop(qx, s_x, w1, b1, fc1.dy_scale, emulate, out_dtype, fast_accum)
        s_g, qg, qg_t = quantize_operand(h, fc2.x_scale, op="gelu")
        y, w2saved = fprop(qg, s_g, w2, b2, fc2.dy_scale, emulate, out_dtype, fast_accum)
        # every tensor through save_for_backward, so activation checkpointing and offload hooks see them all
        ctx.save_for_backward(qx_t, s_x, w1, h, qg_t, s_g, w2, *(w1saved or ()), *(w2saved or ()))
        ctx.wsaved = (w1saved is not None, w2saved is not None)
        ctx.modules, ctx.emulate = (fc1, fc2), emulate
        ctx.has_bias = (b1 is not None, b2 is not None)
        ctx.x_meta = (x.shape, x.dtype, w1.dtype, w2.dtype)
        return y.view(*lead, -1)

    @staticmethod
    def backward(ctx, dy):
        qx_t, s_x, w1, h, qg_t, s_g, w2, *rest = ctx.saved_tensors
        fc1, fc2 = ctx.modules
        w1saved = tuple(rest[:4]) if ctx.wsaved[0] else None
        w2saved = tuple(rest[-4:]) if ctx.wsaved[1] else None
        x_shape, x_dtype, w1_dtype, w2_dtype = ctx.x_meta
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        qw2_t, sw2_t, s_dy2, inv_dy2 = dgrad_weight(w2, fc2.dy_scale, dy2, saved=w2saved)
        want_db2 = ctx.has_bias[1] and need[4]
        qdy2, qdy2_t, *db2 = quantize_channelwise(dy2, inv_dy2, fc2.dy_scale.pending, col_sum=want_db2)
        dg, dw2 = backward_gemms(qdy2, qdy2_t, s_dy2, qw2_t, sw2_t, qg_t, s_g, True, need[3], ctx.emulate,
                                 h.dtype, w2_dtype, fc2.fast_accum_backward)
        qw1_t, sw1_t, s_dy1, inv_dy1 = dgrad_weight(w1, fc1.dy_scale, dg, op="gelu_backward", h=h, saved=w1saved)
        want_db1 = ctx.has_bias[0] and need[2]
        qdy1, qdy1_t, *db1 = quantize_channelwise(dg, inv_dy1, fc1.dy_scale.pending, col_sum=want_db1,
                                                  op="gelu_backward", h=h)
        dx, dw1 = backward_gemms(qdy1, qdy1_t, s_dy1, qw1_t, sw1_t, qx_t, s_x, need[0], need[1], ctx.emulate,
                                 x_dtype, w1_dtype, fc1.fast_accum_backward)
        for state in (fc1.x_scale, fc1.dy_scale, fc2.x_scale, fc2.dy_scale):
            state.roll()
        return (None if dx is None else dx.view(x_shape), dw1, db1[0].to(dy.dtype) if want_db1 else None,
                dw2, db2[0].to(dy.dtype) if want_db2 else None, None, None, None, None, None)
