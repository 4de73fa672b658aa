"""Per-shot captions from a manifest (JSONL or CSV) or a pluggable captioner, merged per video.

Manifest rows name a video (`path`, relative to the manifest or absolute) and a time range with its
caption. Accepted shapes:

* JSONL, one video per line with a `shots` list (the synthetic generator's format):
  `{"path": "a.mp4", "fps": 8, "shots": [{"start_frame": 0, "end_frame": 5, "caption": "..."}]}`
  (`start`/`end` in seconds work too);
* JSONL, one shot per line: `{"path": "a.mp4", "start": 0.0, "end": 2.5, "caption": "..."}`;
* CSV with a header `path,start,end,caption` (seconds).

A detected shot takes the caption whose range overlaps it most. The merged description lists the shots
in time order with their boundaries in latent-chunk units, the unit the trainer switches prompts in.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Protocol

import numpy as np


class Captioner(Protocol):
    """Produces a caption for a shot when the manifest has none (e.g. a VLM wrapper)."""

    name: str

    def caption(self, frames: np.ndarray, path: str, start_s: float, end_s: float) -> str: ...


class CaptionIndex:
    """Time-ranged captions per video file, loaded from a JSONL/CSV manifest."""

    def __init__(self, manifest: str = ""):
        self.entries: dict[str, list[tuple[float, float, str]]] = {}
        if manifest:
            self._load(manifest)

    @staticmethod
    def _key(path: str) -> str:
        return os.path.normpath(os.path.abspath(path))

    def _add(self, base: str, path: str, start: float, end: float, caption: str, where: str) -> None:
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{where}: empty caption. Fix: give every shot a non-empty caption")
        if not end > start:
            raise ValueError(f"{where}: shot end {end} <= start {start}. Fix: end must exceed start")
        full = path if os.path.isabs(path) else os.path.join(base, path)
        self.entries.setdefault(self._key(full), []).append((float(start), float(end), caption.strip()))

    def _load(self, manifest: str) -> None:
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"data.captions: caption manifest {manifest!r} not found. Fix: point it at a "
                                    "JSONL or CSV file, or leave it empty to use a captioner")
        base = os.path.dirname(os.path.abspath(manifest))
        if manifest.endswith(".csv"):
            with open(manifest, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                missing = {"path", "start", "end", "caption"} - set(reader.fieldnames or [])
                if missing:
                    raise ValueError(f"{manifest}: CSV header lacks {sorted(missing)}. Fix: use path,start,end,caption")
                for i, row in enumerate(reader, start=2):
                    self._add(base, row["path"], float(row["start"]), float(row["end"]), row["caption"],
                              f"{manifest}:{i}")
        else:
            with open(manifest, encoding="utf-8") as fh:
                for i, line in enumerate(fh, start=1):
                    if line.strip():
                        self._add_json(base, line, f"{manifest}:{i}")
        for spans in self.entries.values():
            spans.sort()

    def _add_json(self, base: str, line: str, where: str) -> None:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg}). Fix: one JSON object per line") from None
        if "path" not in row:
            raise ValueError(f"{where}: no 'path' field. Fix: name the video file in 'path'")
        shots = row.get("shots", [row])
        for shot in shots:
            if "start_frame" in shot:
                fps = shot.get("fps", row.get("fps"))
                if not fps:
                    raise ValueError(f"{where}: start_frame/end_frame need an 'fps' field. Fix: add fps to the row")
                start, end = shot["start_frame"] / fps, shot["end_frame"] / fps
            elif "start" in shot and "end" in shot:
                start, end = shot["start"], shot["end"]
            else:
                raise ValueError(f"{where}: a shot needs start/end (seconds) or start_frame/end_frame. Fix: add them")
            self._add(base, row["path"], start, end, shot.get("caption", ""), where)

    def spans(self, path: str) -> list[tuple[float, float, str]]:
        """The manifest's (start_s, end_s, caption) shots of `path`, in time order (empty if none)."""
        return list(self.entries.get(self._key(path), []))

    def lookup(self, path: str, start_s: float, end_s: float) -> str | None:
        """The caption overlapping [start_s, end_s) most, or None when the video has no entry there."""
        spans = self.entries.get(self._key(path), [])
        best, best_overlap = None, 0.0
        for s, e, cap in spans:
            overlap = min(e, end_s) - max(s, start_s)
            if overlap > best_overlap:
                best, best_overlap = cap, overlap
        return best


def latent_frame_of(pixel_frame: int, temporal_stride: int = 4) -> int:
    """First latent frame starting at or after `pixel_frame` (latent 0 = pixel 0; latent j = pixels 4j-3..4j)."""
    return 0 if pixel_frame <= 0 else (pixel_frame + temporal_stride - 1) // temporal_stride


def shot_chunks(shot_starts: list[int], num_chunks: int, chunk_frames: int, temporal_stride: int = 4
                ) -> list[tuple[int, int, int]]:
    """Snap shots (pixel start frames, first one 0) to latent chunks: [(shot index, chunk start, chunk end)].

    A shot that would cover no whole chunk after snapping is merged into its predecessor (dropped here).
    """
    out: list[tuple[int, int, int]] = []
    for i, p in enumerate(shot_starts):
        c = 0 if i == 0 else int(round(latent_frame_of(p, temporal_stride) / chunk_frames))
        c = min(c, num_chunks)
        if out and c <= out[-1][1]:
            continue
        if out:
            out[-1] = (out[-1][0], out[-1][1], c)
        out.append((i, c, num_chunks))
    return [s for s in out if s[2] > s[1]]


def merge_description(captions: list[str], chunk_ranges: list[tuple[int, int]]) -> str:
    """Ordered multi-shot description: 'Shot 1 [chunks 0-2]: ... Shot 2 [chunks 3-5]: ...'."""
    return " ".join(f"Shot {i + 1} [chunks {a}-{b - 1}]: {c.rstrip('.')}." for i, (c, (a, b))
                    in enumerate(zip(captions, chunk_ranges)))
