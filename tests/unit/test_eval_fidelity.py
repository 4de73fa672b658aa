"""Fidelity comparisons between runs, the report files, and `longlive eval` end to end on real mp4 files."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from megatron_longlive.cli.main import main
from megatron_longlive.eval import testvideos as tv
from megatron_longlive.eval.fidelity import compare_runs, load_run
from megatron_longlive.eval.video_io import parse_shots
from megatron_longlive.inference.video_writer import Mp4Writer


def write(path, frames, crf=0):
    with Mp4Writer(path, fps=8, crf=crf) as w:
        w.write(tv.to_uint8(frames))
    return str(path)


@pytest.fixture
def runs(tmp_path):
    ref = tv.translating(10, 1, 0, 32, 32)
    noisy = np.clip(ref + np.random.default_rng(0).normal(0, 0.02, ref.shape), 0, 1)
    paths = {"bf16": write(tmp_path / "bf16.mp4", ref), "same": write(tmp_path / "same.mp4", ref),
             "nvfp4": write(tmp_path / "nvfp4.mp4", noisy)}
    z = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # [C, T, h, w]
    torch.save(z, tmp_path / "bf16.pt")
    torch.save(z, tmp_path / "same.pt")
    torch.save(z + 0.1, tmp_path / "nvfp4.pt")
    return tmp_path, paths


def test_identical_runs_infinite_psnr_unit_ssim_zero_latent_mse(runs):
    tmp, paths = runs
    ref = load_run("bf16", paths["bf16"], str(tmp / "bf16.pt"))
    same = load_run("same", paths["same"], str(tmp / "same.pt"))
    noisy = load_run("nvfp4", paths["nvfp4"], str(tmp / "nvfp4.pt"))
    rows, details = compare_runs(ref, [same, noisy], use_lpips=False)
    assert rows[0]["psnr"] == math.inf and rows[0]["psnr_min"] == math.inf
    assert rows[0]["ssim"] == pytest.approx(1.0, abs=1e-12) and rows[0]["latent_mse"] == 0.0
    assert 25 < rows[1]["psnr"] < 45 and rows[1]["ssim"] < 0.99
    assert rows[1]["latent_mse"] == pytest.approx(0.01, rel=1e-5)
    assert len(details["nvfp4"][0].series) == 10  # per-frame PSNR


def test_mismatched_runs_name_both_files(tmp_path, runs):
    _, paths = runs
    short = write(tmp_path / "short.mp4", tv.translating(8, 1, 0, 32, 32))
    wide = write(tmp_path / "wide.mp4", tv.translating(10, 1, 0, 32, 48))
    ref = load_run("bf16", paths["bf16"])
    with pytest.raises(ValueError, match=r"short\.mp4 has 8 frames but the reference .*bf16\.mp4 has 10"):
        compare_runs(ref, [load_run("short", short)])
    with pytest.raises(ValueError, match=r"wide\.mp4 is 48x32 but the reference .*bf16\.mp4 is 32x32"):
        compare_runs(ref, [load_run("wide", wide)])
    torch.save(torch.zeros(16, 2, 4, 4), tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"short\.pt has latents .* but the reference .*bf16\.pt"):
        compare_runs(load_run("r", latents=str(runs[0] / "bf16.pt")),
                     [load_run("s", latents=str(tmp_path / "short.pt"))])


def test_cli_fidelity_report(runs, capsys):
    tmp, paths = runs
    out = tmp / "report"
    rc = main(["eval", paths["same"], paths["nvfp4"], "--reference", paths["bf16"], "--shots", "0,5",
               "--metrics", "flicker,drift,motion,shot_consistency,subject_consistency", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert re.search(r"\| same \| inf \| inf \| 1(\.0+)? \| 1(\.0+)? \|", printed)  # the table on stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["reference"] == "bf16"
    same, nv = rep["fidelity"]
    assert same["run"] == "same" and same["psnr"] == "inf" and nv["psnr"] < 60
    assert set(rep["videos"]) == {"same", "nvfp4", "bf16"}
    m = rep["videos"]["bf16"]["metrics"]
    assert m["motion"]["stats"]["median_dx"] == pytest.approx(1.0, abs=0.15)
    assert m["subject_consistency"]["value"] is None and "--dino" in m["subject_consistency"]["skipped"]
    assert any(s["metric"] == "subject_consistency" for s in rep["skipped"])
    md = (out / "report.md").read_text()
    assert "## Fidelity vs reference `bf16`" in md and "| nvfp4 |" in md and "## Skipped" in md
    for name in ("flicker", "drift", "psnr", "ssim"):
        assert (out / f"{name}.png").stat().st_size > 1000


def test_cli_latent_only_inputs(runs):
    tmp, _ = runs
    out = tmp / "lat"
    assert main(["eval", str(tmp / "nvfp4.pt"), "--reference", str(tmp / "bf16.pt"), "--out", str(out),
                 "--no-plots"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["fidelity"][0]["latent_mse"] == pytest.approx(0.01, rel=1e-5)
    assert rep["videos"]["nvfp4"]["metrics"]["latent_drift"]["value"] > 0
    assert "no decoded video" in rep["videos"]["nvfp4"]["metrics"]["flicker"]["skipped"]


def test_cli_bad_inputs_exit_2_with_reason(tmp_path, runs, capsys):
    _, paths = runs
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00garbage" * 64)
    assert main(["eval", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "broken.mp4: not a readable video" in capsys.readouterr().err
    short = write(tmp_path / "short.mp4", tv.translating(8, 1, 0, 32, 32))
    assert main(["eval", short, "--reference", paths["bf16"], "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "short.mp4" in err and "bf16.mp4" in err
    assert main(["eval", short, "--metrics", "sparkle", "--out", str(tmp_path / "o")]) == 2
    assert "unknown metrics ['sparkle']" in capsys.readouterr().err


def test_parse_shots(tmp_path):
    assert parse_shots("0, 33,17") == [0, 17, 33]
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "video_0000.mp4", "shots": [{"start_frame": 0}, {"start_frame": 5}]}) + "\n" +
        json.dumps({"path": "video_0001.mp4", "shots": [{"start_frame": 0}, {"start_frame": 9}]}) + "\n")
    assert parse_shots(str(tmp_path / "m.jsonl"), "out/video_0001.mp4") == [0, 9]
    with pytest.raises(ValueError, match="no manifest line"):
        parse_shots(str(tmp_path / "m.jsonl"), "other.mp4")
    (tmp_path / "s.json").write_text("[0, 4, 8]")
    assert parse_shots(str(tmp_path / "s.json")) == [0, 4, 8]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_shots("first,second")


def test_cli_videos_with_aligned_latents(runs, capsys):
    tmp, paths = runs
    out = tmp / "both"
    assert main(["eval", paths["nvfp4"], "--latents", str(tmp / "nvfp4.pt"), "--reference", paths["bf16"],
                 "--reference-latents", str(tmp / "bf16.pt"), "--labels", "q", "--metrics", "latent_drift",
                 "--out", str(out), "--no-plots", "--no-lpips"]) == 0
    rep = json.loads((out / "report.json").read_text())
    row = rep["fidelity"][0]
    assert row["run"] == "q" and row["latent_mse"] == pytest.approx(0.01, rel=1e-5) and row["psnr"] < 60
    assert rep["videos"]["q"]["sources"]["latents"].endswith("nvfp4.pt")
    assert len(rep["videos"]["q"]["metrics"]["latent_drift"]["series"]) == 3  # T of the [C=16, T=3, 4, 4] dump
    assert main(["eval", paths["nvfp4"], "--latents", "a.pt", "b.pt", "--out", str(out)]) == 2
    assert "--latents has 2 files for 1 inputs" in capsys.readouterr().err
