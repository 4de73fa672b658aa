"""Training loader over the Zarr latent cache: duration buckets, DP sharding, Balanced-SP chunk reads, prefetch.

`ZarrLatentDataset` is a map-style dataset in the trainer's protocol (`dataloaders/latent_dataset.py`):
item = {'latents' [C, F, h, w], 'text' [L, D], 'caption', ...}. With `sp_size > 1` an item holds only
the latent chunks Balanced SP assigns to `sp_rank` (`distributed/balanced_sp.rank_chunks`), and only
those Zarr chunks are read from disk (latents are stored one latent chunk per Zarr chunk). Text is
replicated: 'texts' [S, L, D] holds every shot's embedding and 'chunk_shot' [num_chunks] maps each
(global) chunk to its shot, so a prompt switch happens exactly at a shot boundary.

`OnlineVideoDataset` is the online mode: the same items straight from video files, decoded and VAE-encoded
per item; an SP rank encodes only its own chunks plus a left halo (`models/wan/vae_halo.py`), which gives
the latents of encoding the whole clip.

`ZarrLoader` batches items of one duration group and latent size together (cropped to the shortest
in the batch, in whole SP-divisible chunks), shuffles per epoch from a seed, gives DP rank r every
dp_size-th batch, and reads ahead in a background thread. Its (epoch, step) state restores exactly.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from megatron_longlive.distributed.balanced_sp import TFLayout, rank_chunks

from . import captions as cap
from .decode import get_decoder
from .preprocess import PreprocessOptions, frames_to_pixels, list_videos, manifest_shots
from .zarr_cache import CacheReader


def sp_chunk_range(num_chunks: int, chunk_frames: int, sp_rank: int, sp_size: int) -> range:
    """Chunks of a `num_chunks`-chunk clip held by `sp_rank` under Balanced SP (contiguous, equal counts)."""
    layout = TFLayout(num_chunks=num_chunks, chunk_frames=chunk_frames, tokens_per_frame=1, sp_size=sp_size)
    layout.check_even()
    return rank_chunks(layout, sp_rank)


class ZarrLatentDataset:
    """Committed videos of a cache as training items (optionally one SP rank's chunks, optionally cropped)."""

    def __init__(self, root: str, num_chunks: int | None = None, sp_rank: int = 0, sp_size: int = 1,
                 groups: list[str] | None = None, dtype: torch.dtype | None = torch.float32):
        self.reader = CacheReader(root)
        self.name = self.reader.root
        self.videos = [v for v in self.reader.videos if groups is None or v["group"] in groups]
        if not self.videos:
            raise ValueError(f"{root}: the cache holds no committed videos{f' in groups {groups}' if groups else ''}. "
                             "Fix: run `longlive preprocess` into it (see its _reports/ for rejections)")
        self.num_chunks, self.sp_rank, self.sp_size, self.dtype = num_chunks, sp_rank, sp_size, dtype
        if num_chunks is not None:
            short = [v["key"] for v in self.videos if v["num_latent_frames"] // v["chunk_frames"] < num_chunks]
            if short:
                raise ValueError(f"{root}: {len(short)} video(s) hold fewer than {num_chunks} latent chunks "
                                 f"(e.g. {short[0]}). Fix: ask for fewer frames or select longer duration groups")

    def __len__(self) -> int:
        return len(self.videos)

    def chunks_of(self, index: int) -> int:
        v = self.videos[index]
        return v["num_latent_frames"] // v["chunk_frames"]

    def get(self, index: int, num_chunks: int | None = None) -> dict:
        """Item `index`, cropped to `num_chunks` (default: the dataset's crop, else the whole video)."""
        v = self.videos[index]
        cf = v["chunk_frames"]
        n = num_chunks or self.num_chunks or self.chunks_of(index)
        local = sp_chunk_range(n, cf, self.sp_rank, self.sp_size)
        # latents [C, f_local, h, w] of this rank's chunks only; texts [S, L, D]
        latents, texts, attrs = self.reader.read(v, slice(local.start * cf, local.stop * cf))
        chunk_shot = torch.zeros(n, dtype=torch.long)
        for s, (c0, c1) in enumerate(attrs["shot_chunks"]):
            chunk_shot[min(c0, n):min(c1, n)] = s
        if self.dtype is not None:
            latents, texts = latents.to(self.dtype), texts.to(self.dtype)
        shots_in = sorted(set(chunk_shot.tolist()))
        return {"latents": latents, "text": texts[0], "texts": texts, "chunk_shot": chunk_shot,
                "caption": attrs["description"] if len(shots_in) > 1 else attrs["captions"][0],
                "captions": attrs["captions"], "key": v["key"], "group": v["group"],
                "chunk_range": (local.start, local.stop), "num_chunks": n}

    def __getitem__(self, index: int) -> dict:
        return self.get(index)


def pixel_range(latent_start: int, latent_stop: int, temporal_stride: int = 4) -> tuple[int, int]:
    """Pixel frames [start, end) behind latent frames [latent_start, latent_stop) of the causal Wan VAE."""
    start = 0 if latent_start == 0 else temporal_stride * latent_start - (temporal_stride - 1)
    return start, temporal_stride * (latent_stop - 1) + 1


class OnlineVideoDataset:
    """Items decoded and encoded on the fly from a video folder (no cache, no filters: curated input).

    Shots come from the caption manifest (`opts.captions`, default `<folder>/manifest.jsonl`); a video it
    does not list is one shot with an empty caption unless a captioner is given.
    """

    def __init__(self, folder: str, opts: PreprocessOptions, vae, text_encoder, num_chunks: int | None = None,
                 sp_rank: int = 0, sp_size: int = 1, halo: int = -1, device: str = "cpu",
                 captioner: cap.Captioner | None = None):
        import os

        self.files = list_videos(folder)
        if not self.files:
            raise ValueError(f"{folder}: no video files. Fix: point data.path at a folder of videos")
        self.name = folder
        manifest = opts.captions or os.path.join(folder, "manifest.jsonl")
        self.captions = cap.CaptionIndex(manifest if os.path.isfile(manifest) else "")
        self.decoder = get_decoder(opts.decoder, min_side=opts.min_source_side)
        self.opts, self.vae, self.text_encoder, self.device = opts, vae, text_encoder, device
        self.num_chunks, self.sp_rank, self.sp_size, self.halo, self.captioner = num_chunks, sp_rank, sp_size, halo, captioner

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        from megatron_longlive.models.wan.vae_halo import encode_frames_with_halo

        o, path = self.opts, self.files[index]
        video = self.decoder.decode(path, o.fps, o.buckets)
        cf = o.chunk_frames
        n = self.num_chunks or ((video.num_frames - 1) // 4 + 1) // cf
        used = pixel_range(0, n * cf)[1]
        if n < 1 or used > video.num_frames:
            raise ValueError(f"{path}: {video.num_frames} frames at {o.fps} fps cannot fill {n} chunk(s) of {cf} "
                             "latent frames. Fix: ask for fewer chunks or use longer videos")
        local = sp_chunk_range(n, cf, self.sp_rank, self.sp_size)
        start, end = pixel_range(local.start * cf, local.stop * cf)
        pixels = frames_to_pixels(video.frames[:used]).to(self.device)  # [1, 3, T, h, w]
        latents = encode_frames_with_halo(self.vae, pixels, start, end, self.halo)[0].cpu()  # [C, f_local, h', w']
        spans = self.captions.spans(path)
        shots = manifest_shots(spans, video.times[:used]) if spans else [(0, used)]
        snapped = cap.shot_chunks([s for s, _ in shots], n, cf)
        caps = []
        for i, _, _ in snapped:
            s, e = shots[i]
            c = self.captions.lookup(path, video.times[s], video.times[e - 1] + 1.0 / o.fps)
            if c is None and self.captioner is not None:
                c = self.captioner.caption(video.frames[s:e], path, video.times[s], video.times[e - 1] + 1.0 / o.fps)
            caps.append(c or "")
        texts = self.text_encoder.encode(caps).cpu()  # [S, L, D]
        chunk_shot = torch.zeros(n, dtype=torch.long)
        for k, (_, c0, c1) in enumerate(snapped):
            chunk_shot[c0:c1] = k
        ranges = [(c0, c1) for _, c0, c1 in snapped]
        return {"latents": latents, "text": texts[0], "texts": texts, "chunk_shot": chunk_shot,
                "caption": cap.merge_description(caps, ranges) if len(caps) > 1 else caps[0], "captions": caps,
                "key": path, "group": "online", "chunk_range": (local.start, local.stop), "num_chunks": n}


class ZarrLoader:
    """Endless batches bucketed by duration group and latent size, sharded over DP, with a prefetch thread."""

    def __init__(self, dataset: ZarrLatentDataset, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True, prefetch: int = 2):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.ds, self.batch_size, self.dp_rank, self.dp_size = dataset, batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.prefetch = seed, shuffle, prefetch
        self.buckets: dict[tuple, list[int]] = {}
        for i, v in enumerate(dataset.videos):
            self.buckets.setdefault((v["group"], *v["latent_shape"][2:]), []).append(i)
        self.epoch, self.step = 0, 0
        if not self._batches(0):
            sizes = {k[0]: len(v) for k, v in self.buckets.items()}
            raise ValueError(f"{dataset.name}: no duration bucket has {batch_size * dp_size} videos (batch {batch_size} x "
                             f"{dp_size} DP ranks); bucket sizes {sizes}. Fix: lower train.micro_batch or add videos")
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`: same-bucket index lists, equal count on every DP rank."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for key in sorted(self.buckets):
            idx = list(self.buckets[key])
            if self.shuffle:
                rng.shuffle(idx)
            batches += [idx[i:i + self.batch_size] for i in range(0, len(idx) - self.batch_size + 1, self.batch_size)]
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        usable = len(batches) - len(batches) % self.dp_size
        return batches[:usable][self.dp_rank::self.dp_size]

    def _load(self, batch: list[int]) -> dict:
        # crop to the shortest video of the batch, in whole chunks divisible by sp_size
        n = min(self.ds.num_chunks or self.ds.chunks_of(i) for i in batch)
        n -= n % self.ds.sp_size
        if n == 0:
            raise ValueError(f"{self.ds.name}: videos {batch} have fewer chunks than sp_size={self.ds.sp_size}")
        items = [self.ds.get(i, n) for i in batch]
        return {"latents": torch.stack([it["latents"] for it in items]),  # [B, C, f_local, h, w]
                "text": torch.stack([it["text"] for it in items]),  # [B, L, D]
                "texts": [it["texts"] for it in items], "chunk_shot": torch.stack([it["chunk_shot"] for it in items]),
                "caption": [it["caption"] for it in items], "key": [it["key"] for it in items],
                "index": batch, "chunk_range": items[0]["chunk_range"], "num_chunks": n}

    def _positions(self) -> Iterator[tuple[int, int, list[int]]]:
        epoch, step = self.epoch, self.step
        while True:
            batches = self._batches(epoch)
            while step < len(batches):
                yield epoch, step, batches[step]
                step += 1
            epoch, step = epoch + 1, 0

    def _worker(self, q: queue.Queue) -> None:
        try:
            for epoch, step, batch in self._positions():
                item = (epoch, step, self._load(batch))
                while not self._stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - surfaced in the consumer thread
            q.put(e)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.prefetch <= 0:
            batches = self._batches(self.epoch)
            if self.step >= len(batches):
                self.epoch, self.step = self.epoch + 1, 0
                batches = self._batches(self.epoch)
            out = self._load(batches[self.step])
            self.step += 1
            return out
        if self._thread is None:
            self._stop.clear()
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._worker, args=(self._queue,), daemon=True)
            self._thread.start()
        got = self._queue.get()
        if isinstance(got, BaseException):
            self.close()
            raise got
        epoch, step, batch = got
        self.epoch, self.step = epoch, step + 1
        return batch

    def close(self) -> None:
        """Stop the prefetch thread (a later `next` restarts it from the current position)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"resume: loader seed {state['seed']} differs from data.seed={self.seed}. "
                             "Fix: resume with the same data.seed")
        self.close()
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
