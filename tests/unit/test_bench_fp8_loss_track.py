"""bench/bench_fp8_loss_track.py on the tiny model on CPU (a smoke run of the GPU benchmark): every variant trains
from the same seeded start, the series and the smoothed-gap rows are recorded, and the gap is the one defined."""
from __future__ import annotations

import json
import math

import pytest

from bench import bench_fp8_loss_track as track

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gaps_are_relative_differences_of_trailing_means():
    curve, ref = [2.0, 1.0, 3.0], [1.0, 1.0, 2.0]
    # trailing means over 2: curve 2.0, 1.5, 2.0; ref 1.0, 1.0, 1.5
    worst, end = track.gaps(curve, ref, window=2)
    assert math.isclose(worst, 1.0) and math.isclose(end, 0.5 / 1.5)


def test_cpu_smoke_records_series_and_gaps(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert track.main(["--device", "cpu", "--preset", "tiny", "--layers", "1", "--latent-frames", "3", "--height",
                       "32", "--width", "32", "--steps", "3", "--window", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out)]
    series = {r["name"].rsplit(" ", 1)[1]: r["losses"] for r in rows if r["metric"] == "loss series"}
    assert set(series) == {"bf16", "fp8_channel", "fp8_channel_fast"}
    assert all(len(s) == 3 and all(math.isfinite(v) for v in s) for s in series.values())
    gaps = {r["name"].split(" 3 steps lr 0.0001 ")[1]: r for r in rows if r["metric"].startswith("smoothed loss")}
    assert set(gaps) == {"fp8_channel vs bf16", "fp8_channel_fast vs bf16", "fp8_channel_fast vs fp8_channel"}
    for key, r in gaps.items():
        variant, ref = key.split(" vs ")
        assert math.isclose(r["value"], round(track.gaps(series[variant], series[ref], 2)[0], 6), abs_tol=1e-6)
    # CPU GEMMs are emulated (fp32 matmuls of the decoded operands): the fast-accumulator flag changes nothing here
    assert series["fp8_channel_fast"] == series["fp8_channel"]
    assert series["fp8_channel"] != series["bf16"]          # the FP8 variant did quantize
    assert "gap max" in capsys.readouterr().out


def test_cpu_smoke_compiled_variant_tracks_its_eager_self(tmp_path):
    """A `+compiled` variant (train.compile_elementwise=on) runs and is compared with bf16; on the CPU Inductor keeps
    eager's roundings, so the tiny fp32 curves agree to float32 reduction noise."""
    from megatron_longlive.models import compiled_ops

    out = tmp_path / "r.jsonl"
    try:
        assert track.main(["--device", "cpu", "--preset", "tiny", "--layers", "1", "--latent-frames", "3", "--height",
                           "32", "--width", "32", "--steps", "2", "--window", "1", "--quant", "bf16", "bf16+compiled",
                           "--out", str(out)]) == 0
    finally:
        compiled_ops.enable(False)
    rows = [json.loads(line) for line in open(out)]
    gap = [r for r in rows if r["name"].endswith("bf16+compiled vs bf16")]
    assert len(gap) == 1 and gap[0]["value"] < 1e-4, gap
