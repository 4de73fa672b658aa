"""FP8 implicit-GEMM conv (quant/fp8_conv) under TRITON_INTERPRET=1: tier (b) quantizer bitwise equal to the torch
reference with exactly-zero padding, and the conv equal to a float64 conv of the SAME dequantized E4M3 operands
within fp32-accumulation error, for the decoder's three kernel shapes (3,3,3), (3,1,1), (1,1,1); ragged H, W, C,
Cout (partial tiles in every dim), T > 1, batch 2; pointer loads and (interpreted) TMA descriptor loads. Plus the
custom op's fake impl (shapes, channels-last strides) and a torch.compile trace through it.
"""
from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():  # pragma: no cover - the GPU lane runs tests/gpu/test_fp8_conv_gpu.py compiled
    pytest.skip("interpreter tests run on CPU machines", allow_module_level=True)

os.environ["TRITON_INTERPRET"] = "1"

from megatron_longlive.quant.fp8_conv import ops  # noqa: E402
from megatron_longlive.models.wan.vae_decoder import (NearestUp2xConv, interleave_phases,  # noqa: E402
                                                      nearest_up2x_phase_weights)
from megatron_longlive.quant.fp8_conv import reference as ref  # noqa: E402

# (kernel, x shape [N, C, T, H, W], Cout): T = T_out + kt - 1 with T_out > 1; C, Cout, H, W off the tiles
CASES = [((3, 3, 3), (2, 20, 4, 5, 7), 19),
         ((3, 3, 3), (1, 37, 5, 3, 4), 33),
         ((1, 3, 3), (1, 24, 2, 6, 5), 17),
         ((3, 1, 1), (1, 40, 5, 3, 5), 80),
         ((1, 1, 1), (2, 33, 3, 4, 3), 21)]


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-2, 1, shape[1]).view(1, -1, 1, 1, 1)
    x.view(-1)[::97] = 0.0
    x.view(-1)[5] = -0.0
    return x


def _weights(cout, cin, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, *kernel, generator=g) / (cin * kernel[0] * kernel[1] * kernel[2]) ** 0.5
    w[1] = 0.0                                          # an all-zero output channel: scale 1, codes 0
    return w, torch.randn(cout, generator=g)


def _bytes_differ(a: torch.Tensor, b: torch.Tensor) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return int((a.view(torch.uint8) != b.view(torch.uint8)).sum())


@pytest.mark.parametrize("kernel,shape,cout", CASES)
def test_quantizer_bitwise_and_zero_padding(kernel, shape, cout):
    x = _data(shape, 0)
    for src in (x, x.to(torch.bfloat16), x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)):
        buf, amax = ops.quantize_activation(src, kernel)
        want, scale = ref.quantize_activation(src, kernel)
        assert (n := _bytes_differ(buf, want)) == 0, f"{src.dtype}: {n} of {want.numel()} bytes differ"
        assert amax.view(torch.float32) == src.float().abs().max()
        assert scale == src.float().abs().max() / 448.0
        # the independent check of the padding: border, guard rows and channel padding are +0.0 bytes
        lay = ref.layout(src, kernel)
        grid = buf[lay.guard:].view(torch.uint8).view(lay.n, lay.t, lay.hp, lay.wp, lay.cp).clone()
        assert int(buf[:lay.guard].view(torch.uint8).sum()) == 0
        grid[:, :, lay.ph:lay.ph + lay.h, lay.pw:lay.pw + lay.w, :lay.c] = 0
        assert int(grid.sum()) == 0


@pytest.mark.parametrize("factor", [0.5, 1.0, 3.0])
def test_static_amax_quantizer_and_conv(factor):
    """A static bound instead of max |x|: below it the codes are the reference's, above it they saturate."""
    kernel, shape, cout = CASES[0]
    x = _data(shape, 6).to(torch.bfloat16)
    amax = torch.tensor(factor * x.float().abs().max().item())
    buf, bits = ops.quantize_activation(x, kernel, amax)
    want, scale = ref.quantize_activation(x, kernel, amax)
    assert (n := _bytes_differ(buf, want)) == 0, f"{n} bytes differ"
    assert bits.view(torch.float32) == amax and scale == amax / 448.0
    if factor < 1:
        assert (buf.float().abs() == 448).sum() > 0
    w, b = _weights(cout, shape[1], kernel, 7)
    w_q, w_s = ref.quantize_weight(w)
    y = ops.conv3d_fp8(x.float(), w_q, w_s, b, kernel, amax)
    want_y = ref.conv3d_reference(x.float(), w_q, w_s, b, kernel, amax)
    assert torch.allclose(y.double(), want_y, rtol=1e-5, atol=1e-5 * want_y.abs().max().item())


def test_quantizer_all_zero_input_has_scale_one():
    x = torch.zeros(1, 16, 3, 2, 2)
    buf, amax = ops.quantize_activation(x, (3, 3, 3))
    assert int(buf.view(torch.uint8).sum()) == 0 and amax.view(torch.float32) == 0
    y = ops.conv3d_fp8(x, *ref.quantize_weight(torch.randn(8, 16, 3, 3, 3)), torch.arange(8.0), (3, 3, 3))
    assert torch.equal(y, torch.arange(8.0).view(1, 8, 1, 1, 1).expand_as(y))


def _check_conv(y: torch.Tensor, x, w_q, w_s, bias, kernel, up2x=False):
    want = ref.conv3d_reference(x, w_q, w_s, bias, kernel, up2x=up2x)         # float64, dequantized operands
    lay = ref.layout(x, kernel)
    buf, scale = ref.quantize_activation(x, kernel)
    bound = torch.nn.functional.conv3d((ref.unpad_activation(buf, lay).double() * scale.double()).abs(),
                                       ref.dequantize_weight(w_q, w_s, lay.c, kernel).abs(),
                                       bias.double().abs(), padding=(0, lay.ph, lay.pw))   # sum of |terms|
    if up2x:
        bound = interleave_phases(bound, w_q.shape[0] // 4, lay.h, lay.w)
    assert y.shape == want.shape and y.is_contiguous(memory_format=torch.channels_last_3d)
    err = (y.double() - want).abs()
    if y.dtype == torch.float32:       # fp32 accumulation of exact products, then two fp32 scale multiplies
        tol = 2e-6 * bound + 1e-30
    else:                              # plus one bf16 rounding of the result
        tol = 2e-6 * bound + want.abs() * 2.0 ** -8
    assert torch.all(err <= tol), f"worst excess {(err - tol).max().item():.3g}"
    return err.max().item()


@pytest.mark.parametrize("kernel,shape,cout", CASES)
def test_conv_equals_float64_conv_of_dequantized_operands(kernel, shape, cout):
    x = _data(shape, 1)
    w, b = _weights(cout, shape[1], kernel, 2)
    w_q, w_s = ref.quantize_weight(w)
    for dtype in (torch.float32, torch.bfloat16):
        xi = x.to(dtype)
        y = ops.conv3d_fp8(xi, w_q, w_s, b, kernel)
        assert y.dtype == dtype
        _check_conv(y, xi, w_q, w_s, b, kernel)
    y = ops.conv3d_fp8(x, w_q, w_s, None, kernel)                               # no bias
    _check_conv(y, x, w_q, w_s, torch.zeros(cout), kernel)


@pytest.mark.parametrize("kernel,shape,cout", [CASES[0], CASES[3]])
def test_conv_through_tma_descriptors(kernel, shape, cout):
    """The sm90 path's descriptor loads (zero fill past Cp and past the last row), run by the interpreter."""
    x = _data(shape, 3)
    w, b = _weights(cout, shape[1], kernel, 4)
    w_q, w_s = ref.quantize_weight(w)
    lay = ref.layout(x, kernel)
    buf, amax = ops.quantize_activation(x, kernel)
    out = torch.empty((lay.n, cout, lay.t_out, lay.h, lay.w), memory_format=torch.channels_last_3d)
    ops.launch_conv(buf, amax, w_q, w_s, b, out, lay, use_tma=True)
    _check_conv(out, x, w_q, w_s, b, kernel)


@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("kernel,shape,cout", [CASES[0], CASES[2], CASES[4]])
def test_persistent_schedule(monkeypatch, kernel, shape, cout, use_tma):
    """One program per SM walking the tiles (4 programs under the interpreter; CASES[0] has 16 tiles over 2
    samples, so programs cross sample boundaries): the same output as one tile per program, bitwise."""
    x = _data(shape, 5)
    w, b = _weights(cout, shape[1], kernel, 6)
    w_q, w_s = ref.quantize_weight(w)
    lay = ref.layout(x, kernel)
    buf, amax = ops.quantize_activation(x, kernel)
    outs = []
    for mode in ("off", "on"):
        monkeypatch.setenv("MEGATRON_LONGLIVE_FP8_CONV_PERSISTENT", mode)
        out = torch.empty((lay.n, cout, lay.t_out, lay.h, lay.w), memory_format=torch.channels_last_3d)
        ops.launch_conv(buf, amax, w_q, w_s, b, out, lay, use_tma=use_tma)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    _check_conv(outs[1], x, w_q, w_s, b, kernel)
    monkeypatch.setenv("MEGATRON_LONGLIVE_FP8_CONV_PERSISTENT", "sometimes")
    with pytest.raises(ValueError, match="choose one of off, on, auto"):
        ops.persistent_mode()


# (x shape [N, C, T, H, W], Cout) of the upsampling conv: 4 * Cout GEMM columns, so the interpreter's 16-column
# tiles straddle phases (Cout 19), plus a one-pixel-high source
UP2X_CASES = [((2, 20, 2, 5, 7), 19), ((1, 24, 1, 1, 3), 16)]


@pytest.mark.parametrize("persistent", ["off", "on"])
@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("shape,cout", UP2X_CASES)
def test_up2x_conv_equals_float64_phase_conv(monkeypatch, shape, cout, use_tma, persistent):
    """Nearest 2x upsampling + 1x3x3 conv as one GEMM over the 4 phase kernels on the source: each GEMM column
    stored at its phase's pixel of the 2H x 2W output (checked against the float64 conv of the same dequantized
    operands, interleaved by the model's own function; the decomposition itself is checked in float64 in
    test_vae_decoder.py)."""
    monkeypatch.setenv("MEGATRON_LONGLIVE_FP8_CONV_PERSISTENT", persistent)
    x = _data(shape, 8)
    w, b = _weights(cout, shape[1], (1, 3, 3), 9)
    w_q, w_s = ref.quantize_weight(nearest_up2x_phase_weights(w))
    b4 = b.repeat(4)
    lay = ref.layout(x, (1, 2, 2))
    buf, amax = ops.quantize_activation(x, (1, 2, 2))
    out = torch.empty((lay.n, cout, lay.t, 2 * lay.h, 2 * lay.w), memory_format=torch.channels_last_3d)
    ops.launch_conv(buf, amax, w_q, w_s, b4, out, lay, use_tma=use_tma, up2x=True)
    _check_conv(out, x, w_q, w_s, b4, (1, 2, 2), up2x=True)
    if not use_tma and persistent == "off":
        for dtype in (torch.float32, torch.bfloat16):
            y = ops.conv3d_fp8(x.to(dtype), w_q, w_s, b4, (1, 2, 2), up2x=True)
            assert y.dtype == dtype and y.shape == (lay.n, cout, lay.t, 2 * lay.h, 2 * lay.w)
            _check_conv(y, x.to(dtype), w_q, w_s, b4, (1, 2, 2), up2x=True)
        with pytest.raises(ValueError, match="phase kernels"):
            ops.conv3d_fp8(x, *ref.quantize_weight(w), b, (1, 3, 3), up2x=True)


def test_up2x_module_tracks_the_upsampled_conv():
    """FP8CausalConv3d.from_conv of a NearestUp2xConv (eager and compiled) against the float64 upsample + 3x3
    conv: E4M3 error only (relative RMS ~2-3% per conv, as the other convs)."""
    from megatron_longlive.quant.fp8_conv.module import FP8CausalConv3d

    torch.manual_seed(0)
    conv = NearestUp2xConv(32, 24, 2)
    x = torch.randn(1, 32, 2, 6, 5)
    want = torch.nn.functional.conv3d(torch.nn.functional.interpolate(x.double(), scale_factor=(1, 2, 2)),
                                      conv.weight.double(), conv.bias.double(), padding=(0, 1, 1))
    m = FP8CausalConv3d.from_conv(conv)
    assert m.up2x and m.kernel == (1, 2, 2) and m.weight_q.shape == (96, 4 * 32)
    y = m(x)
    rel = ((y.double() - want).pow(2).mean() / want.pow(2).mean()).sqrt().item()
    assert y.shape == want.shape and 0 < rel < 0.06, rel
    torch._dynamo.reset()
    assert torch.equal(torch.compile(m, fullgraph=True)(x), y)


def test_weight_quantizer_layout():
    w, _ = _weights(6, 20, (3, 3, 3), 5)
    w_q, w_s = ref.quantize_weight(w)
    assert w_q.shape == (6, 27 * 32) and w_q.dtype == torch.float8_e4m3fn and w_s.shape == (6,)
    assert torch.equal(w_s[1], torch.tensor(1.0)) and w_q[1].float().abs().sum() == 0
    codes = w_q.float().view(6, 3, 3, 3, 32)
    assert torch.all(codes[..., 20:] == 0) and torch.all(codes.abs().amax((1, 2, 3, 4))[torch.arange(6) != 1] == 448)
    # the K-major order is (dt, dh, dw, c): code [o, dt, dh, dw, c] == quantized w[o, c, dt, dh, dw]
    want = ref.to_e4m3(w.permute(0, 2, 3, 4, 1) / w_s.view(-1, 1, 1, 1, 1)).float()
    assert torch.equal(codes[..., :20], want)


def test_fake_impl_shapes_and_strides_and_compile_trace():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w_q, w_s = ref.quantize_weight(torch.randn(12, 20, 3, 3, 3))
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 20, 5, 4, 6, dtype=torch.bfloat16))
        y = torch.ops.megatron_longlive.fp8_conv3d(x, mode.from_tensor(w_q), mode.from_tensor(w_s), None, 3, 3, 3)
        assert y.shape == (2, 12, 3, 4, 6) and y.dtype == torch.bfloat16
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 20, 4, 3, 5)
    eager = ops.conv3d_fp8(x, w_q, w_s, None, (3, 3, 3))
    fn = torch.compile(lambda t: ops.conv3d_fp8(t, w_q, w_s, None, (3, 3, 3)) * 2.0, backend="aot_eager",
                       fullgraph=True)
    assert torch.equal(fn(x), eager * 2.0)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kernel,shape,cout", CASES[:4])
def test_torch_quantizer_equals_reference(kernel, shape, cout, static):
    """The compiled path's quantizer (torch ops, fused by Inductor) writes the reference's buffer byte for byte,
    from fp32 and bf16 inputs, in any input layout."""
    for dtype in (torch.float32, torch.bfloat16):
        x = _data(shape, 3).to(dtype)
        bound = torch.tensor(0.5 * x.abs().max().item()) if static else None       # half the values saturate
        want, want_scale = ref.quantize_activation(x, kernel, bound)
        for inp in (x, x.contiguous(memory_format=torch.channels_last_3d)):
            got, amax = ops.quantize_activation_torch(inp, kernel, bound)
            assert _bytes_differ(got, want) == 0
            assert torch.equal(ref.act_scale(amax)[0], want_scale)


@pytest.mark.parametrize("static", [False, True])
def test_compiled_conv_quantizes_in_the_graph(static):
    """Under torch.compile the quantization is part of the traced graph (so Inductor fuses it into the producing
    kernel: on the H100 the separate quantize pass cost 31 ms of a 718 ms Wan2.2 chunk) and the GEMM op gets the
    buffer; the output equals the eager op's, bitwise (same codes, same GEMM kernel)."""
    from torch._dynamo.backends.common import aot_autograd

    w_q, w_s = ref.quantize_weight(torch.randn(12, 20, 3, 3, 3))
    bias = torch.randn(12)
    bound = torch.tensor(2.5) if static else None
    x = torch.randn(1, 20, 4, 3, 5)                                  # contiguous NCDHW, not channels-last
    fn = lambda t: ops.conv3d_fp8(torch.nn.functional.silu(t) * 2.0, w_q, w_s, bias, (3, 3, 3), bound)  # noqa: E731
    targets = []

    def capture(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    eager = fn(x)
    assert torch.equal(torch.compile(fn, backend=aot_autograd(fw_compiler=capture), fullgraph=True)(x), eager)
    assert torch.ops.megatron_longlive.fp8_conv3d_buffer.default in targets
    assert torch.ops.megatron_longlive.fp8_conv3d.default not in targets
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)(x)                  # through Inductor (CPU C++ codegen)
    assert torch.equal(compiled, eager) and compiled.is_contiguous(memory_format=torch.channels_last_3d)


_GUARD_PAGE_SCRIPT = r"""
import ctypes, mmap, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from megatron_longlive.quant.fp8_conv import ops, reference as ref

n, t, h, w, c = 1, 1, 5, 7, 16                           # rows 10 + 63 < one 128-row block: a partial last block
nbytes = n * t * h * w * c * 4
page = mmap.PAGESIZE
size = (nbytes // page + 2) * page
mm = mmap.mmap(-1, size)
base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.mprotect(ctypes.c_void_p(base + size - page), page, 0) == 0, ctypes.get_errno()   # PROT_NONE
flat = torch.frombuffer(mm, dtype=torch.float32, count=nbytes // 4, offset=size - page - nbytes)
flat.copy_(torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(0)))
x = flat.view(n, t, h, w, c).permute(0, 4, 1, 2, 3)      # channels_last_3d, ends at the guard page
assert x.is_contiguous(memory_format=torch.channels_last_3d)
buf, _ = ops.quantize_activation(x, (1, 3, 3))
want, _ = ref.quantize_activation(x.clone(), (1, 3, 3))
assert torch.equal(buf.view(torch.uint8), want.view(torch.uint8))
print("ok")
"""


def test_quantizer_reads_nothing_past_the_input():
    """The input ends at a PROT_NONE page: a load past its end (the last row block's tail) kills the process.
    (On the GPU the same overread was an illegal memory access inside the CUDA-graphed decoder.)"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _GUARD_PAGE_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-2000:])
