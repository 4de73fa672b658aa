"""The window attention kernel compiles for Hopper (sm90) without a GPU in every mode and autotune config, on the
intended tensor cores (TMA configs included): bf16 and nvfp4 -> bf16 wgmma, fp8 -> E4M3 x E4M3 wgmma for both QK^T and PV; the fused FP8
quantizer compiles with IEEE divisions (div.rn, what makes it bitwise the torch quantizer) and the hardware E4M3 cast.

Runs in a subprocess without TRITON_INTERPRET (CPU test sessions set it in-process)."""
from __future__ import annotations

import pytest
from process_helpers import compile_report

SCRIPT = r"""
import collections, json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_longlive.inference.kernels.window_attention_triton import CONFIGS, MODES, window_attention_kernel as fn
out = {}
for mode in MODES:
    kv = {"bf16": "*bf16", "fp8": "*fp8e4nv", "nvfp4": "*u8"}[mode]
    scales = "*fp8e4nv" if mode == "nvfp4" else "*fp32"
    ptrs = {"q_ptr": "*fp8e4nv" if mode == "fp8" else "*bf16", "k_ptr": kv, "v_ptr": kv, "valid_ptr": "*i32",
            "out_ptr": "*bf16", "ks_ptr": scales, "vs_ptr": scales}
    sig = {n: (ptrs.get(n, "*fp32") if n.endswith("_ptr") else "fp32" if n == "qk_scale"
               else "constexpr" if n.isupper() and n != "H" else "i32") for n in fn.arg_names}
    for i, (bm, bn, warps, stages, tma) in enumerate(CONFIGS):
        if tma and mode == "nvfp4":
            continue                              # packed codes are read through pointers only
        for skip in ((False, True) if i in (0, len(CONFIGS) - 1) else (False,)):
            const = dict(D=128, MODE=MODES[mode], SKIP_INVALID=skip, P_SCALE=256.0, INTERPRET=False,
                         BLOCK_M=bm, BLOCK_N=bn, USE_TMA=tma)
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=warps, num_stages=stages))
            mma = sorted(set(re.findall(r"wgmma\.mma_async[a-z0-9._]*", k.asm["ptx"])))
            out[f"{mode} {bm}x{bn} w{warps} s{stages}{' tma' if tma else ''}{' skip' if skip else ''}"] = {
                "cubin": "cubin" in k.asm, "mma": mma, "shared": k.metadata.shared}
from megatron_longlive.inference.kernels import fp8_window_quant_triton as Q
quant = {"rows": (Q._quantize_rows_kernel, {"x_ptr": "*bf16", "sub_ptr": "*fp32", "out_ptr": "*fp8e4nv",
                   "scale_ptr": "*fp32", "rows_per_b": "i32", "H": "i32", "sxb": "i32", "sob": "i32", "D": "constexpr",
                   "BLOCK_R": "constexpr", "HAS_SUB": "constexpr", "INTERPRET": "constexpr"},
                  {"D": 128, "BLOCK_R": 64, "HAS_SUB": True, "INTERPRET": False}),
         "v": (Q._quantize_v_kernel, {"v_ptr": "*bf16", "scale_ptr": "*fp32", "out_ptr": "*fp8e4nv", "S": "i32",
                "H": "i32", "svb": "i32", "svs": "i32", "svh": "i32", "D": "constexpr", "BLOCK_S": "constexpr",
                "INTERPRET": "constexpr"}, {"D": 128, "BLOCK_S": 64, "INTERPRET": False})}
for name, (qfn, qsig, qconst) in quant.items():
    k = triton.compile(ASTSource(fn=qfn, signature=qsig, constexprs=qconst), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4))
    ptx = k.asm["ptx"]
    out["quant " + name] = {"cubin": "cubin" in k.asm, "div_rn": len(re.findall(r"div\.rn\.f32", ptx)),
                            "div_approx": len(re.findall(r"div\.(?:approx|full)", ptx)),
                            "e4m3_cvt": len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32", ptx))}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_window_attention_compiles_for_sm90_on_the_right_tensor_cores():
    out = compile_report(SCRIPT, timeout=900)
    assert len(out) == 2 * (7 + 2) + (3 + 1) + 2          # bf16, fp8: 7 configs + 2 skip variants; nvfp4: 3 + 1
    for name in ("quant rows", "quant v"):        # the fused quantizer: IEEE divisions, hardware nearest-even cast
        info = out.pop(name)
        assert info["cubin"] and info["div_rn"] > 0 and info["div_approx"] == 0 and info["e4m3_cvt"] > 0, (name, info)
    for name, info in out.items():
        assert info["cubin"] and info["mma"], name
        want = ".e4m3.e4m3" if name.startswith("fp8") else ".bf16.bf16"
        assert all(m.endswith(want) for m in info["mma"]), (name, info["mma"])
