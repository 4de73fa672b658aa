"""The dataset protocol the trainer consumes, a `.pt`/in-memory implementation, and a resumable loader.

An item is a dict: 'latents' [C, F, H, W] float (VAE-normalised latents), 'text' [L, text_dim] (text
encoder output, padded), 'caption' str; multi-shot items add 'texts' [S, L, text_dim] (one caption per
shot) and 'frame_shot' [F] (the shot of every latent frame) or the Zarr cache's 'chunk_shot' [num_chunks]. Sources are registered by `data.source` name; `build_dataset`
looks one up. `synthetic` is provided by `dataloaders/synthetic.py`, which must define
`build_dataset(cfg: RunConfig) -> LatentDataset`. `LatentLoader` shuffles per epoch from a seed,
shards indices over data-parallel ranks, crops clips to the configured latent frames, and its
position (epoch, index, seed) is a small state dict that checkpoints restore exactly.
"""
from __future__ import annotations

import os
from typing import Callable, Protocol, runtime_checkable

import torch

# VAE compression (temporal, spatial) per model.vae family.
VAE_STRIDES = {"wan2.1": (4, 8), "wan2.2": (4, 16)}


@runtime_checkable
class LatentDataset(Protocol):
    """Map-style dataset of latent clips; `name` is used in error messages (a file path, a source)."""

    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...


class InMemoryLatentDataset:
    """Items held in memory: latents [N, C, F, H, W], text [N, L, text_dim], captions (N strings); optionally
    per-shot captions texts [N, S, L, text_dim] with frame_shot [N, F] (shot index of every latent frame)."""

    def __init__(self, latents: torch.Tensor, text: torch.Tensor, captions: list[str] | None = None,
                 name: str = "<memory>", texts: torch.Tensor | None = None, frame_shot: torch.Tensor | None = None):
        if latents.ndim != 5:
            raise ValueError(f"{name}: 'latents' must be [N, C, F, H, W], got shape {tuple(latents.shape)}. "
                             f"Fix: stack one [C, F, H, W] latent per video.")
        if text.ndim != 3 or text.shape[0] != latents.shape[0]:
            raise ValueError(f"{name}: 'text' must be [N, L, text_dim] with N={latents.shape[0]}, got "
                             f"{tuple(text.shape)}. Fix: one padded text-encoder output per video.")
        captions = list(captions) if captions is not None else [""] * latents.shape[0]
        if len(captions) != latents.shape[0]:
            raise ValueError(f"{name}: {len(captions)} captions for {latents.shape[0]} videos. "
                             f"Fix: give one caption per video.")
        if (texts is None) != (frame_shot is None):
            raise ValueError(f"{name}: 'texts' and 'frame_shot' come together (per-shot captions and the shot of "
                             f"every latent frame). Fix: give both or neither.")
        if texts is not None:
            n, f = latents.shape[0], latents.shape[2]
            if texts.ndim != 4 or texts.shape[0] != n or texts.shape[2:] != text.shape[1:]:
                raise ValueError(f"{name}: 'texts' must be [N={n}, S, L, text_dim] like 'text' {tuple(text.shape)}, "
                                 f"got {tuple(texts.shape)}. Fix: one padded text-encoder output per shot.")
            if frame_shot.shape != (n, f) or int(frame_shot.min()) < 0 or int(frame_shot.max()) >= texts.shape[1]:
                raise ValueError(f"{name}: 'frame_shot' must be [N={n}, F={f}] shot indices in [0, {texts.shape[1]}), "
                                 f"got shape {tuple(frame_shot.shape)}. Fix: the shot of every latent frame.")
        self.latents, self.text, self.captions, self.name = latents, text, captions, name
        self.texts, self.frame_shot = texts, frame_shot

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> dict:
        item = {"latents": self.latents[index], "text": self.text[index], "caption": self.captions[index]}
        if self.texts is not None:
            item["texts"], item["frame_shot"] = self.texts[index], self.frame_shot[index]
        return item


def random_latent_dataset(cfg, num_videos: int = 4, seed: int = 0, frames: int | None = None) -> InMemoryLatentDataset:
    """Fixed N(0, 1) latents and text shaped for `cfg` (a RunConfig): tests, benchmarks, golden curves.

    Not a video generator: a small fixed set the model can learn (memorise), drawn from `seed`.
    """
    f, h, w = latent_shape(cfg)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(num_videos, cfg.model.in_channels, frames or f, h, w, generator=g)
    text = torch.randn(num_videos, cfg.model.text_len, cfg.model.text_dim, generator=g)
    return InMemoryLatentDataset(latents, text, [f"random video {i}" for i in range(num_videos)], name="<random>")


def save_latent_file(path: str | os.PathLike, latents: torch.Tensor, text: torch.Tensor,
                     captions: list[str] | None = None, texts: torch.Tensor | None = None,
                     frame_shot: torch.Tensor | None = None) -> None:
    """Write a `.pt` latent file readable by `PtLatentDataset` (texts / frame_shot: optional per-shot captions)."""
    captions = list(captions) if captions is not None else [""] * latents.shape[0]
    blob = {"latents": latents.contiguous(), "text": text.contiguous(), "captions": captions}
    if texts is not None:
        blob["texts"], blob["frame_shot"] = texts.contiguous(), frame_shot.long().contiguous()
    torch.save(blob, path)


class PtLatentDataset(InMemoryLatentDataset):
    """A `.pt` file holding {'latents': [N, C, F, H, W], 'text': [N, L, text_dim], 'captions': [...]}."""

    def __init__(self, path: str | os.PathLike):
        path = str(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.path: latent file {path!r} not found. Fix: point data.path at a .pt "
                                    f"file written by dataloaders.latent_dataset.save_latent_file.")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        missing = [k for k in ("latents", "text") if k not in blob]
        if missing:
            raise ValueError(f"{path}: missing field(s) {missing}. Fix: write the file with save_latent_file().")
        super().__init__(blob["latents"], blob["text"], blob.get("captions"), name=path, texts=blob.get("texts"),
                         frame_shot=blob.get("frame_shot"))


# ----- sources --------------------------------------------------------------------------------------

_SOURCES: dict[str, Callable] = {}


def register_source(name: str):
    """Decorator: register `factory(cfg: RunConfig) -> LatentDataset` under `data.source == name`."""
    def wrap(factory):
        _SOURCES[name] = factory
        return factory
    return wrap


@register_source("synthetic")
def _synthetic(cfg):
    """Moving coloured shapes, rendered, VAE- and text-encoded once, cached as a `.pt` latent file."""
    from .synthetic import build_dataset as synthetic_dataset

    return synthetic_dataset(cfg)


@register_source("zarr")
def _zarr(cfg):
    """A Zarr latent cache directory (dataloaders.zarr_cache), or a `.pt` latent file (tests, small runs)."""
    if cfg.data.path.endswith(".pt"):
        return PtLatentDataset(cfg.data.path)
    from .zarr_cache import build_dataset as zarr_dataset

    return zarr_dataset(cfg)


def build_dataset(cfg) -> LatentDataset:
    """The dataset for `cfg.data.source` (a RunConfig)."""
    if cfg.data.source not in _SOURCES:
        raise ValueError(f"data.source={cfg.data.source!r} has no latent dataset. "
                         f"Fix: use one of {', '.join(sorted(_SOURCES))}.")
    return _SOURCES[cfg.data.source](cfg)


# ----- shapes ---------------------------------------------------------------------------------------

def latent_shape(cfg) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) asked for by cfg.data and cfg.model.vae."""
    st, ss = VAE_STRIDES[cfg.model.vae]
    return 1 + (cfg.data.num_frames - 1) // st, cfg.data.height // ss, cfg.data.width // ss


def check_item(item: dict, index: int, dataset_name: str, cfg) -> None:
    """Clear errors for items that cannot serve the configured clip (file / field / fix)."""
    frames, h, w = latent_shape(cfg)
    lat = item["latents"]
    st, ss = VAE_STRIDES[cfg.model.vae]
    if lat.ndim != 4 or lat.shape[0] != cfg.model.in_channels:
        raise ValueError(f"{dataset_name}: item {index} 'latents' has shape {tuple(lat.shape)}, expected "
                         f"[C={cfg.model.in_channels}, F, H, W]. Fix: encode with the model.vae={cfg.model.vae!r} VAE.")
    if lat.shape[1] < frames:
        have = 1 + (lat.shape[1] - 1) * st
        raise ValueError(f"{dataset_name}: item {index} holds {lat.shape[1]} latent frames ({have} pixel frames) but "
                         f"data.num_frames={cfg.data.num_frames} needs {frames} latent frames. "
                         f"Fix: set data.num_frames <= {have} or use longer clips.")
    if tuple(lat.shape[2:]) != (h, w):
        raise ValueError(f"{dataset_name}: item {index} latents are {tuple(lat.shape[2:])} (H, W) but "
                         f"data.height x data.width = {cfg.data.height}x{cfg.data.width} needs ({h}, {w}). "
                         f"Fix: set data.height={lat.shape[2] * ss} data.width={lat.shape[3] * ss}.")
    if item["text"].ndim != 2 or item["text"].shape[1] != cfg.model.text_dim:
        raise ValueError(f"{dataset_name}: item {index} 'text' has shape {tuple(item['text'].shape)}, expected "
                         f"[L, text_dim={cfg.model.text_dim}]. Fix: encode captions with the model's text encoder.")


# ----- loader ---------------------------------------------------------------------------------------

def item_frame_shot(item: dict) -> torch.Tensor:
    """[F] shot index of every latent frame of a multi-shot item ('frame_shot', or the Zarr 'chunk_shot')."""
    if "frame_shot" in item:
        return item["frame_shot"].long()
    chunk_shot, frames = item["chunk_shot"].long(), item["latents"].shape[1]
    if tuple(item.get("chunk_range", (0, len(chunk_shot)))) != (0, len(chunk_shot)) or frames % len(chunk_shot):
        raise ValueError(f"item {item.get('key', '')!r}: 'chunk_shot' covers {len(chunk_shot)} chunks but the item "
                         f"holds {frames} latent frames of chunks {item.get('chunk_range')}. Fix: load whole videos "
                         f"(sp_size=1) for the single-process loader.")
    return chunk_shot.repeat_interleave(frames // len(chunk_shot))


def stack_shot_texts(items: list[dict], frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-shot captions of a batch: texts [B, S_max, L, D] (zero-padded shots) and frame_shot [B, frames]."""
    num = max(it["texts"].shape[0] for it in items)
    first = items[0]["texts"]
    texts = torch.zeros(len(items), num, *first.shape[1:], dtype=torch.float32)
    for i, it in enumerate(items):
        texts[i, :it["texts"].shape[0]] = it["texts"].float()
    return texts, torch.stack([item_frame_shot(it)[:frames] for it in items])


class LatentLoader:
    """Endless, resumable batches: per-epoch shuffle from `seed`, DP sharding, latent-frame crop.

    Each rank sees indices perm[rank::world] of epoch e's permutation (drop-last to equal lengths), in
    batches of `batch_size`; `state_dict()` = (epoch, index, seed) restores the exact position.
    """

    def __init__(self, dataset: LatentDataset, batch_size: int, num_latent_frames: int, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, check=None):
        self.dataset, self.batch_size, self.frames = dataset, batch_size, num_latent_frames
        self.seed, self.shuffle, self.rank, self.world = seed, shuffle, rank, world_size
        self.epoch, self.index = 0, 0
        self.check = check
        self.per_rank = len(dataset) // world_size
        if self.per_rank < batch_size:
            raise ValueError(f"{dataset.name}: {len(dataset)} videos over {world_size} data-parallel rank(s) is fewer "
                             f"than train.micro_batch={batch_size}. Fix: lower train.micro_batch or add videos.")

    def _order(self) -> torch.Tensor:
        n = len(self.dataset)
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        else:
            perm = torch.arange(n)
        return perm[: self.per_rank * self.world][self.rank::self.world]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.index + self.batch_size > self.per_rank:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order()[self.index:self.index + self.batch_size].tolist()
        self.index += self.batch_size
        items = []
        for i in order:
            item = self.dataset[i]
            if self.check is not None:
                self.check(item, i)
            items.append(item)
        batch = {"latents": torch.stack([it["latents"][:, :self.frames] for it in items]).float(),
                 "text": torch.stack([it["text"] for it in items]).float(),
                 "caption": [it["caption"] for it in items], "index": order}
        if all("texts" in it for it in items):
            batch["texts"], batch["frame_shot"] = stack_shot_texts(items, self.frames)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"resume: the checkpoint's data seed {state['seed']} differs from data.seed={self.seed}. "
                             f"Fix: resume with the same data.seed.")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
