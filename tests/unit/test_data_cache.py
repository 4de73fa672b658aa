"""Zarr cache: bit-exact BF16/FP32 storage, per-chunk layout, atomic commits, torn manifests, duration groups."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from dataloaders.zarr_cache import (CacheReader, CacheWriter, VideoRecord, duration_group, duration_group_names,
                                    from_stored, to_stored)


def special_bf16(shape) -> torch.Tensor:
    """Random bf16 plus every awkward bit pattern: +-0, +-inf, NaNs with payloads, subnormals, max/min."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 1 << 16, shape, generator=g, dtype=torch.int32).to(torch.uint16)
    special = torch.tensor([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0xFFFF, 0x7F81, 0x0001, 0x8001, 0x007F,
                            0x7F7F, 0xFF7F], dtype=torch.int32).to(torch.uint16)
    flat = bits.flatten()
    flat[:special.numel()] = special
    return flat.view(shape).view(torch.bfloat16)


def record(key="v", group="1-2s", frames=6, chunk=2, dtype=torch.bfloat16, seed=0) -> VideoRecord:
    g = torch.Generator().manual_seed(seed)
    lat = special_bf16((4, frames, 3, 5)) if dtype == torch.bfloat16 else torch.randn(4, frames, 3, 5, generator=g)
    text = torch.randn(2, 7, 8, generator=g).to(dtype)
    return VideoRecord(key, group, lat, text, chunk, {"source": f"{key}.mp4", "duration_s": 1.5,
                                                        "shot_chunks": [[0, 1], [1, frames // chunk]]})


def test_to_from_stored_bitwise():
    t = special_bf16((64,))
    a, name = to_stored(t)
    assert a.dtype == np.uint16 and name == "bfloat16"
    assert torch.equal(from_stored(a, name).view(torch.uint16), t.view(torch.uint16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_read_bitwise_and_chunk_layout(tmp_path, dtype):
    w = CacheWriter(str(tmp_path / "c"), duration_edges=[1, 2])
    rec = record(dtype=dtype)
    w.write_video(rec)
    r = CacheReader(str(tmp_path / "c"))
    assert r.keys() == ["v"]
    got = r.read_latents("v")
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.uint16 if dtype == torch.bfloat16 else torch.int32),
                       rec.latents.view(torch.uint16 if dtype == torch.bfloat16 else torch.int32))
    assert torch.equal(r.read_text("v"), rec.text)
    arr = r.group("v")["latents"]
    assert arr.chunks == (4, 2, 3, 5)  # one Zarr chunk per latent chunk
    assert arr.compressors  # compressed
    # a latent-frame range reads the same bits as slicing the whole
    assert torch.equal(r.read_latents("v", slice(2, 4)).view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       rec.latents[:, 2:4].contiguous().view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    attrs = r.read_attrs("v")
    assert attrs["source"] == "v.mp4" and attrs["chunk_frames"] == 2 and attrs["shot_chunks"] == [[0, 1], [1, 3]]


def test_half_written_video_is_invisible_and_cleaned(tmp_path):
    root = str(tmp_path / "c")
    w = CacheWriter(root, duration_edges=[1, 2])
    w.write_video(record("a"))
    # simulate a kill: a partly written group under _tmp and a torn manifest line
    tmp = os.path.join(root, "_tmp", w.shard, "b")
    os.makedirs(os.path.join(tmp, "latents"))
    open(os.path.join(tmp, "zarr.json"), "w").write("{")
    with open(w.manifest_path, "a") as fh:
        fh.write('{"type": "video", "key": "b", "gro')
    r = CacheReader(root)
    assert r.keys() == ["a"]
    w2 = CacheWriter(root, duration_edges=[1, 2])  # resume
    assert not os.path.exists(tmp)
    assert set(w2.videos) == {"a"}
    lines = open(w2.manifest_path).read().splitlines()
    assert all(json.loads(x) for x in lines) and len(lines) == 1


def test_renamed_but_unlisted_video_is_reconciled(tmp_path):
    """Killed between the rename and the manifest append: the rerun adds the line, does not rewrite the group."""
    root = str(tmp_path / "c")
    w = CacheWriter(root, duration_edges=[1, 2])
    w.write_video(record("a"))
    with open(w.manifest_path, "w"):
        pass  # lose the manifest line
    assert CacheReader(root).keys() == []
    w2 = CacheWriter(root, duration_edges=[1, 2])
    path = os.path.join(root, "1-2s", "a", "zarr.json")
    mtime = os.stat(path).st_mtime_ns
    w2.write_video(record("a"))
    assert os.stat(path).st_mtime_ns == mtime
    assert CacheReader(root).keys() == ["a"]


def test_duration_groups_and_mismatch_error(tmp_path):
    assert duration_group_names([16, 32, 64]) == ["16-32s", "32-64s", "64s+"]
    assert duration_group(15.9, [16, 32, 64]) is None
    assert duration_group(16, [16, 32, 64]) == "16-32s"
    assert duration_group(40, [16, 32, 64]) == "32-64s"
    assert duration_group(600, [16, 32, 64]) == "64s+"
    CacheWriter(str(tmp_path / "c"), duration_edges=[1, 2])
    with pytest.raises(ValueError, match="duration edges"):
        CacheWriter(str(tmp_path / "c"), duration_edges=[16, 32, 64])
    with pytest.raises(FileNotFoundError, match="not a latent cache"):
        CacheReader(str(tmp_path / "nothing"))


def test_shards_write_separate_manifests(tmp_path):
    root = str(tmp_path / "c")
    CacheWriter(root, [1, 2], shard_index=0, num_shards=2).write_video(record("a"))
    CacheWriter(root, [1, 2], shard_index=1, num_shards=2).write_video(record("b", seed=1))
    assert sorted(os.listdir(os.path.join(root, "_manifest"))) == ["shard-00000-of-00002.jsonl",
                                                                 "shard-00001-of-00002.jsonl"]
    assert CacheReader(root).keys() == ["a", "b"]


def test_sp_rank_reads_only_its_chunks(tmp_path):
    """Delete every other rank's chunk files: each rank still gets its exact latents (it never reads them)."""
    from dataloaders.zarr_dataset import ZarrLatentDataset

    root = str(tmp_path / "c")
    rec = record("v", frames=6, chunk=2, dtype=torch.float32)
    rec.attrs.update(captions=["a", "b"], description="Shot 1 ... Shot 2 ...")
    CacheWriter(root, duration_edges=[1, 2]).write_video(rec)
    chunk_dir = os.path.join(root, "1-2s", "v", "latents", "c", "0")
    assert sorted(os.listdir(chunk_dir)) == ["0", "1", "2"]  # one Zarr chunk per latent chunk (3 chunks)
    for rank in range(3):
        kept = str(tmp_path / f"rank{rank}")
        shutil.copytree(root, kept)
        for k in {"0", "1", "2"} - {str(rank)}:
            shutil.rmtree(os.path.join(kept, "1-2s", "v", "latents", "c", "0", k))
        item = ZarrLatentDataset(kept, sp_rank=rank, sp_size=3, dtype=None)[0]
        assert item["chunk_range"] == (rank, rank + 1)
        assert torch.equal(item["latents"], rec.latents[:, 2 * rank:2 * rank + 2])
        assert item["chunk_shot"].tolist() == [0, 1, 1]
        full = ZarrLatentDataset(kept, dtype=None)[0]["latents"]
        assert not torch.equal(full, rec.latents)  # the deleted chunks really are gone
