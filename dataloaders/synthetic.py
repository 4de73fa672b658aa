"""Synthetic multi-shot training videos: moving coloured shapes with captions derived from what is drawn.

Every video has `num_shots` shots; each shot has its own background and one or two shapes that move
in a straight line ("a red square slides right and a blue circle moves down on a black background").
Videos are written as real mp4 files (PyAV, yuv420p) plus a JSONL manifest, one line per video:

    {"path": "video_0000.mp4", "fps": 8.0, "num_frames": 13, "height": 64, "width": 64,
     "shots": [{"start_frame": 0, "end_frame": 5, "caption": "..."}, ...]}

`end_frame` is exclusive; `path` is relative to the manifest. Shot boundaries fall on pixel frames
1 + 4k, the first frames of the Wan VAE's latent frames, so every shot covers whole latent frames.
Everything is a deterministic function of (seed, video index). The decoder here is deliberately small
(PyAV -> [3, T, H, W] in [-1, 1]); the data pipeline's decoders replace it for real videos.
`build_dataset(cfg)` is the trainer's `data.source: synthetic`: videos -> VAE latents + text embeddings,
cached as a `.pt` latent file beside the videos (keyed by everything that changes the result).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from megatron_longlive.config import DataConfig
from megatron_longlive.inference.video_writer import Mp4Writer, read_mp4

COLORS = {"red": (230, 30, 30), "green": (30, 200, 60), "blue": (40, 70, 240), "yellow": (240, 220, 30),
          "magenta": (220, 40, 220), "cyan": (30, 220, 230), "white": (245, 245, 245), "orange": (250, 140, 20)}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (110, 110, 110), "dark blue": (10, 20, 80), "dark green": (10, 60, 20)}
SHAPES = ("square", "circle", "triangle")
# motion name -> unit direction (dx, dy) in image coordinates (y down)
MOTIONS = {"slides right": (1, 0), "slides left": (-1, 0), "moves down": (0, 1), "moves up": (0, -1)}
MANIFEST = "manifest.jsonl"


@dataclasses.dataclass(frozen=True)
class MovingShape:
    """One shape moving linearly from `start` to `end` (pixel centres) over a shot."""

    shape: str
    color: str
    motion: str
    size: float
    start: tuple[float, float]
    end: tuple[float, float]

    def caption(self) -> str:
        return f"a {self.color} {self.shape} {self.motion}"


def _draw(canvas: np.ndarray, obj: MovingShape, frac: float) -> None:
    """Draw `obj` at fraction `frac` of its path into canvas [H, W, 3] uint8, in place."""
    h, w, _ = canvas.shape
    cx = obj.start[0] + (obj.end[0] - obj.start[0]) * frac
    cy = obj.start[1] + (obj.end[1] - obj.start[1]) * frac
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    r = obj.size / 2
    if obj.shape == "square":
        inside = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    elif obj.shape == "circle":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    else:  # upward triangle: apex at the top, base at the bottom of the bounding box
        rel = (yy - (cy - r)) / (2 * r)  # 0 at apex, 1 at base
        inside = (rel >= 0) & (rel <= 1) & (np.abs(xx - cx) <= rel * r)
    canvas[inside] = COLORS[obj.color]


def _random_shot(rng: np.random.Generator, height: int, width: int) -> tuple[str, list[MovingShape]]:
    background = str(rng.choice(list(BACKGROUNDS)))
    num_objects = int(rng.integers(1, 3))
    colors = rng.choice(list(COLORS), size=num_objects, replace=False)
    objects = []
    for color in colors:
        shape, motion = str(rng.choice(SHAPES)), str(rng.choice(list(MOTIONS)))
        size = float(rng.uniform(0.2, 0.3) * min(height, width))
        lo_x, hi_x, lo_y, hi_y = size / 2, width - size / 2, size / 2, height - size / 2
        dx, dy = MOTIONS[motion]
        travel = 0.6
        # start on the side the motion leaves from, at a random cross-position
        x0 = float(rng.uniform(lo_x, hi_x)) if dx == 0 else (lo_x if dx > 0 else hi_x)
        y0 = float(rng.uniform(lo_y, hi_y)) if dy == 0 else (lo_y if dy > 0 else hi_y)
        x1 = x0 + dx * travel * (hi_x - lo_x)
        y1 = y0 + dy * travel * (hi_y - lo_y)
        objects.append(MovingShape(shape, str(color), motion, size, (x0, y0), (x1, y1)))
    return background, objects


def shot_boundaries(num_frames: int, num_shots: int) -> list[tuple[int, int]]:
    """Pixel-frame ranges [start, end) of the shots, starting on latent-frame boundaries (1 + 4k)."""
    num_latent = (num_frames - 1) // 4 + 1
    if num_shots > num_latent:
        raise ValueError(f"data.num_shots={num_shots} exceeds the {num_latent} latent frames of num_frames="
                         f"{num_frames}. Fix: lower data.num_shots or raise data.num_frames")
    latent_starts = [round(k * num_latent / num_shots) for k in range(num_shots)]
    starts = [0 if s == 0 else 4 * s - 3 for s in latent_starts]
    return list(zip(starts, starts[1:] + [num_frames]))


def render_video(seed: int, index: int, height: int, width: int, num_frames: int, num_shots: int
                 ) -> tuple[np.ndarray, list[dict]]:
    """Frames [T, H, W, 3] uint8 and shot records {start_frame, end_frame, caption} of video `index`."""
    rng = np.random.default_rng([seed, index])
    frames = np.zeros((num_frames, height, width, 3), dtype=np.uint8)
    shots = []
    for start, end in shot_boundaries(num_frames, num_shots):
        background, objects = _random_shot(rng, height, width)
        for f in range(start, end):
            frames[f] = BACKGROUNDS[background]
            frac = (f - start) / max(1, end - start - 1)
            for obj in objects:
                _draw(frames[f], obj, frac)
        caption = " and ".join(o.caption() for o in objects) + f" on a {background} background"
        shots.append({"start_frame": start, "end_frame": end, "caption": caption})
    return frames, shots


def generate_dataset(out_dir: str | os.PathLike, data: DataConfig, num_videos: int | None = None,
                     progress: bool = True) -> str:
    """Write `num_videos` (default data.num_videos) mp4 files and the manifest; returns the manifest path."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    n = data.num_videos if num_videos is None else num_videos
    lines = []
    for i in tqdm(range(n), desc="synthetic videos", unit="video", disable=not progress):
        frames, shots = render_video(data.seed, i, data.height, data.width, data.num_frames, data.num_shots)
        name = f"video_{i:04d}.mp4"
        # per-process temporary names + atomic rename: ranks that build the same dataset at once never
        # see (or rename away) each other's half-written files
        tmp = os.path.join(out_dir, f".{name}.{os.getpid()}.tmp.mp4")
        with Mp4Writer(tmp, data.fps) as writer:
            writer.write(frames)
        os.replace(tmp, os.path.join(out_dir, name))
        lines.append({"path": name, "fps": data.fps, "num_frames": data.num_frames, "height": data.height,
                      "width": data.width, "shots": shots})
    manifest = os.path.join(out_dir, MANIFEST)
    tmp = manifest + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    os.replace(tmp, manifest)
    return manifest


_REQUIRED = {"path": str, "fps": (int, float), "num_frames": int, "shots": list}


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Parse a manifest; `path` entries become absolute. Errors name the file, line and field."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: manifest not found. Fix: run the synthetic generator or check the path")
    root = os.path.dirname(os.path.abspath(path))
    entries = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            for key, typ in _REQUIRED.items():
                if not isinstance(entry.get(key), typ):
                    raise ValueError(f"{path}:{lineno}: field {key!r} missing or not {typ}")
            for shot in entry["shots"]:
                if not {"start_frame", "end_frame", "caption"} <= set(shot):
                    raise ValueError(f"{path}:{lineno}: each shot needs start_frame, end_frame and caption")
            entry["path"] = os.path.join(root, entry["path"])
            entries.append(entry)
    return entries


def decode_video(path: str | os.PathLike, num_frames: int | None = None) -> torch.Tensor:
    """Decode the first `num_frames` frames (all when None) -> float32 [3, T, H, W] in [-1, 1]."""
    frames = read_mp4(path, num_frames)
    if num_frames is not None and len(frames) < num_frames:
        raise ValueError(f"{path}: asked for {num_frames} frames but the file holds {len(frames)}. "
                         f"Fix: lower data.num_frames to at most {len(frames)}")
    video = torch.from_numpy(frames).permute(3, 0, 1, 2)  # [3, T, H, W] uint8
    return video.float() / 127.5 - 1


class SyntheticVideoDataset(torch.utils.data.Dataset):
    """Videos of a manifest as {"video": [3, T, H, W] in [-1, 1], "shots": [...], "path": str}."""

    def __init__(self, manifest: str | os.PathLike, num_frames: int | None = None):
        self.entries = read_manifest(manifest)
        self.num_frames = num_frames
        if num_frames is not None:
            for e in self.entries:
                if e["num_frames"] < num_frames:
                    raise ValueError(f"{e['path']}: holds {e['num_frames']} frames but data.num_frames="
                                     f"{num_frames}. Fix: lower data.num_frames or regenerate the data")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        e = self.entries[i]
        shots = [s for s in e["shots"] if self.num_frames is None or s["start_frame"] < self.num_frames]
        return {"video": decode_video(e["path"], self.num_frames), "shots": shots, "path": e["path"]}


def _cache_key(cfg) -> str:
    d, m, inf = cfg.data, cfg.model, cfg.infer
    fields = dict(height=d.height, width=d.width, num_frames=d.num_frames, fps=d.fps, num_videos=d.num_videos,
                  num_shots=d.num_shots, seed=d.seed, vae=m.vae, text_dim=m.text_dim, text_len=m.text_len,
                  vae_path=inf.vae_path, text_encoder_path=inf.text_encoder_path, per_shot_texts=True)
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def build_dataset(cfg, progress: bool = True):
    """`data.source: synthetic` for the trainer (cfg: RunConfig): a latent dataset of the synthetic videos.

    Videos go to data.path (default: <train.output_dir>/synthetic_data); they are encoded with the VAE and
    text encoder that `longlive generate` uses (pipeline.load_encoders). 'text' is the first shot's caption;
    'texts' [N, S, L, D] holds every shot's caption and 'frame_shot' [N, F] the shot of every latent frame
    (multi-shot training: each chunk attends its own shot's caption, train.per_shot_text).
    """
    from dataloaders.latent_dataset import PtLatentDataset, save_latent_file
    from megatron_longlive.inference.pipeline import load_encoders

    root = cfg.data.path or os.path.join(cfg.train.output_dir, "synthetic_data")
    latent_file = os.path.join(root, f"latents_{_cache_key(cfg)}.pt")
    if os.path.isfile(latent_file):
        return PtLatentDataset(latent_file)
    manifest = generate_dataset(root, cfg.data, progress=progress)
    vae, text_encoder = load_encoders(cfg)
    latents = []
    with torch.no_grad():
        for entry in tqdm(read_manifest(manifest), desc="VAE encode", unit="video", disable=not progress):
            video = decode_video(entry["path"], cfg.data.num_frames)[None].to(vae.dtype)   # [1, 3, T, H, W]
            latents.append(vae.encode(video).float())
    entries = read_manifest(manifest)
    captions = [entry["shots"][0]["caption"] for entry in entries]
    text = text_encoder.encode(captions).float()
    texts, frame_shot = _shot_texts(entries, text_encoder, latents[0].shape[2])
    tmp = latent_file + f".tmp-{os.getpid()}"
    save_latent_file(tmp, torch.cat(latents), text, captions, texts=texts, frame_shot=frame_shot)
    os.replace(tmp, latent_file)
    return PtLatentDataset(latent_file)


def _shot_texts(entries: list[dict], text_encoder, num_latent_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every shot's caption encoded (texts [N, S, L, D], zero-padded shots) and frame_shot [N, F] latent frames."""
    from .captions import latent_frame_of

    num = max(len(e["shots"]) for e in entries)
    flat = text_encoder.encode([s["caption"] for e in entries for s in e["shots"]]).float()   # [sum S, L, D]
    texts = torch.zeros(len(entries), num, *flat.shape[1:])
    frame_shot = torch.zeros(len(entries), num_latent_frames, dtype=torch.long)
    k = 0
    for i, e in enumerate(entries):
        for j, shot in enumerate(e["shots"]):
            texts[i, j] = flat[k]
            k += 1
            frame_shot[i, min(latent_frame_of(shot["start_frame"]), num_latent_frames):] = j
    return texts, frame_shot
