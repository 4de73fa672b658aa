"""Pure-PyTorch oracle of the FP8 convolution: the padded E4M3 activation buffer, the per-output-channel weight
quantizer (also what the module uses at load time), and the float64 convolution of the dequantized operands.

Layout of the activation buffer (what the Triton quantizer writes, `layout()`): a channels-last input
x [N, C, T, H, W] of a conv with kernel (kt, kh, kw) becomes E4M3 codes
    buf [G + N * T * Hp * Wp, Cp],   Hp = H + 2 * (kh // 2), Wp = W + 2 * (kw // 2), Cp = ceil(C / 16) * 16,
rows = positions of the spatially zero-padded grid (n, t, hp, wp), after G = (kh // 2) * Wp + kw // 2 zero guard
rows. For an output position on that grid (row r), tap (dt, dh, dw) reads row r + dt * Hp * Wp + (dh - kh // 2) * Wp
+ (dw - kw // 2): every tap is the same 2-D GEMM operand shifted by a constant number of rows. The guard rows
keep every shift of the first output rows at a row index >= 0; zero borders and zero channels Cp > C make the
shifted reads of interior positions exact. Outputs on border rows are computed and dropped.

Codes: scale = amax / 448 (1 for an all-zero tensor), inv = 448 / amax, q = e4m3_rne(clamp(x * inv, +-448)),
fp32 arithmetic (one IEEE division per tensor, one multiply per value), dequantized q * scale.
Weights: the same per output channel over (taps, Cin), stored K-major [Cout, taps * Cp] (tap-major, channel-minor).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..constants import E4M3_MAX
from ..ieee import div_rn

CHANNEL_ALIGN = 16  # channel padding: 16-byte rows of E4M3 (TMA strides) and whole MMA K-steps


@dataclasses.dataclass(frozen=True)
class Layout:
    """Geometry of the padded activation buffer of one conv call."""

    n: int
    t: int
    h: int
    w: int
    c: int
    kernel: tuple[int, int, int]

    @property
    def ph(self) -> int:
        return self.kernel[1] // 2

    @property
    def pw(self) -> int:
        return self.kernel[2] // 2

    @property
    def hp(self) -> int:
        return self.h + 2 * self.ph

    @property
    def wp(self) -> int:
        return self.w + 2 * self.pw

    @property
    def cp(self) -> int:
        return -(-self.c // CHANNEL_ALIGN) * CHANNEL_ALIGN

    @property
    def guard(self) -> int:
        return self.ph * self.wp + self.pw

    @property
    def rows(self) -> int:
        return self.guard + self.n * self.t * self.hp * self.wp

    @property
    def t_out(self) -> int:
        return self.t - self.kernel[0] + 1


def layout(x: torch.Tensor, kernel: tuple[int, int, int]) -> Layout:
    n, c, t, h, w = x.shape
    if t < kernel[0]:
        raise ValueError(f"fp8 conv: {t} input frames < temporal kernel {kernel[0]} (no temporal padding: the causal "
                         f"cache prepends kernel - 1 frames)")
    return Layout(n, t, h, w, c, tuple(kernel))


def act_scale(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode scale amax / 448, encode multiplier 448 / amax) in fp32; (1, 1) where amax == 0."""
    amax = amax.float()
    pos = amax > 0
    one = torch.ones_like(amax)
    return (torch.where(pos, div_rn(amax, E4M3_MAX), one),
            torch.where(pos, torch.full_like(amax, E4M3_MAX) / torch.where(pos, amax, one), one))


def to_e4m3(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_activation(x: torch.Tensor, kernel: tuple[int, int, int],
                        amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, C, T, H, W] -> (buf [G + N*T*Hp*Wp, Cp] E4M3, fp32 0-dim decode scale); see the module docstring.
    `amax`: a static bound on |x| instead of max |x| (values beyond it saturate at +-448)."""
    lay = layout(x, kernel)
    scale, inv = act_scale(x.abs().amax() if amax is None else amax.reshape(()))
    q = to_e4m3(x.float() * inv).permute(0, 2, 3, 4, 1)                      # [n, t, h, w, c]
    q = F.pad(q.view(torch.uint8), (0, lay.cp - lay.c, lay.pw, lay.pw, lay.ph, lay.ph))   # zero bytes = +0.0
    buf = torch.cat([q.new_zeros(lay.guard, lay.cp), q.reshape(-1, lay.cp)])
    return buf.view(torch.float8_e4m3fn), scale


def unpad_activation(buf: torch.Tensor, lay: Layout) -> torch.Tensor:
    """The inverse view: buf -> E4M3 codes [N, C, T, H, W] (fp32 values, not yet scaled)."""
    grid = buf[lay.guard:].float().view(lay.n, lay.t, lay.hp, lay.wp, lay.cp)
    return grid[:, :, lay.ph:lay.ph + lay.h, lay.pw:lay.pw + lay.w, :lay.c].permute(0, 4, 1, 2, 3)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight [Cout, Cin, kt, kh, kw] -> (E4M3 [Cout, taps * Cp] K-major, fp32 decode scales [Cout])."""
    cout, cin = weight.shape[:2]
    cp = -(-cin // CHANNEL_ALIGN) * CHANNEL_ALIGN
    w = weight.detach().float().permute(0, 2, 3, 4, 1)                         # [cout, kt, kh, kw, cin]
    scale, inv = act_scale(w.abs().reshape(cout, -1).amax(1))
    q = to_e4m3(w * inv.view(-1, 1, 1, 1, 1)).view(torch.uint8)
    q = F.pad(q, (0, cp - cin)).reshape(cout, -1)
    return q.view(torch.float8_e4m3fn).contiguous(), scale


def dequantize_weight(w_q: torch.Tensor, w_scale: torch.Tensor, cin: int, kernel: tuple[int, int, int]) -> torch.Tensor:
    """The inverse: [Cout, taps * Cp] codes and scales -> float64 weight [Cout, Cin, kt, kh, kw]."""
    cout = w_q.shape[0]
    w = w_q.double().view(cout, *kernel, -1)[..., :cin] * w_scale.double().view(-1, 1, 1, 1, 1)
    return w.permute(0, 4, 1, 2, 3)


def conv3d_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                     kernel: tuple[int, int, int], amax: torch.Tensor | None = None, up2x: bool = False) -> torch.Tensor:
    """float64 conv of the dequantized operands (x quantized here, as the kernel does): [N, Cout, T - kt + 1, H, W].
    up2x: w_q holds the 4 phase kernels of an upsampling conv (NearestUp2xConv): [N, Cout, T, 2H, 2W]."""
    from ...models.wan.vae_decoder import interleave_phases

    lay = layout(x, kernel)
    buf, scale = quantize_activation(x, kernel, amax)
    xd = unpad_activation(buf, lay).double() * scale.double()
    wd = dequantize_weight(w_q, w_scale, lay.c, kernel)
    y = F.conv3d(xd, wd, None if bias is None else bias.double(), padding=(0, lay.ph, lay.pw))
    return interleave_phases(y, w_q.shape[0] // 4, lay.h, lay.w) if up2x else y
