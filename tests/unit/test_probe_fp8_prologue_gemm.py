"""bench/probe_fp8_prologue_gemm.py: its three Triton products (operands quantized in the GEMM prologue) equal
float64 math on the same E4M3 codes, and the fused channel amax equals torch's (interpreted on the CPU)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_probe_products_match_float64():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "probe_fp8_prologue_gemm.py"), "--check"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert '"amax_equal": true' in run.stdout
