"""End to end: real mp4s -> preprocess -> Zarr cache -> loader, against encoding the same frames directly.

Also: a folder of bad inputs (each rejected with its named reason while the run goes on), and a real
`longlive preprocess` subprocess killed with SIGKILL after its first commit, resumed, and compared with an
uninterrupted run (arrays bit for bit, metadata and report except timestamps).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
import torch

from dataloaders.decode import write_video
from dataloaders.preprocess import PreprocessOptions, preprocess
from dataloaders.synthetic import generate_dataset, read_manifest
from dataloaders.zarr_cache import TIMESTAMP_ATTRS, CacheReader
from dataloaders.zarr_dataset import ZarrLatentDataset, ZarrLoader
from megatron_longlive.config import DataConfig, load_config
from megatron_longlive.models.wan.text_encoder import TextEncoder
from megatron_longlive.models.wan.vae import WanVAE

# thresholds for 32x32 synthetic shapes at 8 fps (source fps 8, little texture)
OVERRIDES = ["data.height=32", "data.width=32", "data.fps=8.0", "data.min_source_side=16",
             "data.duration_groups=[0.5,1.0,2.0]",
             "data.filters={min_shot_seconds: 0.25, min_source_fps: 1, max_shake: 1, min_sharpness: 0, min_motion: 0}"]


@pytest.fixture(scope="module")
def models():
    return WanVAE.tiny("wan2.1", seed=0), TextEncoder.tiny(text_dim=32, text_len=16, seed=0)


def opts_from(overrides, **kw) -> PreprocessOptions:
    cfg = load_config(None, list(overrides) + [f"data.{k}={v}" for k, v in kw.items()])
    return PreprocessOptions.from_config(cfg.data, cfg.train.chunk_frames)


def synthetic(d, n, frames=13, shots=2):
    generate_dataset(d, DataConfig(height=32, width=32, num_frames=frames, num_shots=shots, fps=8.0, seed=3),
                     num_videos=n, progress=False)
    return read_manifest(os.path.join(d, "manifest.jsonl"))


def direct_latents(vae, path) -> torch.Tensor:
    """Independent path: every frame as plain PyAV decodes it -> [-1, 1] -> VAE."""
    with av.open(path) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].to(torch.float64).div(127.5).sub(1).float()
    return vae.encode(x)[0]


def test_round_trip_equals_direct_encoding(tmp_path, models):
    vae, te = models
    src = str(tmp_path / "videos")
    entries = synthetic(src, 2, frames=9)
    refs = {e["path"]: direct_latents(vae, e["path"]) for e in entries}  # [C, 3, 4, 4]
    for dtype in ("float32", "bfloat16"):
        out = str(tmp_path / f"cache_{dtype}")
        report = preprocess(src, out, opts_from(OVERRIDES, cache_dtype=dtype), vae, te, progress=False)
        assert report["num_videos"] == 2 and report["rejected"] == [], report
        ds = ZarrLatentDataset(out, dtype=None)
        by_source = {v["source"]: i for i, v in enumerate(ds.videos)}
        for e in entries:
            item = ds[by_source[os.path.basename(e["path"])]]
            ref = refs[e["path"]]
            if dtype == "float32":
                assert item["latents"].dtype == torch.float32
                assert (item["latents"] - ref).abs().max().item() <= 1e-6
            else:
                # the encoder may differ from the direct path by float32 rounding (<= 1e-6, as above), which
                # can move a value across a bf16 rounding boundary: the store must hold a bf16 rounding of
                # some value within that tolerance, i.e. lie between the roundings of ref -/+ 1e-6
                got = item["latents"]
                assert got.dtype == torch.bfloat16
                lo, hi = (ref - 1e-6).bfloat16(), (ref + 1e-6).bfloat16()
                assert bool(((got >= lo) & (got <= hi)).all())
                assert (got.float() == ref.bfloat16().float()).float().mean().item() > 0.99
            caps = [s["caption"] for s in e["shots"]]
            assert item["captions"] == caps
            assert torch.equal(item["texts"].float(), te.encode(caps).to(item["texts"].dtype).float())
            # manifest shots start on pixel frames 1 + 4k -> latent k -> chunk k (chunk_frames=1)
            starts = [0 if s["start_frame"] == 0 else (s["start_frame"] + 3) // 4 for s in e["shots"]]
            assert item["chunk_shot"].tolist() == [sum(c >= s for s in starts[1:]) for c in range(3)]
            assert item["caption"].startswith("Shot 1 [chunks 0-")
        # Balanced SP: the ranks' chunk ranges tile the video, each read on its own
        full = ds[0]["latents"]
        parts = [ZarrLatentDataset(out, sp_rank=r, sp_size=3, dtype=None)[0] for r in range(3)]
        assert [p["chunk_range"] for p in parts] == [(0, 1), (1, 2), (2, 3)]
        assert torch.equal(torch.cat([p["latents"] for p in parts], 1).view(torch.int16 if dtype == "bfloat16"
                                                                               else torch.int32),
                           full.view(torch.int16 if dtype == "bfloat16" else torch.int32))


def test_loader_buckets_shards_and_resumes(tmp_path, models):
    vae, te = models
    src = str(tmp_path / "videos")
    synthetic(src, 4, frames=13)  # 1.625 s -> group 1-2s
    generate_dataset(os.path.join(src, "short"), DataConfig(height=32, width=32, num_frames=5, num_shots=1, fps=8.0,
                                                            seed=4), num_videos=2, progress=False)  # 0.625 s
    rows = [json.loads(x) for x in open(os.path.join(src, "manifest.jsonl"))]
    rows += [{**r, "path": "short/" + r["path"]} for r in map(json.loads, open(os.path.join(src, "short",
                                                                                             "manifest.jsonl")))]
    cap = os.path.join(src, "captions.jsonl")
    open(cap, "w").write("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "cache")
    rep = preprocess(src, out, opts_from(OVERRIDES, captions=cap), vae, te, progress=False)
    assert rep["num_videos"] == 6, rep
    ds = ZarrLatentDataset(out)
    groups = {v["key"]: v["group"] for v in ds.videos}
    assert sorted(set(groups.values())) == ["0.5-1s", "1-2s"]
    seen = {}
    for rank in range(2):
        ld = ZarrLoader(ds, batch_size=1, dp_rank=rank, dp_size=2, seed=5, prefetch=2)
        keys = [next(ld)["key"][0] for _ in range(len(ld._batches(0)))]
        ld.close()
        seen[rank] = keys
    assert not set(seen[0]) & set(seen[1])  # DP ranks get disjoint videos within an epoch
    # batches never mix duration groups; state restores the exact position
    ld = ZarrLoader(ds, batch_size=2, seed=1, prefetch=2)
    got = [next(ld) for _ in range(3)]
    for b in got:
        assert len({groups[k] for k in b["key"]}) == 1
    state = ld.state_dict()
    after = next(ld)
    ld.close()
    ld2 = ZarrLoader(ds, batch_size=2, seed=1, prefetch=0)
    ld2.load_state_dict(state)
    again = next(ld2)
    assert again["key"] == after["key"] and torch.equal(again["latents"], after["latents"])
    # the trainer's registry: data.source=zarr with a cache directory -> this dataset
    from dataloaders.latent_dataset import build_dataset

    cfg = load_config(None, ["data.source=zarr", f"data.path={out}"])
    item = build_dataset(cfg)[0]
    assert item["latents"].ndim == 4 and item["text"].shape == (16, 32) and isinstance(item["caption"], str)


class FilenameCaptioner:
    """A deterministic captioner plug-in for files without manifest captions."""

    name = "filename"

    def caption(self, frames, path, start_s, end_s):
        return f"clip {os.path.basename(path)} from {start_s:.2f}s to {end_s:.2f}s"


def test_bad_inputs_are_reported_and_the_run_continues(tmp_path, models):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_data_decode import make_bad, smooth

    vae, te = models
    src = tmp_path / "videos"
    synthetic(str(src), 1, frames=9)
    bad = {}
    for kind in ("empty_file", "not_a_video", "no_video_stream", "resolution_too_small", "truncated",
                 "corrupt_frame"):
        bad[kind] = os.path.basename(make_bad(kind, src))
    frames = smooth(9, 32)
    write_video(str(src / "ten_bit.mp4"), frames, fps=8, pix_fmt="yuv420p10le")
    write_video(str(src / "vfr.mp4"), frames, fps=8, pts_s=[0, .1, .3, .35, .5, .6, .8, .85, 1.0])
    report = preprocess(str(src), str(tmp_path / "cache"), opts_from(OVERRIDES), vae, te, progress=False,
                        captioner=FilenameCaptioner())
    by_source = {}
    for r in report["rejected"]:
        by_source.setdefault(r["source"], []).append(r["reason"])
    for kind, name in bad.items():
        assert by_source.get(name) == [kind], (name, by_source.get(name))
    notes = {(n["source"], n["reason"]) for n in report["notes"]}
    assert ("ten_bit.mp4", "high_bit_depth") in notes and ("vfr.mp4", "variable_frame_rate") in notes
    committed = {v["source"] for v in CacheReader(str(tmp_path / "cache")).videos}
    assert committed == {"video_0000.mp4", "ten_bit.mp4", "vfr.mp4"}
    assert report["num_sources"] == 9
    assert set(report["reasons"]) == set(bad)
    saved = json.load(open(tmp_path / "cache" / "_reports" / "shard-00000-of-00001.json"))
    assert saved["reason_counts"] == report["reason_counts"]


def snapshot(root: str) -> dict:
    """Everything a cache holds, timestamps aside: arrays as bytes, attrs, manifest records, report."""
    r = CacheReader(root)
    out = {"videos": sorted(json.dumps(v, sort_keys=True) for v in r.videos),
           "sources": sorted(json.dumps(s, sort_keys=True) for s in r.sources)}
    for v in r.videos:
        g = r.group(v)
        attrs = {k: a for k, a in g.attrs.items() if k not in TIMESTAMP_ATTRS}
        out[v["key"]] = (g["latents"][...].tobytes(), g["text"][...].tobytes(), json.dumps(attrs, sort_keys=True),
                         dict(g["latents"].attrs), g["latents"].chunks)
    return out


def test_kill_dash_nine_then_resume_equals_uninterrupted(tmp_path, models):
    src = str(tmp_path / "videos")
    synthetic(src, 3, frames=5, shots=1)
    killed = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "megatron_longlive.cli.main", "preprocess", src, "--out", killed, "--no-progress"]
    for o in OVERRIDES:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = os.path.join(killed, "_manifest", "shard-00000-of-00001.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(manifest) and '"type": "video"' in open(manifest).read():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = [json.loads(x) for x in open(manifest).read().splitlines() if x.endswith("}")]
    assert sum(r["type"] == "video" for r in done) >= 1
    assert sum(r["type"] == "source" for r in done) < 3, "kill came too late to test resuming"
    # resume (in process, same models as the CLI's tiny ones) and compare with a run that was never killed
    vae, te = models
    opts = opts_from(OVERRIDES)
    preprocess(src, killed, opts, vae, te, progress=False)
    clean = str(tmp_path / "clean")
    preprocess(src, clean, opts, vae, te, progress=False)
    a, b = snapshot(killed), snapshot(clean)
    assert a.keys() == b.keys() and len(a) == 2 + 3
    for k in a:
        assert a[k] == b[k], k
    assert not os.listdir(os.path.join(killed, "_tmp", "shard-00000-of-00001"))
    ra = json.load(open(os.path.join(killed, "_reports", "shard-00000-of-00001.json")))
    rb = json.load(open(os.path.join(clean, "_reports", "shard-00000-of-00001.json")))
    assert ra == rb


def test_online_mode_equals_direct_encoding_per_sp_rank(tmp_path, models):
    from dataloaders.zarr_dataset import OnlineVideoDataset

    vae, te = models
    src = str(tmp_path / "videos")
    entries = synthetic(src, 1, frames=9)
    ref = direct_latents(vae, entries[0]["path"])  # [C, 3, 4, 4]
    opts = opts_from(OVERRIDES)
    item = OnlineVideoDataset(src, opts, vae, te)[0]
    assert (item["latents"] - ref).abs().max().item() <= 1e-6
    assert item["captions"] == [s["caption"] for s in entries[0]["shots"]]
    for rank in (1, 2):  # each rank encodes only up to its own chunk (the halo reaches frame 0 here)
        part = OnlineVideoDataset(src, opts, vae, te, sp_rank=rank, sp_size=3)[0]
        assert part["chunk_range"] == (rank, rank + 1)
        assert (part["latents"] - ref[:, rank:rank + 1]).abs().max().item() <= 1e-5


def test_two_shards_split_the_folder_and_the_cli_reports_errors(tmp_path, models, capsys):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_data_decode import make_bad

    from megatron_longlive.cli.main import main

    vae, te = models
    src = tmp_path / "videos"
    synthetic(str(src), 2, frames=5, shots=1)
    make_bad("empty_file", src)
    make_bad("not_a_video", src)
    out = str(tmp_path / "cache")
    reps = [preprocess(str(src), out, opts_from(OVERRIDES), vae, te, shard_index=i, num_shards=2, progress=False)
            for i in range(2)]
    assert sum(r["num_sources"] for r in reps) == 4 and all(r["num_sources"] == 2 for r in reps)
    assert sorted(v["source"] for v in CacheReader(out).videos) == ["video_0000.mp4", "video_0001.mp4"]
    assert sorted(os.listdir(os.path.join(out, "_reports"))) == ["shard-00000-of-00002.json",
                                                                "shard-00001-of-00002.json"]
    assert main(["preprocess", str(tmp_path / "missing"), "--out", str(tmp_path / "new")]) == 2
    assert "missing' is not a directory" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "new")
    assert main(["preprocess", str(src), "--out", out]) == 2  # default duration groups differ from the cache's
    assert "cache was made with duration edges [0.5, 1.0, 2.0]" in capsys.readouterr().err
