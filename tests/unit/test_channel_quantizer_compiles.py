"""The FP8 channel quantizer's launch configs, compiled for an H100 (sm_90a) on this CPU machine (Triton's own LLVM
and ptxas, bench/kernel_report.py): none spills registers to local memory and every code store is vectorized (a
one-byte store per value, or spills, cost the quantizer half its bandwidth: registers and stores decide its speed),
and the GELU ops evaluate one exp2 per value (not a second time for the transposed codes).
"""
from __future__ import annotations

import os

import pytest

from bench.kernel_report import ptxas_path
from process_helpers import compile_report

pytestmark = pytest.mark.skipif(not os.path.exists(ptxas_path()), reason="this Triton wheel ships no ptxas")


def test_every_channel_quantizer_config_compiles_spill_free_with_vector_stores():
    from megatron_longlive.quant.fp8_channel_triton import CONFIGS

    reports = compile_report("import json; from bench.kernel_report import channel_quantizer_reports; "
                             "print(json.dumps([dict(config=c, op=op, col_sum=s, **r) "
                             "for c, op, s, r in channel_quantizer_reports()]))", timeout=600)
    assert len(reports) == 4 * len(CONFIGS)
    for r in reports:
        where = f"config {r['config']}, op {r['op']}, col_sum {r['col_sum']}: {r}"
        assert r["registers"] > 0, where
        assert r["spill_bytes"] == 0, where
        narrow = {k: n for k, n in r["global_ops"].items() if k.startswith("st.global") and
                  any(w in k for w in ("b8", "u8", "b16", "u16"))}
        assert not narrow, where
        assert any(k.startswith("st.global.v4") for k in r["global_ops"]), where
        if r["op"] != "identity":     # the GELU (or its derivative) once per value, not again for the transposed codes
            per_thread = r["config"]["BM"] * r["config"]["BK"] / (32 * r["config"]["num_warps"])
            assert r["ex2"] == per_thread, f"{r['ex2'] / per_thread} exp2 per value: {where}"
        if r["config"]["NUM_STAGES"] > 1:
            assert r["cp_async"] > 0, f"the row tiles are not prefetched: {where}"
