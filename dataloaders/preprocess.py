"""`longlive preprocess`: a folder of videos -> decode -> shots -> filters -> captions -> VAE + text encode -> Zarr.

Per source video: decode at `data.fps` into its resolution bucket, cut shots (HSV content detector),
score and filter each shot, join consecutive kept shots into segments, trim each segment to whole latent
chunks (1 + 4(n·chunk_frames - 1) pixel frames), caption its shots, encode, and commit one cache group per
segment. Every rejected video, shot or segment is recorded with a named reason; a failure in one video
never stops the run. Shards (`shard_index` of `num_shards`) take every num_shards-th file of the sorted
list, one writer each; a rerun skips sources its manifest marks done, so a killed run resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import traceback
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import captions as cap
from .decode import REASONS as DECODE_REASONS, VideoRejected, get_decoder
from .filters import REASONS as FILTER_REASONS, FilterThresholds, build_scorer, filter_shot
from .shots import ShotDetector
from .zarr_cache import CacheWriter, VideoRecord, duration_group

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".ts", ".flv", ".mpg", ".mpeg", ".wmv")
SEGMENT_REASONS = {
    "segment_too_short": "consecutive kept shots shorter than one latent chunk or the first duration group",
    "missing_caption": "no manifest caption overlaps the shot and no captioner is set",
    "processing_error": "an unexpected error while encoding or writing (message recorded)",
}
REASONS = {**DECODE_REASONS, **FILTER_REASONS, **SEGMENT_REASONS}


@dataclasses.dataclass
class PreprocessOptions:
    """Everything `preprocess` needs besides the models (built from DataConfig by `from_config`)."""

    fps: float = 8.0
    buckets: list[tuple[int, int]] = dataclasses.field(default_factory=lambda: [(64, 64)])
    chunk_frames: int = 1
    duration_groups: list[float] = dataclasses.field(default_factory=lambda: [16.0, 32.0, 64.0])
    decoder: str = "pyav"
    min_source_side: int = 64
    shot_threshold: float = 27.0
    thresholds: FilterThresholds = dataclasses.field(default_factory=FilterThresholds)
    quality_scorer: str = "default"
    quality_weights: str = ""
    captions: str = ""
    cache_dtype: str = "bfloat16"
    shots_from_manifest: bool = True
    """Use the caption manifest's shot boundaries when it lists the video; detect shots otherwise."""

    @classmethod
    def from_config(cls, data, chunk_frames: int) -> "PreprocessOptions":
        buckets = [tuple(b) for b in data.buckets] or [(data.height, data.width)]
        return cls(fps=data.fps, buckets=buckets, chunk_frames=chunk_frames, duration_groups=list(data.duration_groups),
                   decoder=data.decoder, min_source_side=data.min_source_side, shot_threshold=data.shot_threshold,
                   thresholds=FilterThresholds.from_overrides(data.filters), quality_scorer=data.quality_scorer,
                   quality_weights=data.quality_weights, captions=data.captions, cache_dtype=data.cache_dtype)


def list_videos(folder: str) -> list[str]:
    """Video files under `folder` (recursive, by extension), sorted by relative path."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a directory. Fix: pass the folder holding the videos")
    out = []
    for dirpath, dirnames, files in os.walk(folder):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in files if f.lower().endswith(VIDEO_EXTENSIONS)]
    return sorted(out, key=lambda p: os.path.relpath(p, folder))


def video_key(relpath: str, segment: int) -> str:
    """Stable, unique group name: sanitised stem + hash of the relative path + segment index."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(relpath)[0])[-48:].strip("_") or "video"
    return f"{stem}-{hashlib.sha1(relpath.encode()).hexdigest()[:8]}-s{segment}"


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha1 of all parameters and buffers (name, dtype, bytes): identifies the exact weights used."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def manifest_shots(spans: list[tuple[float, float, str]], times: np.ndarray) -> list[tuple[int, int]]:
    """Manifest shot starts (seconds) -> frame ranges over the sampled timeline `times` (covering all of it)."""
    starts = sorted({int(np.searchsorted(times, s - 1e-6)) for s, _, _ in spans[1:]} - {0})
    cuts = [0] + [c for c in starts if c < len(times)] + [len(times)]
    return list(zip(cuts[:-1], cuts[1:]))


def _segments(keep: list[bool], shots: list[tuple[int, int]]) -> list[list[int]]:
    """Runs of consecutive kept shot indices."""
    runs, cur = [], []
    for i, k in enumerate(keep):
        if k:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


class Preprocessor:
    """Holds the models and writer of one shard; `run(files)` processes them, skipping finished ones."""

    def __init__(self, out: str, opts: PreprocessOptions, vae, text_encoder, shard_index: int = 0,
                 num_shards: int = 1, captioner: cap.Captioner | None = None, device: str = "cpu",
                 input_root: str | None = None):
        self.opts, self.vae, self.text_encoder, self.captioner, self.device = opts, vae, text_encoder, captioner, device
        self.shard_index, self.num_shards = shard_index, num_shards
        self.input_root = input_root
        self.writer = CacheWriter(out, opts.duration_groups, shard_index, num_shards)
        self.decoder = get_decoder(opts.decoder, min_side=opts.min_source_side)
        self.detector = ShotDetector(threshold=opts.shot_threshold,
                                     min_shot_frames=max(1, int(round(opts.thresholds.min_shot_seconds * opts.fps))))
        self.scorer = build_scorer(opts.quality_scorer, opts.quality_weights, device)
        self.captions = cap.CaptionIndex(opts.captions)
        self.dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[opts.cache_dtype]
        self.vae_id = f"{type(vae).__name__}:{getattr(vae, 'kind', '?')}:{module_fingerprint(vae)}"
        self.text_id = f"{type(text_encoder).__name__}:{module_fingerprint(text_encoder)}"

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.input_root) if self.input_root else os.path.abspath(path)

    # -- one source -------------------------------------------------------------------------------------------
    def process(self, path: str) -> None:
        source = self._rel(path)
        if self.writer.source_done(source):
            return
        rejected: list[dict] = []
        notes: list[dict] = []
        committed: list[str] = []
        try:
            committed = self._process(path, source, rejected, notes)
        except VideoRejected as e:
            rejected.append({"what": "video", "reason": e.reason, "detail": e.detail})
        except Exception as e:  # noqa: BLE001 - one bad video must not stop the run; the report names it
            rejected.append({"what": "video", "reason": "processing_error",
                             "detail": f"{type(e).__name__}: {e} @ {traceback.format_exc(limit=-1).strip()}"})
        self.writer.finish_source(source, committed, rejected, notes)

    def _process(self, path: str, source: str, rejected: list[dict], notes: list[dict]) -> list[str]:
        o = self.opts
        video = self.decoder.decode(path, o.fps, o.buckets)
        notes += [{"reason": r, "detail": d} for r, d in video.notes]
        frames = video.frames  # [T, h, w, 3] uint8
        spans = self.captions.spans(path) if o.shots_from_manifest else []
        shots = manifest_shots(spans, video.times) if spans else self.detector.detect(frames)
        keep, scores = [], []
        for i, (a, b) in enumerate(shots):
            reasons, s = filter_shot(frames[a:b], o.fps, o.thresholds, video.info.fps, self.scorer)
            scores.append(s)
            keep.append(not reasons)
            rejected += [{"what": f"shot {i} (frames {a}-{b})", "reason": r, "detail": ""} for r in reasons]
        committed = []
        for seg_i, run in enumerate(_segments(keep, shots)):
            key = self._segment(path, source, seg_i, video, [shots[i] for i in run], [scores[i] for i in run],
                                rejected, notes)
            if key:
                committed.append(key)
        return committed

    def _segment(self, path, source, seg_i, video, shots, scores, rejected, notes) -> str | None:
        o = self.opts
        a = shots[0][0]
        n = shots[-1][1] - a
        stride = 4
        num_chunks = ((n - 1) // stride + 1) // o.chunk_frames if n > 0 else 0
        used = 1 + stride * (num_chunks * o.chunk_frames - 1) if num_chunks else 0
        what = f"segment {seg_i} (frames {a}-{a + n})"
        group = duration_group(used / o.fps, o.duration_groups) if used else None
        if group is None:
            rejected.append({"what": what, "reason": "segment_too_short",
                             "detail": f"{used / o.fps:.2f}s usable < {o.duration_groups[0]}s or < one chunk"})
            return None
        # captions per shot, boundaries snapped to latent chunks
        times = video.times
        caps = []
        for s, e in shots:
            c = self.captions.lookup(path, times[s], times[e - 1] + 1.0 / o.fps)
            if c is None and self.captioner is not None:
                c = self.captioner.caption(video.frames[s:e], path, times[s], times[e - 1] + 1.0 / o.fps)
            if c is None:
                rejected.append({"what": what, "reason": "missing_caption",
                                 "detail": f"shot frames {s}-{e} ({times[s]:.2f}-{times[e - 1]:.2f}s)"})
                return None
            caps.append(c)
        snapped = cap.shot_chunks([s - a for s, _ in shots], num_chunks, o.chunk_frames, stride)
        if len(snapped) < len(shots):
            notes.append({"reason": "shot_merged", "detail": f"{len(shots) - len(snapped)} shot(s) shorter than a "
                          f"chunk after snapping in {what}"})
        shot_caps = [caps[i] for i, _, _ in snapped]
        chunk_ranges = [(c0, c1) for _, c0, c1 in snapped]
        # encode
        pixels = frames_to_pixels(video.frames[a:a + used]).to(self.device)  # [1, 3, T, h, w] in [-1, 1]
        latents = self.vae.encode(pixels)[0].to("cpu", self.dtype)  # [C, F, h', w']
        text = self.text_encoder.encode(shot_caps).to("cpu", self.dtype)  # [S, L, D]
        assert latents.shape[1] == num_chunks * o.chunk_frames, (latents.shape, num_chunks)
        key = video_key(source, seg_i)
        info = video.info
        attrs: dict[str, Any] = {
            "source": source, "fps": o.fps, "resolution": list(video.frames.shape[1:3]),
            "source_resolution": [info.height, info.width], "source_fps": info.fps, "source_codec": info.codec,
            "source_pix_fmt": info.pix_fmt, "vae_id": self.vae_id, "text_encoder_id": self.text_id,
            "start_s": float(times[a]), "duration_s": used / o.fps, "num_frames": used,
            "frame_range": [int(a), int(a + used)], "num_chunks": num_chunks, "shot_chunks": chunk_ranges,
            "captions": shot_caps, "description": cap.merge_description(shot_caps, chunk_ranges),
            "filter_scores": [{k: round(float(v), 6) for k, v in s.items()} for s in scores],
            "notes": list(notes),
        }
        self.writer.write_video(VideoRecord(key, group, latents, text, o.chunk_frames, attrs))
        return key

    # -- many sources ------------------------------------------------------------------------------------------
    def run(self, files: list[str], progress: bool = True) -> dict:
        mine = files[self.shard_index::self.num_shards]
        for path in tqdm(mine, desc=f"preprocess {self.writer.shard}", unit="video", disable=not progress):
            self.process(path)
        return self.report([self._rel(p) for p in mine])

    def report(self, sources: list[str] | None = None) -> dict:
        """Summary of this shard: committed videos, rejections and notes with reasons, counts per reason."""
        recs = [self.writer.sources[s] for s in (sources or sorted(self.writer.sources)) if s in self.writer.sources]
        rejected = [{"source": r["source"], **x} for r in recs for x in r["rejected"]]
        notes = [{"source": r["source"], **x} for r in recs for x in r["notes"]]
        counts: dict[str, int] = {}
        for x in rejected:
            counts[x["reason"]] = counts.get(x["reason"], 0) + 1
        return {"shard": self.writer.shard, "num_sources": len(recs),
                "num_videos": sum(len(r["committed"]) for r in recs),
                "sources_rejected": sorted(r["source"] for r in recs if not r["committed"]),
                "reason_counts": dict(sorted(counts.items())), "rejected": rejected, "notes": notes,
                "reasons": {k: REASONS.get(k, "") for k in sorted(counts)}}


def preprocess(input_dir: str, out: str, opts: PreprocessOptions, vae, text_encoder, shard_index: int = 0,
               num_shards: int = 1, captioner: cap.Captioner | None = None, device: str = "cpu",
               report_path: str | None = None, progress: bool = True) -> dict:
    """Library entry of `longlive preprocess`: returns the report (also written as JSON to `report_path`)."""
    files = list_videos(input_dir)  # fail on a wrong input before creating anything
    if not opts.captions:
        default = os.path.join(input_dir, "manifest.jsonl")
        opts = dataclasses.replace(opts, captions=default if os.path.isfile(default) else "")
    pre = Preprocessor(out, opts, vae, text_encoder, shard_index, num_shards, captioner, device, input_root=input_dir)
    report = pre.run(files, progress=progress)
    report_path = report_path or os.path.join(out, "_reports", f"{pre.writer.shard}.json")
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    tmp = report_path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=1, sort_keys=True)
    os.replace(tmp, report_path)
    return report


def frames_to_pixels(frames: np.ndarray) -> torch.Tensor:
    """RGB uint8 `[T, h, w, 3]` -> `[1, 3, T, h, w]` float in [-1, 1] (what `preprocess` feeds the VAE)."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
