"""Zarr latent cache: one group per video, atomic per-video commits, a per-shard manifest, resumable.

Layout (Zarr v3, local directory store):

    root/zarr.json                       root group; attrs: cache format, duration edges
    root/<duration group>/<key>/         one committed video (e.g. `16-32s/clip_0001-3fa2c1`)
        latents  [C, F, h, w]            chunked per latent chunk (C, chunk_frames, h, w), Blosc-zstd
        text     [S, L, D]               one text embedding per shot, chunk = one shot
        attrs    source, fps, resolution, VAE id, shot boundaries (latent chunks), captions, filter scores
    root/_tmp/<...>                      videos being written (deleted on resume, never read)
    root/_manifest/shard-IIIII-of-NNNNN.jsonl   one line per committed video and per finished source

BF16 arrays are stored bit-exactly as their uint16 view with attribute `dtype: bfloat16`; other dtypes
natively. A video is written under `_tmp/` and `os.rename`d into its duration group (atomic on POSIX),
so a reader never sees half a video; the manifest line follows the rename, and `CacheWriter` reconciles
a rename whose manifest line was lost to a kill. Each shard has its own writer and manifest file.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from megatron_longlive.utils.durable import fsync_path

FORMAT = "megatron_longlive.latent_cache/1"
_TMP = "_tmp"
_MANIFEST = "_manifest"
_TORCH_BY_NAME = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                  "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}


# ----------------------------------------------------------------------------------------------------------
# Tensors <-> stored arrays (lossless)

def to_stored(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A numpy array that holds `t` bit-exactly, and the torch dtype name to restore it."""
    name = str(t.dtype).removeprefix("torch.")
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy(), name
    return t.numpy(), name


def from_stored(a: np.ndarray, dtype_name: str) -> torch.Tensor:
    """Inverse of `to_stored`."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype_name == "bfloat16":
        return t.view(torch.bfloat16)
    want = _TORCH_BY_NAME[dtype_name]
    assert t.dtype == want, (t.dtype, dtype_name)
    return t


def duration_group_names(edges: Sequence[float]) -> list[str]:
    """Names of the duration groups for edges [16, 32, 64] -> ['16-32s', '32-64s', '64s+']."""
    e = [float(x) for x in edges]
    if not e or any(b <= a for a, b in zip(e, e[1:])) or e[0] < 0:
        raise ValueError(f"data.duration_groups: {edges} must be increasing non-negative seconds. Fix: e.g. [16, 32, 64]")
    fmt = lambda x: f"{x:g}"  # noqa: E731
    return [f"{fmt(a)}-{fmt(b)}s" for a, b in zip(e, e[1:])] + [f"{fmt(e[-1])}s+"]


def duration_group(seconds: float, edges: Sequence[float]) -> str | None:
    """The group a clip of `seconds` falls in, or None when shorter than the first edge."""
    names = duration_group_names(edges)
    if seconds < edges[0]:
        return None
    i = int(np.searchsorted(np.asarray(edges, dtype=np.float64), seconds, side="right")) - 1
    return names[i]


def _read_jsonl(path: str) -> list[dict]:
    """Lines of a manifest; a torn last line (killed writer) is ignored."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            out.append(json.loads(line))
    return out


# ----------------------------------------------------------------------------------------------------------
# Writer

@dataclasses.dataclass
class VideoRecord:
    """What one committed video holds (arrays) and says about itself (attrs)."""

    key: str
    group: str
    latents: torch.Tensor  # [C, F, h, w]
    text: torch.Tensor  # [S, L, D]
    chunk_frames: int
    attrs: dict[str, Any]


class CacheWriter:
    """Writes one shard of the cache; safe to kill at any point and start again with the same arguments."""

    def __init__(self, root: str, duration_edges: Sequence[float] = (16, 32, 64), shard_index: int = 0,
                 num_shards: int = 1, clevel: int = 3):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index={shard_index} must be in [0, num_shards={num_shards}). Fix: pass a valid shard")
        self.root = os.path.abspath(root)
        self.edges = [float(e) for e in duration_edges]
        self.groups = duration_group_names(self.edges)
        self.shard = f"shard-{shard_index:05d}-of-{num_shards:05d}"
        self.clevel = clevel
        root_group = zarr.open_group(self.root, mode="a")
        stored = root_group.attrs.get("duration_edges")
        if stored is not None and [float(x) for x in stored] != self.edges:
            raise ValueError(f"{self.root}: cache was made with duration edges {stored}, not {self.edges}. "
                             "Fix: use the same data.duration_groups or a new cache directory")
        if root_group.attrs.get("format") != FORMAT:
            root_group.attrs.update({"format": FORMAT, "duration_edges": self.edges})
        for name in self.groups:
            if name not in root_group:
                root_group.create_group(name)
        os.makedirs(os.path.join(self.root, _MANIFEST), exist_ok=True)
        self.manifest_path = os.path.join(self.root, _MANIFEST, f"{self.shard}.jsonl")
        self._tmp_dir = os.path.join(self.root, _TMP, self.shard)
        self._recover()

    # -- resume ------------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Drop this shard's half-written videos and a torn manifest line; remember what is done."""
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        os.makedirs(self._tmp_dir, exist_ok=True)
        lines = _read_jsonl(self.manifest_path)
        with open(self.manifest_path, "w", encoding="utf-8") as fh:  # rewrite without a torn tail
            for rec in lines:
                fh.write(json.dumps(rec, sort_keys=True) + "\n")
        self.videos = {r["key"]: r for r in lines if r["type"] == "video"}
        self.sources = {r["source"]: r for r in lines if r["type"] == "source"}

    def source_done(self, source: str) -> bool:
        return source in self.sources

    def committed(self, group: str, key: str) -> bool:
        """True when the video directory exists (renamed in), whether or not its manifest line made it."""
        return os.path.exists(os.path.join(self.root, group, key, "zarr.json"))

    def _append(self, record: dict) -> None:
        with open(self.manifest_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # -- write -------------------------------------------------------------------------------------
    def write_video(self, rec: VideoRecord) -> None:
        """Write `rec` under _tmp, rename it into its duration group, then add it to the manifest."""
        if rec.group not in self.groups:
            raise ValueError(f"unknown duration group {rec.group!r}; have {self.groups}")
        final = os.path.join(self.root, rec.group, rec.key)
        if not self.committed(rec.group, rec.key):
            tmp = os.path.join(self._tmp_dir, rec.key)
            shutil.rmtree(tmp, ignore_errors=True)
            self._write_group(tmp, rec)
            if os.path.exists(final):  # a directory without zarr.json cannot be ours; clear it
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_path(os.path.dirname(final))
        if rec.key not in self.videos:
            c, f, h, w = rec.latents.shape
            line = {"type": "video", "key": rec.key, "group": rec.group, "source": rec.attrs.get("source", ""),
                    "num_latent_frames": f, "latent_shape": [c, f, h, w], "chunk_frames": rec.chunk_frames,
                    "duration_s": rec.attrs.get("duration_s", 0.0), "num_shots": int(rec.text.shape[0])}
            self._append(line)
            self.videos[rec.key] = line

    def _write_group(self, path: str, rec: VideoRecord) -> None:
        g = zarr.open_group(path, mode="w")
        c, f, h, w = rec.latents.shape
        assert f % rec.chunk_frames == 0, f"latent frames {f} not a multiple of chunk_frames {rec.chunk_frames}"
        arr, dt = to_stored(rec.latents)
        blosc = BloscCodec(cname="zstd", clevel=self.clevel, shuffle="bitshuffle")
        a = g.create_array("latents", shape=arr.shape, chunks=(c, rec.chunk_frames, h, w), dtype=arr.dtype,
                           compressors=blosc)
        a[...] = arr
        a.attrs["dtype"] = dt
        tarr, tdt = to_stored(rec.text)
        t = g.create_array("text", shape=tarr.shape, chunks=(1,) + tarr.shape[1:], dtype=tarr.dtype, compressors=blosc)
        t[...] = tarr
        t.attrs["dtype"] = tdt
        g.attrs.update({**rec.attrs, "key": rec.key, "group": rec.group, "chunk_frames": rec.chunk_frames,
                        "written_at": time.time()})

    def finish_source(self, source: str, committed: list[str], rejected: list[dict], notes: list[dict],
                      **extra: Any) -> None:
        """Mark `source` done (all its videos committed or rejected, with reasons)."""
        rec = {"type": "source", "source": source, "committed": committed, "rejected": rejected, "notes": notes,
               **extra}
        self._append(rec)
        self.sources[source] = rec


# ----------------------------------------------------------------------------------------------------------
# Reader

TIMESTAMP_ATTRS = ("written_at",)


class CacheReader:
    """Read-only view of committed videos from every shard's manifest (never looks inside _tmp)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        if not os.path.exists(os.path.join(self.root, "zarr.json")):
            raise FileNotFoundError(f"{self.root}: not a latent cache (no zarr.json). Fix: run `longlive preprocess` "
                                    "into it or point data.path at the cache root")
        self.attrs = dict(zarr.open_group(self.root, mode="r").attrs)
        mdir = os.path.join(self.root, _MANIFEST)
        self.videos: list[dict] = []
        self.sources: list[dict] = []
        seen = set()
        for name in sorted(os.listdir(mdir)) if os.path.isdir(mdir) else []:
            if not name.endswith(".jsonl"):
                continue
            for rec in _read_jsonl(os.path.join(mdir, name)):
                if rec["type"] == "video" and rec["key"] not in seen:
                    seen.add(rec["key"])
                    self.videos.append(rec)
                elif rec["type"] == "source":
                    self.sources.append(rec)
        self.videos.sort(key=lambda r: (r["group"], r["key"]))
        self._by_key = {v["key"]: v for v in self.videos}
        self._open = functools.lru_cache(maxsize=4096)(self._open_uncached)  # committed groups never change
        self.sources.sort(key=lambda r: r["source"])

    def __len__(self) -> int:
        return len(self.videos)

    def keys(self) -> list[str]:
        return [v["key"] for v in self.videos]

    def group(self, rec_or_key: dict | str) -> zarr.Group:
        rec = rec_or_key if isinstance(rec_or_key, dict) else self._by_key[rec_or_key]
        return self._open(rec["group"], rec["key"])

    def _open_uncached(self, group: str, key: str) -> zarr.Group:
        return zarr.open_group(os.path.join(self.root, group, key), mode="r")

    def read_latents(self, rec_or_key: dict | str, frames: slice = slice(None)) -> torch.Tensor:
        """Latents `[C, F, h, w]` (or the latent-frame range `frames`), restored to their stored dtype."""
        a = self.group(rec_or_key)["latents"]
        return from_stored(a[:, frames], a.attrs["dtype"])

    def read_text(self, rec_or_key: dict | str) -> torch.Tensor:
        """Text embeddings `[S, L, D]`, one per shot."""
        a = self.group(rec_or_key)["text"]
        return from_stored(a[...], a.attrs["dtype"])

    def read_attrs(self, rec_or_key: dict | str) -> dict:
        return dict(self.group(rec_or_key).attrs)

    def read(self, rec_or_key: dict | str, frames: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(latents of `frames`, text, attrs) of one video, opening its group once."""
        g = self.group(rec_or_key)
        lat, txt = g["latents"], g["text"]
        return (from_stored(lat[:, frames], lat.attrs["dtype"]), from_stored(txt[...], txt.attrs["dtype"]),
                dict(g.attrs))

    def iter_videos(self) -> Iterator[dict]:
        yield from self.videos


def build_dataset(cfg):
    """`data.source == 'zarr'` hook of `dataloaders.latent_dataset`: the cache at `data.path` as a dataset."""
    from .zarr_dataset import ZarrLatentDataset

    return ZarrLatentDataset(cfg.data.path)
