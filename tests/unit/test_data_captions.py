"""Caption manifests (JSONL per video, JSONL per shot, CSV), overlap lookup, chunk snapping, merged descriptions."""
from __future__ import annotations

import json

import pytest

from dataloaders.captions import CaptionIndex, latent_frame_of, merge_description, shot_chunks


def test_three_manifest_shapes_agree(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"path": "v.mp4", "fps": 8, "shots": [
        {"start_frame": 0, "end_frame": 8, "caption": "a cat"}, {"start_frame": 8, "end_frame": 20, "caption": "a dog"}]})
        + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"path": "v.mp4", "start": 0.0, "end": 1.0, "caption": "a cat"}) + "\n"
                                      + json.dumps({"path": "v.mp4", "start": 1.0, "end": 2.5, "caption": "a dog"})
                                      + "\n")
    (tmp_path / "c.csv").write_text("path,start,end,caption\nv.mp4,1.0,2.5,a dog\nv.mp4,0,1,a cat\n")
    video = str(tmp_path / "v.mp4")
    for name in ("a.jsonl", "b.jsonl", "c.csv"):
        idx = CaptionIndex(str(tmp_path / name))
        assert idx.spans(video) == [(0.0, 1.0, "a cat"), (1.0, 2.5, "a dog")], name
        assert idx.lookup(video, 0.0, 0.9) == "a cat"
        assert idx.lookup(video, 0.6, 2.0) == "a dog"  # overlaps the dog shot more
        assert idx.lookup(str(tmp_path / "other.mp4"), 0, 1) is None


def test_manifest_errors_name_the_line(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"path": "v.mp4", "start": 0, "end": 1, "caption": "ok"}\n{"path": "v.mp4", "start": 2}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: a shot needs start/end"):
        CaptionIndex(str(bad))
    bad.write_text('{"path": "v.mp4", "start": 1, "end": 1, "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:1: shot end"):
        CaptionIndex(str(bad))
    with pytest.raises(FileNotFoundError, match="data.captions"):
        CaptionIndex(str(tmp_path / "missing.jsonl"))


def test_latent_frames_and_chunk_snapping():
    # causal Wan VAE: latent 0 = pixel 0; latent j = pixels 4j-3 .. 4j
    assert [latent_frame_of(p) for p in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    # shots starting at pixels 0, 13 (latent 4), 25 (latent 7); chunks of 2 latent frames, 5 chunks
    assert shot_chunks([0, 13, 25], num_chunks=5, chunk_frames=2) == [(0, 0, 2), (1, 2, 4), (2, 4, 5)]
    # a shot collapsing onto its predecessor's boundary is merged away
    assert shot_chunks([0, 1, 13], num_chunks=4, chunk_frames=2) == [(0, 0, 2), (2, 2, 4)]
    text = merge_description(["a cat.", "a dog"], [(0, 2), (2, 5)])
    assert text == "Shot 1 [chunks 0-1]: a cat. Shot 2 [chunks 2-4]: a dog."
