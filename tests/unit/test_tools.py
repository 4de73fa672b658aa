"""tools/: latent-cache inspection/validation, loss-curve comparison, video contact sheets — on real artifacts.

The cache is made by the preprocess code from synthetic mp4s and then damaged on disk; the contact sheet is
checked pixel for pixel against PyAV's decode of a synthetic mp4; the run comparison reads hand-written
metrics.jsonl files whose smoothed values are known in closed form.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dataloaders.preprocess import PreprocessOptions, preprocess
from dataloaders.synthetic import generate_dataset, read_manifest
from dataloaders.zarr_cache import CacheReader
from megatron_longlive.config import DataConfig, load_config
from megatron_longlive.inference.video_writer import read_mp4
from tools import cache_inspect, compare_runs, contact_sheet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = ("cache_inspect", "compare_runs", "contact_sheet")


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", f"tools.{name}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


# ----- command lines -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOOLS)
def test_tool_help(name):
    r = _tool(name, "--help")
    assert r.returncode == 0 and r.stdout.startswith(f"usage: python -m tools.{name}"), r.stderr


@pytest.mark.parametrize("name, args, reason", [
    ("cache_inspect", [], "the following arguments are required: cache"),
    ("cache_inspect", ["/nonexistent/cache"], "not a latent cache (no zarr.json)"),
    ("compare_runs", ["/nonexistent/a", "/nonexistent/b"], "no metrics.jsonl"),
    ("compare_runs", ["only_one"], "need 2 or more runs"),
    ("contact_sheet", ["/nonexistent.mp4", "--out", "x.png"], "video file not found"),
    ("contact_sheet", ["v.mp4", "--out", "x.png", "--frames", "0"], "--frames must be >= 1"),
    ("contact_sheet", ["v.mp4", "--out", "x.jpg"], "give a .png path"),
])
def test_tool_bad_arguments_give_one_line(name, args, reason, capsys):
    """In-process (the same `main` as `python -m`, without a process start per case)."""
    import importlib

    main = importlib.import_module(f"tools.{name}").main
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith(f"python -m tools.{name}: error:") and reason in lines[-1], err


# ----- latent cache ---------------------------------------------------------------------------------------
OVERRIDES = ["data.height=32", "data.width=32", "data.fps=8.0", "data.min_source_side=16",
             "data.duration_groups=[0.5,1.0,2.0]",
             "data.filters={min_shot_seconds: 0.25, min_source_fps: 1, max_shake: 1, min_sharpness: 0, min_motion: 0}"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, one_thread):
    """A real cache: 2 synthetic 2-shot videos -> `preprocess` with the tiny VAE and text encoder."""
    from megatron_longlive.models.wan.text_encoder import TextEncoder
    from megatron_longlive.models.wan.vae import WanVAE

    d = tmp_path_factory.mktemp("cache")
    src, out = str(d / "videos"), str(d / "cache")
    generate_dataset(src, DataConfig(height=32, width=32, num_frames=13, num_shots=2, fps=8.0, seed=3),
                     num_videos=2, progress=False)
    cfg = load_config(None, OVERRIDES)
    report = preprocess(src, out, PreprocessOptions.from_config(cfg.data, cfg.train.chunk_frames),
                        WanVAE.tiny("wan2.1", seed=0), TextEncoder.tiny(text_dim=32, text_len=16, seed=0),
                        progress=False)
    assert report["num_videos"] == 2, report
    return out, read_manifest(os.path.join(src, "manifest.jsonl"))


def _copy(cache_dir: str, dst) -> str:
    import shutil

    shutil.copytree(cache_dir, dst)
    return str(dst)


def test_cache_listing_shows_shapes_dtypes_and_captions(cache, capsys):
    root, manifest = cache
    reader = CacheReader(root)
    report = cache_inspect.inspect_cache(root, validate=True, progress=False)
    assert not report.problems and not report.warnings
    by_source = {v["source"]: v for v in report.videos}
    assert sorted(by_source) == ["video_0000.mp4", "video_0001.mp4"]
    for entry in manifest:
        row = by_source[os.path.basename(entry["path"])]
        lat, txt = reader.read_latents(row["key"]), reader.read_text(row["key"])
        assert row["latents_shape"] == list(lat.shape) == [16, 4, 4, 4]
        assert row["latents_dtype"] == str(lat.dtype).removeprefix("torch.") == "bfloat16"
        assert row["text_shape"] == list(txt.shape) == [2, 16, 32]
        assert row["captions"] == [s["caption"] for s in entry["shots"]]
    assert cache_inspect.main([root, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[16, 4, 4, 4] bfloat16" in out and "[2, 16, 32] bfloat16" in out
    assert manifest[0]["shots"][0]["caption"][:20] in out
    assert "2 video(s) listed" in out


def test_validation_names_each_damaged_file(cache, tmp_path, capsys):
    root = _copy(cache[0], tmp_path / "damaged")
    videos = sorted(CacheReader(root).videos, key=lambda v: v["source"])
    first, second = (os.path.join(root, v["group"], v["key"]) for v in videos)
    # 1. garbage bytes in a latent chunk, 2. a missing text chunk, 3. a manifest line that lies about the shape,
    # 4. a broken manifest line in the middle of a file, 5. a torn last line (only a warning)
    bad_chunk = os.path.join(first, "latents", "c", "0", "2", "0", "0")
    with open(bad_chunk, "wb") as f:
        f.write(b"not a blosc frame" * 4)
    missing = os.path.join(second, "text", "c", "1", "0", "0")
    os.remove(missing)
    mpath = os.path.join(root, "_manifest", "shard-00000-of-00001.jsonl")
    lines = open(mpath).read().splitlines(keepends=True)
    i = next(k for k, ln in enumerate(lines) if json.loads(ln).get("key") == videos[1]["key"])
    rec = json.loads(lines[i])
    rec["latent_shape"] = [16, 8, 4, 4]
    lines[i] = json.dumps(rec) + "\n"
    lines.insert(1, "{not json\n")
    with open(mpath, "w") as f:
        f.writelines(lines + ['{"type": "video", "key": "torn'])
    assert cache_inspect.main([root, "--validate", "--no-progress"]) == 1
    out = capsys.readouterr().out
    corrupt = [ln for ln in out.splitlines() if ln.startswith("CORRUPT ")]
    assert any(ln.startswith(f"CORRUPT {bad_chunk}: latents chunk (0, 2, 0, 0) does not decode") for ln in corrupt)
    assert f"CORRUPT {missing}: text chunk (1, 0, 0) is missing" in out
    assert f"CORRUPT {os.path.join(second, 'latents')}: shape [16, 4, 4, 4] != manifest [16, 8, 4, 4]" in out
    assert f"CORRUPT {mpath}:2: not JSON" in out
    assert f"WARNING {mpath}:{len(lines) + 1}: torn last line" in out
    assert len(corrupt) == 4, corrupt
    assert "2 video(s) validated; 4 problem(s), 1 warning(s)" in out


def test_nan_latents_and_orphans_are_found(cache, tmp_path):
    import zarr

    root = _copy(cache[0], tmp_path / "nan")
    v = CacheReader(root).videos[0]
    arr = zarr.open_array(os.path.join(root, v["group"], v["key"], "latents"), mode="r+")
    block = arr[:, 1:2]
    block.view(np.uint16)[0, 0, 0, 0] = 0x7FC0  # a bfloat16 NaN in latent frame 1
    arr[:, 1:2] = block
    os.rename(os.path.join(root, "_manifest", "shard-00000-of-00001.jsonl"), os.path.join(root, "_manifest", "x.txt"))
    report = cache_inspect.inspect_cache(root, validate=True, progress=False)
    assert report.videos == []  # no manifest any more: both videos are orphans on disk
    assert sum("in no manifest" in w.reason for w in report.warnings) == 2
    os.rename(os.path.join(root, "_manifest", "x.txt"), os.path.join(root, "_manifest", "shard-00000-of-00001.jsonl"))
    report = cache_inspect.inspect_cache(root, validate=True, progress=False)
    assert [p.reason for p in report.problems] == ["latents chunk (0, 1, 0, 0) holds NaN/Inf"]
    assert report.problems[0].path.endswith(os.path.join(v["key"], "latents", "c", "0", "1", "0", "0"))


# ----- loss curves ------------------------------------------------------------------------------------
def _write_metrics(run_dir, rows):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(run_dir)


def test_compare_runs_table_has_the_known_moving_averages(tmp_path, capsys):
    # a: loss = 10 - 0.1 * step, steps 1..20; b: 5 + 0.1 * step every 2nd step up to 12 (shorter, sparser logs)
    a = _write_metrics(tmp_path / "a", [{"step": s, "loss": 10 - 0.1 * s} for s in range(1, 21)])
    b = _write_metrics(tmp_path / "b", [{"step": s, "loss": 5.0 + 0.1 * s} for s in range(2, 13, 2)])
    plot = str(tmp_path / "plots" / "loss.png")
    assert compare_runs.main([a, b, "--window", "4", "--steps", "4,10,11,20", "--plot", plot]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["step", "a", "b", "b-a"]
    rows = {int(ln.split()[0]): ln.split()[1:] for ln in out[2:6]}
    # a at 10: mean of 9.3, 9.2, 9.1, 9.0 = 9.15; b at 10: logged 2..10 -> last 4: 5.4, 5.6, 5.8, 6.0 -> 5.7
    assert rows[10] == ["9.1500", "5.7000", "-3.4500"]
    assert rows[4] == ["9.7500", "5.3000", "-4.4500"]      # a: mean(9.9..9.6); b: mean(5.2, 5.4)
    assert rows[11] == ["9.0500", "5.7000", "-3.3500"]     # b's last logged step <= 11 is 10
    assert rows[20] == ["8.1500", "-", "-"]                # b stopped at 12
    # the plot is a real PNG with both runs' colours (matplotlib C0 and C1)
    img = np.asarray(Image.open(plot).convert("RGB")).reshape(-1, 3)
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        assert (np.abs(img.astype(int) - rgb).sum(1) < 30).sum() > 100, rgb


def test_smooth_matches_a_direct_mean():
    rng = np.random.default_rng(0)
    values = list(rng.normal(size=50))
    got = compare_runs.smooth(values, 7)
    want = [float(np.mean(values[max(0, i - 6): i + 1])) for i in range(50)]
    assert np.allclose(got, want, atol=1e-12)


def test_compare_runs_rejects_a_missing_metric(tmp_path):
    a = _write_metrics(tmp_path / "a", [{"step": 1, "loss": 1.0}])
    with pytest.raises(ValueError, match="no record has 'psnr'"):
        compare_runs.compare([a, a], ["x", "y"], "psnr", 1, None)


# ----- contact sheet -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video(tmp_path_factory):
    d = tmp_path_factory.mktemp("video")
    generate_dataset(str(d), DataConfig(height=64, width=48, num_frames=13, num_shots=2, fps=8.0, seed=5),
                     num_videos=1, progress=False)
    return str(d / "video_0000.mp4")


def test_contact_sheet_tiles_are_the_decoded_frames(video, tmp_path):
    out = str(tmp_path / "sheet.png")
    assert contact_sheet.main([video, "--out", out, "--frames", "4", "--cols", "2", "--pad", "3"]) == 0
    sheet = np.asarray(Image.open(out).convert("RGB"))
    meta = json.load(open(out + ".json"))
    decoded = read_mp4(video)  # [13, 64, 48, 3]
    assert [t["frame"] for t in meta["tiles"]] == [0, 4, 8, 12]
    assert [t["time_s"] for t in meta["tiles"]] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    lay = meta["layout"]
    assert (lay["cols"], lay["rows"], lay["tile_w"], lay["tile_h"]) == (2, 2, 48, 64)
    assert sheet.shape[:2] == (meta["size"][1], meta["size"][0])
    for k, t in enumerate(meta["tiles"]):
        x = 3 + (k % 2) * (48 + 3)
        y = 3 + (k // 2) * (64 + lay["label_h"] + 3)
        assert t["box"] == [x, y, 48, 64]
        assert np.array_equal(sheet[y:y + 64, x:x + 48], decoded[t["frame"]])  # the video's own pixels
        band = sheet[y + 64:y + 64 + lay["label_h"], x:x + 48]
        assert band.shape[0] >= 8 and band.min(-1).max() > 120  # light (antialiased) label text on the dark band
    assert (sheet[0:3] == contact_sheet.BACKGROUND).all() and (sheet[:, 0:3] == contact_sheet.BACKGROUND).all()
    labels = [sheet[t["box"][1] + 64:t["box"][1] + 64 + lay["label_h"], t["box"][0]:t["box"][0] + 48]
              for t in meta["tiles"]]
    assert not np.array_equal(labels[0], labels[1])  # different index/time text


def test_contact_sheet_strip_resized_without_labels(video, tmp_path):
    out = str(tmp_path / "strip.png")
    meta = contact_sheet.contact_sheet(video, out, num_frames=13, cols=13, tile_width=24, timestamps=False, pad=0)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape == (32, 13 * 24, 3) and meta["layout"]["label_h"] == 0
    decoded = read_mp4(video)
    for k in range(13):  # a resized tile keeps the mean colour of its frame
        tile = sheet[:, k * 24:(k + 1) * 24].reshape(-1, 3).mean(0)
        assert np.abs(tile - decoded[k].reshape(-1, 3).mean(0)).max() < 3.0, k
