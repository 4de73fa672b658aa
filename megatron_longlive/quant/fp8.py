"""FP8 linear for Hopper: all three GEMMs in E4M3 with rowwise scales through torch._scaled_mm.

Every GEMM is C[M, N] = A[M, K] @ B[N, K]^T with A and B quantized row by row along the reduction dim K:
scale_r = amax(row) / 448, q = e4m3_rne(clamp(row * (448 / amax(row)))) (torch.float8_e4m3fn cast; scale
and multiplier 1 for an all-zero row). The per-value step is a multiply, not a division (cheap in kernels).

  fprop  y  = x[M,K]     . W[N,K]        dgrad  dx = dy[M,N] . W^T[K,N]      wgrad  dW = dy^T[N,M] . x^T[K,M]

(tokens M are zero-padded to a multiple of 16 for the wgrad, as _scaled_mm needs). `emulate=True`
computes the same math as (q_a * s_a) @ (q_b * s_b)^T (+ bias) in fp32: exact on any device, the oracle of
the scaled-mm path (which accumulates in fp32 on the tensor cores, adds the bias in its epilogue and rounds
the output to bf16 once). On CUDA each operand is quantized once into both layouts by the fused Triton
kernels of fp8_triton.py (2 reads + 2 one-byte writes per value), whose first pass over dy also yields
the bias gradient; forward saves only the 1-byte transposed copies of x and W for the backward.
"""
from __future__ import annotations

import torch

from .constants import FP8_E4M3_MAX
from .ieee import div_rn
from .linear_base import QuantLinearBase, bias_grad, pad_tokens

TOKEN_PAD = 128
"""The token dim of the wgrad operands (x^T, dy^T: the GEMM's reduction) is zero-padded to a multiple of this.
cuBLAS's FP8 GEMM with a reduction length that is not a multiple of 128 ran 3.4x slower on an H100 (65520 tokens:
2.66 ms against 0.78 ms at 32768, bench_fp8_linear per-GEMM table, 2026-12-07), slower than BF16."""

RECIPES = ("rowwise", "channel_delayed")
"""FP8 training recipes: per-token/per-channel current scales (this file) or delayed channel scales
(fp8_channel.py)."""


def amax_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """amax (fp32) -> (decode scale amax / 448, encode multiplier 448 / amax); (1, 1) where amax is 0."""
    scale = torch.where(amax > 0, div_rn(amax, FP8_E4M3_MAX), 1.0)
    inverse = torch.where(amax > 0, torch.full_like(amax, FP8_E4M3_MAX) / amax, 1.0)   # IEEE division, not rcp*448
    return scale, inverse


def quantize_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [R, C] -> (float8_e4m3fn [R, C], fp32 scales [R, 1]) with t ~= q * scale."""
    tf = t.float()
    scale, inverse = amax_scales(tf.abs().amax(dim=-1, keepdim=True))
    return (tf * inverse).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def quantize_both(t: torch.Tensor, col_sum: bool = False,
                  fold: tuple[torch.Tensor, torch.Tensor] | None = None, pad: int = 16) -> tuple[torch.Tensor, ...]:
    """t [M, K] -> (q [M, K], s [M, 1], qT [K, MP], sT [K, 1]): rowwise along K, and the transpose
    (zero-padded to MP = ceil(M/pad)*pad; activations use TOKEN_PAD) rowwise along M; with col_sum also the
    column sums [K] of t in t's dtype, accumulated in fp32 (the bias gradient when t is dy). fold = (rfold [K],
    cfold [M]): the rows quantize t * rfold[None, :] and the transpose t * cfold[:, None] (fp8_channel's weights). One fused Triton
    pass pair on CUDA (fp8_triton.py, bitwise equal codes and scales), plain torch elsewhere."""
    if t.is_cuda:
        from .fp8_triton import quantize_both as fused
        out = fused(t, col_sum=col_sum, fold=fold, pad=pad)
        return out[:4] + (out[4].to(t.dtype),) if col_sum else out
    rows, cols = (t, t) if fold is None else (t.float() * fold[0].float()[None, :], t.float() * fold[1].float()[:, None])
    q, s = quantize_rowwise(rows)
    q_t, s_t = quantize_rowwise(pad_tokens(cols.t(), pad))
    out = (q, s, q_t.contiguous(), s_t)
    return out + (bias_grad(t),) if col_sum else out


def use_scaled_mm(device: torch.device) -> bool:
    """True where torch._scaled_mm runs E4M3 GEMMs natively (CUDA sm89+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm(qa, sa, qb, sb, emulate: bool, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
             fast_accum: bool = False) -> torch.Tensor:
    """(qa * sa) [M, K] @ ((qb * sb) [N, K])^T (+ bias [N]) for row-major E4M3 operands with rowwise scales.
    scaled-mm: bias added in the GEMM epilogue (as bf16), output written once in bf16; fast_accum: the tensor
    cores' own accumulator over the whole K (the emulation ignores it: an fp32 matmul of the decoded operands)."""
    if emulate:
        y = dequantize_rowwise(qa, sa) @ dequantize_rowwise(qb, sb).t()
        return (y if bias is None else y + bias.float()).to(out_dtype)
    bias = None if bias is None else bias.to(torch.bfloat16)
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), bias=bias, out_dtype=torch.bfloat16,
                            use_fast_accum=fast_accum).to(out_dtype)


class FP8LinearFunction(torch.autograd.Function):
    """Saves the E4M3 transposed copies of x and W for the backward (1 byte/value, not x itself).
    y is returned in out_dtype; dx in x's dtype, dW in W's."""

    @staticmethod
    def forward(ctx, x, weight, bias, emulate: bool, out_dtype: torch.dtype, fast_accum: bool = False,
                fast_accum_backward: bool = False):
        lead, k = x.shape[:-1], x.shape[-1]
        qx, sx, qx_t, sx_t = quantize_both(x.reshape(-1, k), pad=TOKEN_PAD)  # [M, K], [K, M128]
        qw, sw, qw_t, sw_t = quantize_both(weight)                           # [N, K], [K, N]
        y = fp8_gemm(qx, sx, qw, sw, emulate, out_dtype, bias, fast_accum)   # [M, N]
        ctx.save_for_backward(qx_t, sx_t, qw_t, sw_t)
        ctx.emulate, ctx.has_bias, ctx.x_meta = emulate, bias is not None, (x.shape, x.dtype, weight.dtype)
        ctx.fast_backward = fast_accum_backward
        return y.view(*lead, -1)

    @staticmethod
    def backward(ctx, dy):
        qx_t, sx_t, qw_t, sw_t = ctx.saved_tensors
        x_shape, x_dtype, w_dtype = ctx.x_meta
        dy2 = dy.reshape(-1, dy.shape[-1])                                   # [M, N]
        want_db = ctx.has_bias and ctx.needs_input_grad[2]
        qdy, sdy, qdy_t, sdy_t, *db = quantize_both(dy2, col_sum=want_db, pad=TOKEN_PAD)  # [M, N], [N, M128], [N]
        db = db[0] if want_db else None
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = fp8_gemm(qdy, sdy, qw_t, sw_t, ctx.emulate, x_dtype, fast_accum=ctx.fast_backward).view(x_shape)
        if ctx.needs_input_grad[1]:
            dw = fp8_gemm(qdy_t, sdy_t, qx_t, sx_t, ctx.emulate, w_dtype, fast_accum=ctx.fast_backward)   # [N, K]
        return dx, dw, db, None, None, None, None


def fp8_inference_gemm(qx, sx, qw, sw, bias: torch.Tensor | None, emulate: bool,
                       fast_accum: bool = False) -> torch.Tensor:
    """(qx * sx) [M, K] @ ((qw * sw) [N, K])^T + bias: fp32 when emulated, else bf16 from torch._scaled_mm."""
    if emulate:
        y = fp8_gemm(qx, sx, qw, sw, True, torch.float32)
        return y if bias is None else y + bias.float()
    return torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw.t(), bias=bias, out_dtype=torch.bfloat16,
                            use_fast_accum=fast_accum)


class FP8Linear(QuantLinearBase):
    """nn.Linear with E4M3 rowwise-scaled GEMMs. emulate: None = scaled-mm where native (CUDA sm89+).
    fast_accum: the forward GEMM accumulates in the tensor cores' fast accumulator (QuantConfig.fp8_fast_accum);
    fast_accum_backward: so do the training dgrad and wgrad (QuantConfig.fp8_fast_accum_backward).
    recipe: how training quantizes x and dy (QuantConfig.fp8_recipe): "rowwise" (this file) or "channel_delayed"
    (fp8_channel.py; amax_history steps of channel amaxes, amax_margin binades of headroom).

    `freeze()` quantizes the weight once for inference: afterwards no-grad forwards use the frozen E4M3
    weight and quantize only the activation (`frozen_gemm`); training forwards are unchanged."""

    kind = "FP8 (torch._scaled_mm)"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, emulate: bool | None = None,
                 device=None, dtype=None, fast_accum: bool = False, recipe: str = "rowwise", amax_history: int = 16,
                 amax_margin: int = 2, fast_accum_backward: bool = False, style: str = "replicated", tp_group=None):
        """in/out_features are this rank's shard with style "column"/"row" and a tp_group (tensor_parallel.py)."""
        from .tensor_parallel import mark_tp_parameters, tp_style

        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.style, self.tp_group = tp_style(style, tp_group)
        mark_tp_parameters(self, self.style)
        if recipe not in RECIPES:
            raise ValueError(f"quant.fp8_recipe: unknown recipe {recipe!r}. Fix: use one of {', '.join(RECIPES)}")
        self.emulate, self.fast_accum, self.recipe = emulate, fast_accum, recipe
        self.fast_accum_backward = fast_accum_backward
        self.register_buffer("qweight", None, persistent=False)    # set by freeze()
        self.register_buffer("wscale", None, persistent=False)
        if recipe == "channel_delayed":                              # amax histories of x and dy (fp8_channel.py)
            from .fp8_channel import DelayedChannelScale
            self.x_scale = DelayedChannelScale(amax_history, amax_margin)
            self.dy_scale = DelayedChannelScale(amax_history, amax_margin)

    @classmethod
    def from_linear(cls, linear, emulate: bool | None = None, fast_accum: bool = False, recipe: str = "rowwise",
                    amax_history: int = 16, amax_margin: int = 2, fast_accum_backward: bool = False) -> "FP8Linear":
        """Wrap an existing linear, sharing its parameters."""
        return cls._wrap(linear, emulate=emulate, fast_accum=fast_accum, recipe=recipe, amax_history=amax_history,
                         amax_margin=amax_margin, fast_accum_backward=fast_accum_backward)

    @torch.no_grad()
    def freeze(self) -> None:
        """Quantize the current weight for inference (call again after changing the weight)."""
        qw, sw = quantize_rowwise(self.weight)
        self.qweight, self.wscale = qw, sw

    def frozen_gemm(self, qx: torch.Tensor, sx: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """y = (qx * sx) W^T + b with the frozen E4M3 weight, for an input already quantized row by row [M, K]:
        fp32 when emulated, bf16 from torch._scaled_mm. with_bias=False: the product alone (a row shard's)."""
        emulate = self.emulate if self.emulate is not None else not use_scaled_mm(qx.device)
        bias = None if self.bias is None or not with_bias else self.bias.to(torch.float32 if emulate else torch.bfloat16)
        return fp8_inference_gemm(qx, sx, self.qweight, self.wscale, bias, emulate, self.fast_accum)

    def training_settings(self, x: torch.Tensor) -> tuple[bool, torch.dtype]:
        """(emulate, output dtype) of a training forward on x. Like nn.Linear under autocast, the output comes in
        the autocast dtype (bf16 activations between layers, not the fp32 of a norm's output); the caller runs
        the function itself with autocast off (exact emulation)."""
        emulate = self.emulate if self.emulate is not None else not use_scaled_mm(x.device)
        dev = x.device.type
        return emulate, torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = getattr(self, "same_input_group", None)
        if group is not None and torch.is_grad_enabled():   # training: one linear with those reading x too
            return group.output(self, x)
        if self.tp_group is None:
            return self._local(x, self.bias)
        from .tensor_parallel import tp_forward

        return tp_forward(self._local, x, self.bias, self.style, self.tp_group)

    def _local(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This rank's product x W^T (+ bias): the whole layer when unsharded."""
        if self.qweight is not None and not torch.is_grad_enabled():
            # The activation quantization is plain torch ops on purpose: under `torch.compile` Inductor fuses it
            # into the op that produced x (norm + modulation), which is what makes FP8 pay off on Hopper (an
            # unfused quantization pass costs more than the GEMM saves).
            lead, k = x.shape[:-1], x.shape[-1]
            qx, sx = quantize_rowwise(x.reshape(-1, k))
            return self.frozen_gemm(qx, sx, with_bias=bias is not None).to(x.dtype).view(*lead, -1)
        emulate, out_dtype = self.training_settings(x)
        with torch.autocast(x.device.type, enabled=False):
            # No grad, no backward, so no roll: delayed scales would stay at their first call's amaxes. Such
            # forwards (evaluation, a frozen teacher that was never `freeze()`d) scale per token, as rowwise does.
            if self.recipe == "channel_delayed" and torch.is_grad_enabled():
                from .fp8_channel import FP8ChannelLinearFunction
                return FP8ChannelLinearFunction.apply(x, self.weight, bias, self.x_scale, self.dy_scale, emulate,
                                                      out_dtype, self.fast_accum, self.fast_accum_backward)
            return FP8LinearFunction.apply(x, self.weight, bias, emulate, out_dtype, self.fast_accum,
                                           self.fast_accum_backward)
