"""What a Triton kernel compiles to on a Hopper GPU, from a machine without one: registers, spills, memory ops.

Triton ships LLVM and NVIDIA's ptxas, so a kernel compiles for sm_90a on any machine: this reports, per launch
config, the registers per thread and the bytes spilled to local memory (ptxas -v), and the global loads/stores by
width, the shared-memory traffic and the E4M3 conversions / exp2s per value in the PTX (static counts). A
memory-bound kernel that spills, stores single bytes or holds 200+ registers per thread (few warps per SM to
hide DRAM latency) runs far below copy bandwidth; this finds that before a GPU is lent. Integer arguments and pointers are compiled as the launcher specializes them when divisible
by 16 (vector accesses).

  python bench/kernel_report.py                  # every launch config of the FP8 channel quantizer, every op
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ptxas_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_report(fn, signature: dict, constexprs: dict, num_warps: int, aligned: tuple[int, ...] = (),
                   arch: int = 90) -> dict:
    """Compile `fn` (a triton.jit function) for sm_{arch}a; signature: arg name -> type ("*bf16", "i32", or
    "constexpr"), constexprs: their values; aligned: indices of the arguments divisible by 16. Returns registers,
    spill_bytes, the global memory ops by PTX form and the shared-memory op count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas_path(), "--gpu-name", f"sm_{arch}a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    mem: dict[str, int] = {}
    for m in re.finditer(r"\b((?:ld|st)\.global(?:\.[a-z0-9]+)*)", ptx):
        mem[m.group(1)] = mem.get(m.group(1), 0) + 1
    return {"registers": int(regs.group(1)) if regs else -1, "spill_bytes": int(spills.group(1)) if spills else 0,
            "global_ops": mem, "shared_ops": len(re.findall(r"\b(?:ld|st)\.shared", ptx)),
            "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
            # per-value work as compiled: E4M3 conversions and exp2s (a count above the tile's values per thread means
            # the compiler recomputed the chain in a second layout instead of moving its result through shared memory)
            "e4m3_cvt": len(re.findall(r"cvt\.rn\.satfinite\.e4m3x2", ptx)), "ex2": len(re.findall(r"\bex2\.", ptx))}


CHANNEL_SIGNATURE = {"x_ptr": "*bf16", "h_ptr": "*bf16", "inv_ptr": "*fp32", "q_ptr": "*u8", "qt_ptr": "*u8",
                     "amax_ptr": "*i32", "sum_ptr": "*fp32", "M": "i32", "K": "i32", "MP": "i32", "M_KEY": "i32",
                     "Q_STRIDE": "i32"}
CHANNEL_ALIGNED = (0, 1, 2, 3, 4, 5, 6, 8, 9, 11)  # pointers, K, MP and q's row stride (multiples of 16 in every model)
CHANNEL_OPS = (("identity", False), ("identity", True), ("gelu", False), ("gelu_backward", True))


def channel_quantizer_reports(configs=None):
    """(config, op, col_sum, report) for every channel quantizer launch config (fp8_channel_triton.CONFIGS)."""
    from megatron_longlive.quant import fp8_channel_triton as k

    for c in configs or k.CONFIGS:
        meta = k._launch_meta(c)
        sig = dict(CHANNEL_SIGNATURE, **{name: "constexpr" for name in
                                         ("BM", "BK", "ROW_TILES", "COL_SUM", "HW_CAST", "OP",
                                          "NUM_STAGES", "STORES", "TILE_STATS", "PIN_CODES")})
        for op, col_sum in CHANNEL_OPS:
            consts = dict(meta, COL_SUM=col_sum, HW_CAST=True, OP=k.OPS[op], STORES=3, TILE_STATS=False, PIN_CODES=True)
            yield c, op, col_sum, compile_report(k._channel_quantize_kernel, sig, consts, c["num_warps"],
                                                 CHANNEL_ALIGNED)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="one JSON object per config and op instead of the table")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_report: unset TRITON_INTERPRET (interpreted kernels do not compile)", file=sys.stderr)
        return 2
    if a.json:
        import json

        for c, op, col_sum, r in channel_quantizer_reports():
            print(json.dumps(dict(config=c, op=op, col_sum=col_sum, **r)))
        return 0
    print(f"{'config':>26} {'op':>14} {'sum':>4} {'regs':>5} {'spill B':>8} {'cp.async':>8} {'shared':>7} "
          f"{'cvt/val':>7} {'ex2/val':>7}  global")
    for c, op, col_sum, r in channel_quantizer_reports():
        label = f"{c['BM']}x{c['BK']} w{c['num_warps']} s{c['NUM_STAGES']}"
        per_thread = c["BM"] * c["BK"] / (32 * c["num_warps"])      # tile values per thread and row tile
        print(f"{label:>26} {op:>14} {'y' if col_sum else 'n':>4} {r['registers']:5d} {r['spill_bytes']:8d} "
              f"{r['cp_async']:8d} {r['shared_ops']:7d} {r['e4m3_cvt'] / per_thread:7.2f} {r['ex2'] / per_thread:7.2f}"
              f"  {r['global_ops']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
