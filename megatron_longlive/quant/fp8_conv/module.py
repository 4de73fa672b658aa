"""FP8 convs for the streaming Wan VAE decoder, applied from outside the model code.

`FP8CausalConv3d.from_conv(conv)` keeps everything of a `CausalConv3d` (cache slot, causal cache handling in the
inherited `forward`, shapes) and replaces only `conv()`: E4M3 weights quantized once per output channel, the input
quantized per call with one dynamic scale (ops.conv3d_fp8). `apply_fp8_convs(net, select)` swaps the convs that
`select(name, conv)` picks; the default rule `by_roofline()` keeps the convs where a roofline model predicts no
gain (1x1x1 shortcuts, post_quant_conv, the 12- or 3-channel conv_out): there the extra quantize pass (5 B per
input value vs the 2 B cuDNN reads) costs more than the faster MMA saves.

Static input bounds (`norm_silu_bounds`): a conv fed by silu(RMSNorm(x)) (ResidualBlock conv1 / conv2, conv_out)
has |input| <= max(sqrt(C) * max|gamma|, 0.2785) exactly (F.normalize gives unit vectors over the channels; SiLU
shrinks positives and is >= -0.2785), so its scale is fixed at load time: no amax pass (3 B per input value
instead of 5) and its codes do not depend on the chunking. E4M3 keeps its 3-bit relative precision over the 2**15
below the bound, so a loose bound costs nothing measurable; the other convs (conv_in, time_conv, resample: inputs
from the residual stream) keep the dynamic per-call amax.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from ...models.wan.vae_decoder import (CausalConv3d, Decoder, NearestUp2xConv, ResidualBlock, RMSNorm,
                                       nearest_up2x_phase_weights)
from .ops import conv3d_fp8
from .reference import quantize_weight

Select = Callable[[str, CausalConv3d], bool]


class FP8CausalConv3d(CausalConv3d):
    """A CausalConv3d whose convolution runs on E4M3 operands (weights: per-channel scales, stored once; input:
    one per-tensor scale per call). Buffers: weight_q (uint8 bits of the E4M3 codes [Cout, taps * Cp]: a uint8
    buffer survives `module.to(dtype)`), weight_scale [Cout] and bias [Cout] in fp32. up2x (from a NearestUp2xConv):
    the 4 phase kernels, kernel (1, 2, 2), 4 * Cout rows; the input is the source, the output twice its size."""

    def __init__(self, in_dim: int, out_dim: int, kernel: tuple[int, int, int], scale: int = 1,
                 device: torch.device | str | None = None, input_amax: float | None = None, up2x: bool = False):
        nn.Module.__init__(self)
        kt, kh, kw = kernel
        cp = -(-in_dim // 16) * 16
        rows = 4 * out_dim if up2x else out_dim
        self.up2x = up2x
        self.register_buffer("weight_q", torch.zeros(rows, kt * kh * kw * cp, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(rows, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(rows, dtype=torch.float32, device=device))
        self.static_input = input_amax is not None  # scale from the static bound, else max |x| per call
        self.register_buffer("input_amax", torch.tensor(input_amax or 0.0, dtype=torch.float32, device=device))
        self.in_dim, self.out_dim, self.kt, self.padding = in_dim, out_dim, kt, (0, kh // 2, kw // 2)
        self.kernel = (kt, kh, kw)
        self.scale, self.tscale, self.slot = scale, 1, None

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: CausalConv3d, input_amax: float | None = None) -> "FP8CausalConv3d":
        """Quantize `conv`'s weights (on their device); copies its cache slot and size attributes. `input_amax`:
        a static bound on |input| (see norm_silu_bounds); None = dynamic per-call amax. A NearestUp2xConv keeps its
        upsampling: its phase kernels are quantized (one scale per phase and output channel)."""
        up2x = isinstance(conv, NearestUp2xConv)
        w = nearest_up2x_phase_weights(conv.weight.float()) if up2x else conv.weight
        m = cls(conv.in_dim, conv.out_dim, tuple(w.shape[2:]), conv.scale, device=w.device, input_amax=input_amax,
                up2x=up2x)
        q, s = quantize_weight(w)
        m.weight_q.copy_(q.view(torch.uint8))
        m.weight_scale.copy_(s)
        m.bias.copy_(conv.bias.float().repeat(4 if up2x else 1))
        m.tscale, m.slot = conv.tscale, conv.slot
        return m

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d_fp8(x, self.weight_q.view(torch.float8_e4m3fn), self.weight_scale.float(), self.bias.float(),
                          self.kernel, self.input_amax if self.static_input else None, self.up2x)

    def extra_repr(self) -> str:
        amax = f", input amax {self.input_amax.item():.4g} (static)" if self.static_input else ""
        up = ", nearest 2x upsampling (phase kernels)" if self.up2x else ""
        return f"{self.in_dim}, {self.out_dim}, kernel={self.kernel}, e4m3{amax}{up}"


def _taps_and_input_share(conv: CausalConv3d) -> tuple[int, float]:
    """(kernel taps per output position, input values read per output position / Cin): an upsampling conv reads
    4 taps of a source of a quarter of the output's positions."""
    if isinstance(conv, NearestUp2xConv) or getattr(conv, "up2x", False):
        return 4, 0.25
    kt, kh, kw = conv.kernel if isinstance(conv, FP8CausalConv3d) else tuple(conv.weight.shape[2:])
    return kt * kh * kw, 1.0


def predicted_speedup(conv: CausalConv3d, bf16_flops: float = 640e12, fp8_flops: float = 1100e12,
                      bandwidth: float = 3.0e12) -> float:
    """Roofline time of the BF16 conv over that of the FP8 conv, per output position: FLOPs 2 * taps * Cin * Cout;
    bytes BF16 2 * Cin + 2 * Cout (read input, write output), FP8 5 * Cin + 2 * Cout (amax read, quantize read,
    E4M3 write: the dynamic-scale case, conservative for statically bounded convs; the taps re-read the E4M3 rows
    from L2). Defaults: one H100 SXM as measured (cuDNN BF16 convs
    ~640 TFLOP/s in bench_vae, FP8 MMA ~1100 TFLOP/s, ~3.0 TB/s)."""
    taps, share = _taps_and_input_share(conv)
    flops = 2.0 * taps * conv.in_dim * conv.out_dim
    t_bf16 = max(flops / bf16_flops, (2.0 * share * conv.in_dim + 2.0 * conv.out_dim) / bandwidth)
    t_fp8 = max(flops / fp8_flops, (5.0 * share * conv.in_dim + 2.0 * conv.out_dim) / bandwidth)
    return t_bf16 / t_fp8


def by_roofline(min_speedup: float = 1.15, **hardware) -> Select:
    """The default rule: FP8 where predicted_speedup(conv, **hardware) >= min_speedup. Wan2.1 / Wan2.2: every
    3x3x3, 1x3x3 and 3x1x1 conv except conv_out go FP8; the 1x1x1 shortcuts, post_quant_conv and the 3- or
    12-channel conv_out stay BF16 (bandwidth-bound: the quantize pass would cost more than the MMA saves)."""
    return lambda name, conv: predicted_speedup(conv, **hardware) >= min_speedup


def check_fp8_device(device: torch.device) -> None:
    """ValueError unless the FP8 conv can run on `device`: CUDA with FP8 tensor cores (sm89+), or the Triton
    interpreter (TRITON_INTERPRET=1, CPU tests)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"FP8 VAE convs need FP8 tensor cores (sm89+), {device} is sm{major}{minor}. "
                             f"Fix: infer.vae_conv=bf16")
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"FP8 VAE convs run Triton kernels: {device} needs TRITON_INTERPRET=1 (slow; tests only). "
                         f"Fix: infer.vae_conv=bf16 off CUDA")


SILU_MIN = 0.27846455574  # -min_v silu(v) = -v*sigmoid(v) at v = -1.2785
BOUND_MARGIN = 1.02        # bf16 rounding of the norm's three products and of SiLU (each <= 2**-8 relative)


def norm_silu_bounds(net: nn.Module) -> dict[str, float]:
    """{conv name: static bound on |input|} for the convs fed by silu(RMSNorm(.)): every ResidualBlock's conv1 /
    conv2 and the decoder's conv_out. Bound = max(sqrt(C) * max|gamma|, 0.2785) * 1.02."""
    def bound(norm: RMSNorm) -> float:
        return max(norm.scale * norm.gamma.detach().abs().max().item(), SILU_MIN) * BOUND_MARGIN

    out = {}
    for name, m in net.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, ResidualBlock):
            out[prefix + "conv1"], out[prefix + "conv2"] = bound(m.norm1), bound(m.norm2)
        elif isinstance(m, Decoder):
            out[prefix + "conv_out"] = bound(m.norm_out)
    return out


def apply_fp8_convs(net: nn.Module, select: Select | None = None, static_bounds: bool = True) -> list[str]:
    """Swap the CausalConv3d submodules of `net` that `select(name, conv)` picks (default: by_roofline()) for
    FP8CausalConv3d, in place; returns the swapped names. The BF16 weights of swapped convs are released.
    static_bounds: convs fed by silu(RMSNorm) get their static input bound (norm_silu_bounds), the rest the
    dynamic per-call amax; False: all dynamic."""
    select = select or by_roofline()
    bounds = norm_silu_bounds(net) if static_bounds else {}
    chosen = [(name, m) for name, m in net.named_modules()
              if isinstance(m, CausalConv3d) and not isinstance(m, FP8CausalConv3d) and select(name, m)]
    for name, m in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, FP8CausalConv3d.from_conv(m, bounds.get(name)))
    return [name for name, _ in chosen]
