"""`longlive bench NAME ...` runs the repository's benchmark script with the given arguments (a real process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_generate_tiny_records_results(tmp_path):
    out = tmp_path / "results.jsonl"
    r = subprocess.run([sys.executable, "-m", "megatron_longlive.cli.main", "bench", "generate", "--settings", "tiny",
                        "--chunks", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    names = {row["name"] for row in rows}
    assert "tiny 64px 4-step dit fps (eager, linear bf16, kv bf16)" in names, names
    fps = next(row for row in rows if row["metric"] == "fps")
    assert fps["value"] > 0 and fps["unit"] == "frames/s" and fps["command"].startswith("python ")


def test_bench_script_error_exit_code_passes_through():
    r = subprocess.run([sys.executable, "-m", "megatron_longlive.cli.main", "bench", "generate", "--settings", "nope"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "invalid choice" in r.stderr
