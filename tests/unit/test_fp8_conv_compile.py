"""The FP8 conv kernels compile for Hopper (sm90) without a GPU, in every autotune config (tiled and persistent,
plus the 2x-upsampling form), TMA and pointer loads, on E4M3 x E4M3 wgmma; the quantizer compiles to the hardware nearest-even E4M3 cast with one IEEE division.

Runs in a subprocess without TRITON_INTERPRET (CPU test sessions set it in-process)."""
from __future__ import annotations

import pytest
from process_helpers import compile_report

SCRIPT = r"""
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_longlive.quant.fp8_conv.conv_triton import CONFIGS, PERSISTENT_CONFIGS, conv_kernel as fn
runs = [(c, False, False) for c in CONFIGS] + [(c, True, False) for c in PERSISTENT_CONFIGS] + [(CONFIGS[0], False, True)]
out_configs = len(runs)
from megatron_longlive.quant.fp8_conv import quantize_triton as Q
target = GPUTarget("cuda", 90, 32)
out = {}
ptrs = {"a_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "amax_ptr": "*i32", "ws_ptr": "*fp32", "bias_ptr": "*fp32",
        "out_ptr": "*bf16"}
constexprs = {p.name for p in fn.params if p.is_constexpr}     # from the kernel itself, so new flags stay constant
sig = {n: ptrs.get(n, "constexpr" if n in constexprs else "i32") for n in fn.arg_names}
for (m, n, k, s, w), persistent, up2x in runs:
    for tma in (True, False):
        const = dict(HAS_BIAS=True, USE_TMA=tma, INTERPRET=False, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k,
                     NUM_PROGRAMS=132, PERSISTENT=persistent, UP2X=up2x)
        assert set(const) == constexprs, sorted(constexprs ^ set(const))
        kk = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=target,
                            options=dict(num_warps=w, num_stages=s))
        ptx = kk.asm["ptx"]
        out[f"conv {m}x{n}x{k} s{s} w{w}{' persistent' if persistent else ''}{' up2x' if up2x else ''}"
            f"{' tma' if tma else ''}"] = {
            "cubin": "cubin" in kk.asm, "mma": sorted(set(re.findall(r"wgmma\.mma_async[a-z0-9._]*", ptx))),
            "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)), "shared": kk.metadata.shared}
quant_sig = dict({n: "i32" for n in Q._quantize_kernel.arg_names}, x_ptr="*bf16", amax_ptr="*i32", buf_ptr="*u8",
                 BR="constexpr", BC="constexpr", HW_CAST="constexpr")
for name, qfn, qsig, qc in [
        ("amax", Q._amax_kernel, {"x_ptr": "*bf16", "amax_ptr": "*i32", "numel": "i64", "BLOCK": "constexpr",
                                  "ITERS": "constexpr"}, {"BLOCK": 4096, "ITERS": 8}),
        ("quant", Q._quantize_kernel, quant_sig, {"BR": 64, "BC": 128, "HW_CAST": True})]:
    kk = triton.compile(ASTSource(fn=qfn, signature=qsig, constexprs=qc), target=target, options=dict(num_warps=4))
    ptx = kk.asm["ptx"]
    out[name] = {"cubin": "cubin" in kk.asm, "div_rn": len(re.findall(r"div\.rn\.f32", ptx)),
                 "div_approx": len(re.findall(r"div\.(?:approx|full)", ptx)),
                 "e4m3_cvt": len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx)),
                 "atom": len(re.findall(r"atom\.", ptx))}
out["n_configs"] = out_configs
print(json.dumps(out))
"""


@pytest.mark.slow
def test_fp8_conv_compiles_for_sm90_on_fp8_tensor_cores():
    out = compile_report(SCRIPT, timeout=900)
    amax, quant = out.pop("amax"), out.pop("quant")
    assert amax["cubin"] and amax["atom"] == 1, amax
    assert quant["cubin"] and quant["div_rn"] == 1 and quant["div_approx"] == 0 and quant["e4m3_cvt"] > 0, quant
    n_configs = out.pop("n_configs")
    assert n_configs >= 6 and len(out) == 2 * n_configs
    for name, info in out.items():
        assert info["cubin"] and info["mma"] and all(m.endswith(".f32.e4m3.e4m3") for m in info["mma"]), (name, info)
        assert (info["tma"] > 0) == name.endswith("tma"), (name, info)
        assert info["shared"] <= 227 * 1024, (name, info)
