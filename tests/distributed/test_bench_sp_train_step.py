"""bench/bench_sp_train_step.py on 2 gloo ranks (tiny model, BF16 and FP8 linears): step time, peak memory and the
all-to-all share of a profiled step are recorded; the share is found (> 0: the profiler saw the Ulysses
all-to-alls) and below 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("quant", ["bf16", "fp8"])
def test_sp_train_step_bench_records_the_all_to_all_share(tmp_path, quant):
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "bench/bench_sp_train_step.py",
           "--preset", "tiny", "--latent-frames", "4", "--height", "64", "--width", "64", "--chunk-frames", "1",
           "--warmup", "1", "--steps", "2", "--quant", quant, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["metric"]: r for r in map(json.loads, open(out))}
    assert set(rows) == {"step_time", "peak_memory_max", "all_to_all_share"}, rows
    share = rows["all_to_all_share"]
    assert 0 < share["value"] < 1 and len(share["per_rank_share"]) == 2, share
    assert all(ms > 0 for ms in share["per_rank_all_to_all_ms"]), share
    assert ("linear fp8" in share["name"]) == (quant == "fp8"), share["name"]
