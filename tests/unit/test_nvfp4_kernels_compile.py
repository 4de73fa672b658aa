"""The Triton NVFP4 kernels (and the fused FP8 quantizer) compile for Hopper (sm90) without a GPU, and the PTX keeps IEEE rounding.

Runs in a subprocess without TRITON_INTERPRET (the interpreter test module sets it for this process).
Bitwise equality with the reference on CPU holds only if the GPU code does the same IEEE operations:
divisions must be div.rn (never div.approx / div.full), and no flush-to-zero arithmetic may touch values.
"""
from __future__ import annotations

from process_helpers import compile_report

SCRIPT = r"""
import json, re, collections, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_longlive.quant.nvfp4.kernels import quantize_triton as Q, dequantize_triton as D
from megatron_longlive.quant import fp8_triton as F8, fp8_channel_triton as FC
tgt = GPUTarget("cuda", 90, 32)
sigs = {
  "q": (Q.quantize_1x16_kernel, {"xw_ptr": "*i32", "signs_ptr": "*fp32", "randw_ptr": "*i64", "amax_ptr": "*fp32",
        "packed_ptr": "*u8", "scales_ptr": "*u8", "ts_ptr": "*fp32", "seed": "i32", "NW": "i32",
        "X_FP32": "constexpr", "USE_RHT": "constexpr", "SR": "constexpr", "EMULATE_FMA": "constexpr", "NB": "constexpr"},
        {"X_FP32": False, "USE_RHT": True, "SR": 2, "EMULATE_FMA": False, "NB": 256}),
  "amax": (Q.amax_kernel, {"xw_ptr": "*i32", "signs_ptr": "*fp32", "amax_ptr": "*i32", "NW": "i32",
           "X_FP32": "constexpr", "USE_RHT": "constexpr", "NB": "constexpr"}, {"X_FP32": False, "USE_RHT": True, "NB": 64}),
  "q2d": (Q.quantize_16x16_kernel, {"xw_ptr": "*i32", "amax_ptr": "*fp32", "packed_ptr": "*u8", "scales_ptr": "*u8",
          "ts_ptr": "*fp32", "M": "i32", "KW": "i32", "X_FP32": "constexpr", "EMULATE_FMA": "constexpr",
          "BR": "constexpr", "BW": "constexpr"}, {"X_FP32": False, "EMULATE_FMA": False, "BR": 32, "BW": 128}),
  "dq": (D.dequantize_kernel, {"packed_ptr": "*u8", "scales_ptr": "*u8", "ts_ptr": "*fp32", "outw_ptr": "*i32",
         "M": "i32", "KW": "i32", "ROWS_PER_SCALE": "constexpr", "OUT_BF16": "constexpr", "BR": "constexpr",
         "BW": "constexpr"}, {"ROWS_PER_SCALE": 1, "OUT_BF16": True, "BR": 1, "BW": 4096}),
  "fp8stats": (F8._stats_kernel, {"x_ptr": "*bf16", "row_amax_ptr": "*i32", "col_amax_ptr": "*i32",
               "col_sum_ptr": "*fp32", "rfold_ptr": "*fp32", "cfold_ptr": "*fp32", "M": "i32", "K": "i32",
               "M_KEY": "i32", "BM": "constexpr", "BK": "constexpr", "ROW_TILES": "constexpr", "COL_SUM": "constexpr",
               "FOLD": "constexpr"},
               {"BM": F8.SBM, "BK": F8.SBK, "ROW_TILES": F8.ROW_TILES, "COL_SUM": True, "FOLD": True}),
}
for hw in (False, True):
    sigs["fp8q_hw" if hw else "fp8q"] = (
        F8._quantize_kernel, {"x_ptr": "*bf16", "row_amax_ptr": "*i32", "col_amax_ptr": "*i32",
        "qrow_ptr": "*u8", "qcol_ptr": "*u8", "srow_ptr": "*fp32", "scol_ptr": "*fp32", "rfold_ptr": "*fp32",
        "cfold_ptr": "*fp32", "M": "i32", "K": "i32", "MP": "i32", "M_KEY": "i32", "BM": "constexpr",
        "BK": "constexpr", "HW_CAST": "constexpr", "FOLD": "constexpr"},
        {"BM": F8.BM, "BK": F8.BK, "HW_CAST": hw, "FOLD": hw})
    sigs["fp8ch_hw" if hw else "fp8ch"] = (
        FC._channel_quantize_kernel, {"x_ptr": "*bf16", "h_ptr": "*bf16", "inv_ptr": "*fp32", "q_ptr": "*u8",
        "qt_ptr": "*u8", "amax_ptr": "*i32", "sum_ptr": "*fp32", "M": "i32", "K": "i32", "MP": "i32", "M_KEY": "i32",
        "Q_STRIDE": "i32", "BM": "constexpr", "BK": "constexpr", "ROW_TILES": "constexpr", "COL_SUM": "constexpr", "HW_CAST": "constexpr",
        "OP": "constexpr", "NUM_STAGES": "constexpr", "STORES": "constexpr",
        "TILE_STATS": "constexpr"},
        {**FC._launch_meta(FC.CONFIGS[-1]), "COL_SUM": True, "HW_CAST": hw, "OP": 0, "STORES": 3, "TILE_STATS": False})
    sigs["fp8ch_gelu_bwd_hw" if hw else "fp8ch_gelu"] = (sigs["fp8ch"][0], sigs["fp8ch"][1],
        {**sigs["fp8ch"][2], "HW_CAST": hw, "OP": FC.OPS["gelu_backward" if hw else "gelu"]})
sigs["fp8roll"] = (FC._roll_kernel, {"hist_ptr": "*fp32", "pending_ptr": "*i32", "scale_ptr": "*fp32",
                   "inv_ptr": "*fp32", "C": "i32", "cursor": "i32", "gain": "fp32", "LENGTH": "constexpr",
                   "BC": "constexpr"}, {"LENGTH": 16, "BC": 1024})
out = {}
for name, (fn, sig, const) in sigs.items():
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=tgt)
    ops = collections.Counter(re.findall(r"^\s*((?:div|rcp|mul|add|sub|fma|ex2|lg2)\.[a-z0-9.]+)", k.asm["ptx"], re.M))
    out[name] = {"ops": dict(ops), "cubin": "cubin" in k.asm,
                 "e4m3_cvt": len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32", k.asm["ptx"]))}
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_with_ieee_division():
    out = compile_report(SCRIPT, timeout=600)
    for name, info in out.items():
        assert info["cubin"], name
        if "gelu" in name:          # the fused GELU ops use exp and fast division on purpose (their tests bound it)
            continue
        ops = info["ops"]
        assert not [o for o in ops if o.startswith(("div.approx", "div.full", "rcp.approx", "ex2", "lg2"))], (name, ops)
        assert not [o for o in ops if ".ftz" in o and o.startswith(("div", "mul", "add", "sub", "fma"))], (name, ops)
    assert out["q"]["ops"].get("div.rn.f32", 0) > 0
    # x / scale: one div.rn per block and a fused Markstein correction per value (fma.rn, never mul + add)
    assert out["q"]["ops"].get("fma.rn.f32", 0) >= 4
    # the FP8 quantizer: hardware nearest-even E4M3 cast (saturating after the explicit clamp) only when asked
    assert out["fp8q_hw"]["e4m3_cvt"] > 0 and out["fp8q"]["e4m3_cvt"] == 0
    assert out["fp8ch_hw"]["e4m3_cvt"] > 0 and out["fp8ch"]["e4m3_cvt"] == 0
    # the amax roll's scales: IEEE divisions (amax / 448 and 448 / amax), as fp8.amax_scales computes them
    assert out["fp8roll"]["ops"].get("div.rn.f32", 0) >= 2
