"""bench/bench_fp8_qkv.py runs end to end on the CPU (emulated FP8, tiny shape) and records every variant."""
from __future__ import annotations

import json


def test_bench_fp8_qkv_smoke(tmp_path):
    from bench.bench_fp8_qkv import main

    out = tmp_path / "r.jsonl"
    assert main(["--device", "cpu", "--dim", "32", "--tokens", "40", "--iters", "1", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    names = {r["name"] for r in rows}
    assert len(rows) == 7 and any("one GEMM" in n for n in names) and any("separate" in n for n in names)
    assert any("bf16 one linear" in n for n in names)
    assert all(r["value"] > 0 for r in rows)
