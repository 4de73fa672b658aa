"""Synthetic multi-shot data: real mp4 files through PyAV, captions that describe what is drawn, determinism."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from dataloaders.synthetic import (BACKGROUNDS, COLORS, SyntheticVideoDataset, decode_video, generate_dataset,
                                   read_manifest, render_video, shot_boundaries)
from megatron_longlive.config import DataConfig


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    cfg = DataConfig(height=32, width=48, num_frames=13, num_videos=3, num_shots=2, seed=7)
    return cfg, generate_dataset(out, cfg, progress=False)


def test_manifest_and_mp4_files(dataset_dir):
    cfg, manifest = dataset_dir
    lines = [json.loads(l) for l in open(manifest)]
    assert len(lines) == 3
    for line in lines:
        assert line["num_frames"] == 13 and line["fps"] == cfg.fps and (line["height"], line["width"]) == (32, 48)
        assert [(s["start_frame"], s["end_frame"]) for s in line["shots"]] == [(0, 5), (5, 13)]
        path = os.path.join(os.path.dirname(manifest), line["path"])
        with open(path, "rb") as f:
            assert f.read(12)[4:8] == b"ftyp"  # an mp4 container
        video = decode_video(path)
        assert video.shape == (3, 13, 32, 48) and video.dtype == torch.float32
        assert video.min() >= -1 and video.max() <= 1


def test_decoded_frames_match_what_was_drawn(dataset_dir):
    cfg, manifest = dataset_dir
    for i, entry in enumerate(read_manifest(manifest)):
        drawn, shots = render_video(cfg.seed, i, cfg.height, cfg.width, cfg.num_frames, cfg.num_shots)
        assert shots == entry["shots"]
        decoded = ((decode_video(entry["path"]) + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 3, 0).numpy()
        assert _psnr(decoded, drawn) > 28, "lossy h264 at crf 12 should stay close to the drawn frames"


def test_caption_names_the_colours_and_background_drawn():
    frames, shots = render_video(seed=3, index=0, height=64, width=64, num_frames=17, num_shots=2)
    for shot in shots:
        frame = frames[shot["start_frame"]].reshape(-1, 3)
        present = {tuple(c) for c in np.unique(frame, axis=0)}
        named_colors = {name for name in COLORS if f"a {name} " in shot["caption"]}
        assert named_colors and {COLORS[n] for n in named_colors} <= present
        bg = shot["caption"].split(" on a ")[-1].removesuffix(" background")
        assert BACKGROUNDS[bg] in present
        # nothing else is drawn: every pixel is the background or a named colour
        assert present <= {BACKGROUNDS[bg]} | {COLORS[n] for n in named_colors}


def test_motion_matches_caption():
    """The centroid of a single-shape shot moves in the direction its caption says."""
    checked = 0
    for index in range(40):
        frames, shots = render_video(seed=0, index=index, height=64, width=64, num_frames=13, num_shots=1)
        caption = shots[0]["caption"]
        if " and " in caption:
            continue
        color = COLORS[caption.split()[1]]
        cents = []
        for f in (0, 12):
            ys, xs = np.nonzero(np.all(frames[f] == color, axis=-1))
            cents.append((xs.mean(), ys.mean()))
        dx, dy = cents[1][0] - cents[0][0], cents[1][1] - cents[0][1]
        expect = {"slides right": dx > 10, "slides left": dx < -10, "moves down": dy > 10, "moves up": dy < -10}
        motion = next(m for m in expect if m in caption)
        assert expect[motion], (caption, dx, dy)
        checked += 1
    assert checked >= 5


def test_deterministic_and_seed_dependent():
    a, sa = render_video(1, 2, 32, 32, 9, 2)
    b, sb = render_video(1, 2, 32, 32, 9, 2)
    c, _ = render_video(2, 2, 32, 32, 9, 2)
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)


def test_shot_boundaries_cover_whole_latent_frames():
    assert shot_boundaries(13, 2) == [(0, 5), (5, 13)]
    assert shot_boundaries(21, 3) == [(0, 5), (5, 13), (13, 21)]
    with pytest.raises(ValueError, match="num_shots"):
        shot_boundaries(5, 3)


def test_dataset_loader_and_bad_input(dataset_dir, tmp_path):
    _, manifest = dataset_dir
    ds = SyntheticVideoDataset(manifest, num_frames=9)
    item = ds[1]
    assert item["video"].shape == (3, 9, 32, 48)
    assert [s["start_frame"] for s in item["shots"]] == [0, 5]
    with pytest.raises(ValueError, match="holds 13 frames but data.num_frames=17"):
        SyntheticVideoDataset(manifest, num_frames=17)
    with pytest.raises(ValueError, match="asked for 17 frames"):
        decode_video(item["path"], 17)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(manifest).readline() + '{"path": "x.mp4", "fps": 8}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'num_frames'"):
        read_manifest(bad)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(tmp_path / "missing.jsonl")


def test_build_dataset_for_the_trainer_encodes_and_caches(tmp_path):
    from dataloaders.synthetic import build_dataset
    from megatron_longlive.config import load_config
    from megatron_longlive.models.wan.text_encoder import TextEncoder
    from megatron_longlive.models.wan.vae import WanVAE

    cfg = load_config(None, [f"data.path={tmp_path}", "data.num_videos=2", "data.height=32", "data.width=32",
                             "data.num_frames=5", "data.num_shots=1"])
    ds = build_dataset(cfg, progress=False)
    assert ds.latents.shape == (2, 16, 2, 4, 4) and ds.text.shape == (2, 16, 32)
    entries = read_manifest(tmp_path / "manifest.jsonl")
    assert ds.captions == [e["shots"][0]["caption"] for e in entries]
    with torch.no_grad():   # independent re-encode with freshly built tiny encoders (seed 0)
        lat = WanVAE.tiny("wan2.1", seed=0).encode(decode_video(entries[1]["path"])[None])
        txt = TextEncoder.tiny(32, 16, seed=0).encode([ds.captions[1]])
    torch.testing.assert_close(ds.latents[1], lat[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ds.text[1], txt[0], rtol=0, atol=1e-6)
    os.remove(entries[0]["path"])            # the cached latent file is used: videos are not needed again
    again = build_dataset(cfg, progress=False)
    assert torch.equal(again.latents, ds.latents)
