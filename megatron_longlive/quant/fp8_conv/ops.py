"""The FP8 conv as a torch.library custom op (fake impl: torch.compile traces it, CUDA graphs capture it).

  megatron_longlive::fp8_conv3d(x [N, C, T, H, W], w_q [Cout, taps * Cp] e4m3, w_scale [Cout] fp32, bias?,
                                kt, kh, kw, amax?, up2x) -> [N, Cout, T - kt + 1, H, W] in x's dtype, channels_last_3d
  (up2x: w_q holds 4 phase kernels of a nearest-2x-upsampling conv, kernel (1, 2, 2): [N, Cout, T, 2H, 2W])

Three launches: amax of x (device scalar, no host sync), quantize into the padded buffer, implicit GEMM. With a
static `amax` (a known bound on |x|, fp32 0-dim) the first is skipped: 3 B per input value instead of 5, and the
codes no longer depend on the rest of the tensor (a chunked decode quantizes like the one-call decode).
No temporal padding (the causal cache already prepended kt - 1 frames), spatial padding kh // 2, kw // 2.
On CUDA the GEMM is autotuned over conv_triton.CONFIGS per (rows octave, Cp, Cout, kernel) and reads its tiles
through TMA descriptors; under TRITON_INTERPRET=1 (CPU tests) it runs one small tile with pointer loads.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton

from .conv_triton import CONFIGS, INTERPRET_TILE, PERSISTENT_CONFIGS, conv_kernel, conv_kernel_static
from .quantize_triton import _amax_kernel, _quantize_kernel
from .reference import Layout, act_scale, layout


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_runs_here(x: torch.Tensor) -> None:
    if not x.is_cuda and not _interpret():
        raise RuntimeError("the FP8 conv runs Triton kernels: it needs CUDA (sm89+), or TRITON_INTERPRET=1 set before "
                           "triton is imported (CPU tests). Fix: use the bf16 convs (infer.vae_conv=bf16) on the CPU")


def _quick_bench(fn, quantiles):
    """Autotuning timer: a few ms per config, so the first call of a new conv shape stays cheap."""
    return triton.testing.do_bench(fn, warmup=3, rep=15, quantiles=quantiles)


_TUNED: dict = {}
PERSISTENT_MODES = ("off", "on", "auto")


def persistent_mode() -> str:
    """Which GEMM schedules the autotuner tries: `off` one tile per program (CONFIGS), `on` one program per SM
    (PERSISTENT_CONFIGS), `auto` both. From MEGATRON_LONGLIVE_FP8_CONV_PERSISTENT (default auto: the Wan2.2 704p
    decode went from 47.7 FPS with `off` to 57.8 on one H100, 2026-12-07; bench/RESULTS.md)."""
    mode = os.environ.get("MEGATRON_LONGLIVE_FP8_CONV_PERSISTENT", "auto")
    if mode not in PERSISTENT_MODES:
        raise ValueError(f"MEGATRON_LONGLIVE_FP8_CONV_PERSISTENT={mode!r}: choose one of {', '.join(PERSISTENT_MODES)}")
    return mode


def _configs(mode: str) -> list:
    tiles = ([(c, False) for c in CONFIGS] if mode != "on" else []) + \
            ([(c, True) for c in PERSISTENT_CONFIGS] if mode != "off" else [])
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "PERSISTENT": p}, num_stages=s, num_warps=w)
            for (m, n, k, s, w), p in tiles]


def _tuned_kernel(use_tma: bool):
    key = (use_tma, persistent_mode())
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(_configs(key[1]), key=["M_KEY", "CP", "COUT", "KT", "KH", "KW"],
                                      do_bench=_quick_bench)(conv_kernel)
    return _TUNED[key]


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


_ALLOCATOR_DEVICE: str | None = None


def _ensure_allocator(device: torch.device) -> None:
    """Device-side TMA descriptors need scratch memory per launch: torch's caching allocator (stream ordered, the
    CUDA-graph pool during a capture). Shared with other Triton users in the process, who set the same thing."""
    global _ALLOCATOR_DEVICE
    kind = "cuda" if device.type == "cuda" else "cpu"
    if _ALLOCATOR_DEVICE != kind:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=kind))
        _ALLOCATOR_DEVICE = kind


def quantize_activation(x: torch.Tensor, kernel: tuple[int, int, int],
                        amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, C, T, H, W] -> (padded E4M3 buffer [G + N*T*Hp*Wp, Cp], int32 word holding the fp32 amax bits);
    bitwise reference.quantize_activation (scale = amax / 448). `amax`: a static bound (values beyond saturate)."""
    _check_runs_here(x)
    lay = layout(x, kernel)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    interp = _interpret()
    if amax is not None:
        amax = amax.to(device=x.device, dtype=torch.float32).reshape(()).view(torch.int32)
    else:
        amax = torch.zeros((), dtype=torch.int32, device=x.device)
        numel = x.numel()
        block = 1024 if interp else 4096
        iters = 1 if interp else triton.next_power_of_2(max(1, min(256, triton.cdiv(numel, block * 1024))))
        _amax_kernel[(triton.cdiv(numel, block * iters),)](x, amax, numel, BLOCK=block, ITERS=iters, num_warps=8)
    buf = torch.empty(lay.rows, lay.cp, dtype=torch.uint8, device=x.device)
    bc = min(128, triton.next_power_of_2(lay.cp))
    br = (2048 if interp else 8192) // bc
    _quantize_kernel[(triton.cdiv(lay.rows, br), triton.cdiv(lay.cp, bc))](
        x, amax, buf, lay.rows, lay.guard, lay.t * lay.n, lay.h, lay.w, lay.c, lay.cp, lay.ph, lay.pw,
        BR=br, BC=bc, HW_CAST=x.is_cuda and not interp, num_warps=4)
    return buf.view(torch.float8_e4m3fn), amax


def _tma_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and not _interpret() and torch.cuda.get_device_capability(x.device)[0] >= 9


def launch_conv(buf: torch.Tensor, amax: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out: torch.Tensor, lay: Layout, use_tma: bool, up2x: bool = False) -> None:
    """The implicit GEMM into `out` (channels_last_3d [N, Cout, T_out, H, W]); use_tma: descriptor loads (sm90; the
    interpreter runs them too, which the CPU tests use to check the tile coordinates). up2x: w_q holds the 4 phase
    kernels (2x2) of a 1x3x3 conv after a nearest 2x upsampling ([4 * Cout, 4 * Cp]); out is [N, Cout, T_out, 2H, 2W]."""
    kt, kh, kw = lay.kernel
    cout = w_q.shape[0]
    w_scale = w_scale.float().contiguous()
    b = bias if bias is not None else w_scale
    m_rows = lay.t_out * lay.hp * lay.wp
    args = (buf, w_q, amax, w_scale, b, out, lay.rows, lay.guard, lay.t, lay.h, lay.w, lay.cp, cout, kt, kh, kw)
    if use_tma:
        _ensure_allocator(buf.device)
    programs = _num_sms(buf.device)
    if _interpret():
        bm, bn, bk = INTERPRET_TILE
        k_iters = kt * kh * kw * triton.cdiv(lay.cp, bk)
        tiles = triton.cdiv(m_rows, bm) * triton.cdiv(cout, bn)
        persistent = persistent_mode() == "on"
        grid = (min(programs, tiles * lay.n),) if persistent else (tiles, lay.n)
        conv_kernel_static[grid](*args, k_iters, tiles * lay.n, HAS_BIAS=bias is not None, USE_TMA=use_tma,
                                 INTERPRET=True, UP2X=up2x, PERSISTENT=persistent, NUM_PROGRAMS=programs,
                                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    else:
        def grid(meta):
            tiles = triton.cdiv(m_rows, meta["BLOCK_M"]) * triton.cdiv(cout, meta["BLOCK_N"])
            return (min(programs, tiles * lay.n),) if meta["PERSISTENT"] else (tiles, lay.n)
        _tuned_kernel(use_tma)[grid](*args, m_rows.bit_length(), lay.n, HAS_BIAS=bias is not None, USE_TMA=use_tma,
                                     INTERPRET=False, NUM_PROGRAMS=programs, UP2X=up2x)


@torch.library.custom_op("megatron_longlive::fp8_conv3d", mutates_args=())
def fp8_conv3d(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
               kt: int, kh: int, kw: int, amax: Optional[torch.Tensor] = None, up2x: bool = False) -> torch.Tensor:
    kernel = (kt, kh, kw)
    lay = layout(x, kernel)
    assert w_q.dtype == torch.float8_e4m3fn and w_q.shape[1] == kt * kh * kw * lay.cp, (w_q.shape, lay)
    buf, amax_bits = quantize_activation(x, kernel, amax)
    return _gemm(buf, amax_bits, w_q, w_scale, bias, lay, x.dtype, up2x)


def _empty_output(n: int, gemm_n: int, t_out: int, h: int, w: int, dtype: torch.dtype, device,
                  up2x: bool = False) -> torch.Tensor:
    """The conv output [N, Cout, T_out, H, W] in channels_last_3d (memory [N, T_out, H, W, Cout]); Cout = the
    GEMM's N, or N / 4 at twice the size with up2x."""
    if up2x:
        gemm_n, h, w = gemm_n // 4, 2 * h, 2 * w
    return torch.empty((n, gemm_n, t_out, h, w), dtype=dtype, device=device, memory_format=torch.channels_last_3d)


def _gemm(buf: torch.Tensor, amax_bits: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
          bias: torch.Tensor | None, lay: Layout, dtype: torch.dtype, up2x: bool = False) -> torch.Tensor:
    """The implicit GEMM of a quantized buffer into a new output tensor."""
    if up2x and (lay.kernel != (1, 2, 2) or w_q.shape[0] % 4):
        raise ValueError(f"fp8 conv up2x: needs the 4 phase kernels, (1, 2, 2) and [4 * Cout, 4 * Cp] weights; got "
                         f"kernel {lay.kernel}, weights {tuple(w_q.shape)}")
    out = _empty_output(lay.n, w_q.shape[0], lay.t_out, lay.h, lay.w, dtype, buf.device, up2x)
    if out.numel():
        launch_conv(buf, amax_bits, w_q, w_scale, bias, out, lay, use_tma=_tma_ok(buf), up2x=up2x)
    return out


@fp8_conv3d.register_fake
def _(x, w_q, w_scale, bias, kt, kh, kw, amax=None, up2x=False):
    n, _, t, h, w = x.shape
    return _empty_output(n, w_q.shape[0], t - kt + 1, h, w, x.dtype, x.device, up2x)


# ----- the compiled path: quantization in torch ops, fused by Inductor into the kernel that produces x ---------
@torch.library.custom_op("megatron_longlive::e4m3_inverse_scale", mutates_args=())
def e4m3_inverse_scale(amax: torch.Tensor) -> torch.Tensor:
    """448 / amax (1 for amax == 0), fp32, correctly rounded. An opaque op on purpose: Triton code generated for a
    plain division uses the approximate div.full.f32, and the codes must equal the reference's."""
    return act_scale(amax)[1]


@e4m3_inverse_scale.register_fake
def _(amax):
    return torch.empty((), dtype=torch.float32, device=amax.device)


def quantize_activation_torch(x: torch.Tensor, kernel: tuple[int, int, int],
                              amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activation in torch ops: the same buffer, bitwise, and the fp32 amax (0-dim). Traced by
    torch.compile, the scale, clamp, cast and zero padding become index arithmetic that Inductor fuses into the
    kernel producing x (e.g. silu(RMSNorm) with the causal cache concatenated), which then writes 1 B per value
    instead of 2, and no separate quantize pass reads x again (3 B per value with a static bound). A dynamic amax
    is one reduction, fused with the producer as well."""
    lay = layout(x, kernel)
    amax = x.abs().amax().float() if amax is None else amax.to(device=x.device, dtype=torch.float32).reshape(())
    inv = torch.ops.megatron_longlive.e4m3_inverse_scale(amax)
    q = (x.float() * inv).clamp(-448.0, 448.0).permute(0, 2, 3, 4, 1)      # [n, t, h, w, c]
    q = F.pad(q, (0, lay.cp - lay.c, lay.pw, lay.pw, lay.ph, lay.ph))        # zero border and channels: code 0
    q = F.pad(q.reshape(-1, lay.cp), (0, 0, lay.guard, 0))
    return q.to(torch.float8_e4m3fn), amax


@torch.library.custom_op("megatron_longlive::fp8_conv3d_buffer", mutates_args=())
def fp8_conv3d_buffer(buf: torch.Tensor, amax: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                      bias: Optional[torch.Tensor], n: int, t: int, h: int, w: int, c: int, kt: int, kh: int, kw: int,
                      out_dtype: torch.dtype, up2x: bool = False) -> torch.Tensor:
    """The implicit GEMM on an already quantized buffer (quantize_activation_torch) of an input [n, c, t, h, w]."""
    lay = Layout(n, t, h, w, c, (kt, kh, kw))
    assert buf.shape == (lay.rows, lay.cp) and buf.dtype == torch.float8_e4m3fn, (buf.shape, lay)
    return _gemm(buf.contiguous(), amax.float().reshape(()).view(torch.int32), w_q, w_scale, bias, lay, out_dtype,
                 up2x)


@fp8_conv3d_buffer.register_fake
def _(buf, amax, w_q, w_scale, bias, n, t, h, w, c, kt, kh, kw, out_dtype, up2x=False):
    return _empty_output(n, w_q.shape[0], t - kt + 1, h, w, out_dtype, buf.device, up2x)


def conv3d_fp8(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               kernel: tuple[int, int, int], amax: torch.Tensor | None = None, up2x: bool = False) -> torch.Tensor:
    """F.conv3d(x, w, bias, padding=(0, kh // 2, kw // 2)) on E4M3 operands: x quantized per call (one scale per
    tensor: max |x|, or the static bound `amax`), w_q / w_scale from reference.quantize_weight. Returns x's dtype,
    channels_last_3d. up2x: the 1x3x3 conv of x upsampled 2x (nearest), from its 4 phase kernels (kernel (1, 2, 2),
    w_q [4 * Cout, 4 * Cp] from reference.quantize_weight of the phase weights): [N, Cout, T, 2H, 2W].
    Eager: the Triton quantizer and the GEMM in one op. Under torch.compile: the quantization in torch ops (fused
    into x's producer), then the GEMM op; the same codes, so the same output."""
    _check_runs_here(x)
    if x.dim() != 5:
        raise ValueError(f"fp8 conv: input must be [N, C, T, H, W], got {tuple(x.shape)}")
    if torch.compiler.is_compiling():
        lay = layout(x, kernel)
        buf, amax = quantize_activation_torch(x, kernel, amax)
        return torch.ops.megatron_longlive.fp8_conv3d_buffer(buf, amax, w_q, w_scale, bias, lay.n, lay.t, lay.h,
                                                             lay.w, lay.c, *kernel, x.dtype, up2x)
    return torch.ops.megatron_longlive.fp8_conv3d(x.contiguous(memory_format=torch.channels_last_3d), w_q, w_scale,
                                                  bias, *kernel, amax, up2x)
