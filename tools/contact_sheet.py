"""Render a video as a contact sheet: N evenly spaced frames in a grid PNG, each labelled with its index and time.

    python -m tools.contact_sheet outputs/tiny.mp4 --out sheet.png                 # 8 frames, 4 columns
    python -m tools.contact_sheet video.mp4 --out strip.png --frames 6 --cols 6   # one row: a PNG strip
    python -m tools.contact_sheet video.mp4 --out sheet.png --tile-width 160

Frames are decoded with PyAV; frame i of T is picked at round(i * (T - 1) / (N - 1)). Tiles keep the video's
pixels unless --tile-width resizes them (aspect kept). Layout: `pad` pixels of gap around every tile, and a
label band of `label_height` pixels under each tile ("#index  seconds"). A JSON sidecar (PNG name + .json)
lists each tile's frame index, time and pixel box.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

BACKGROUND = (24, 24, 24)
LABEL_COLOR = (235, 235, 235)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where tile k sits: column k % cols, row k // cols."""

    cols: int
    rows: int
    tile_w: int
    tile_h: int
    label_h: int
    pad: int

    def origin(self, k: int) -> tuple[int, int]:
        """(x, y) of tile k's top-left pixel."""
        col, row = k % self.cols, k // self.cols
        return (self.pad + col * (self.tile_w + self.pad),
                self.pad + row * (self.tile_h + self.label_h + self.pad))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the sheet."""
        return (self.pad + self.cols * (self.tile_w + self.pad),
                self.pad + self.rows * (self.tile_h + self.label_h + self.pad))


def pick_indices(total: int, count: int) -> list[int]:
    """`count` evenly spaced frame indices of `total` frames (all frames when count >= total)."""
    if total < 1:
        raise ValueError("the video has no frames")
    if count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def _count_frames(path: str) -> int:
    import av

    with av.open(path) as c:
        stream = c.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for p in c.demux(stream) if p.size)


def read_frames(path: str, indices: list[int]) -> tuple[list[np.ndarray], list[float]]:
    """The frames at `indices` as [H, W, 3] uint8 and their presentation times in seconds."""
    import av

    want, frames, times = set(indices), [], []
    with av.open(path) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i in want:
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(float(frame.time) if frame.time is not None else float("nan"))
            if len(frames) == len(want):
                break
    return frames, times


def render_sheet(frames: list[np.ndarray], labels: list[str] | None, cols: int, tile_width: int | None = None,
                 pad: int = 2):
    """(PIL image, layout) of `frames` in a grid of `cols` columns, with `labels` under the tiles (or none)."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = frames[0].shape[:2]
    tile_w = tile_width or w
    tile_h = max(1, round(h * tile_w / w))
    font = ImageFont.load_default()
    label_h = 0
    if labels:
        top, bottom = font.getbbox("#0 0.00s")[1::2]
        label_h = bottom - top + 4
    cols = max(1, min(cols, len(frames)))
    layout = Layout(cols, -(-len(frames) // cols), tile_w, tile_h, label_h, pad)
    sheet = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for k, frame in enumerate(frames):
        tile = Image.fromarray(frame)
        if tile.size != (tile_w, tile_h):
            tile = tile.resize((tile_w, tile_h), Image.LANCZOS)
        x, y = layout.origin(k)
        sheet.paste(tile, (x, y))
        if labels:
            draw.text((x + 1, y + tile_h + 1), labels[k], fill=LABEL_COLOR, font=font)
    return sheet, layout


def contact_sheet(video: str, out: str, num_frames: int = 8, cols: int = 4, tile_width: int | None = None,
                  timestamps: bool = True, pad: int = 2) -> dict:
    """Write the sheet PNG and its JSON sidecar; returns the sidecar's content."""
    if not os.path.isfile(video):
        raise FileNotFoundError(f"{video}: video file not found")
    try:
        total = _count_frames(video)
    except Exception as e:  # noqa: BLE001 - PyAV raises many types for unreadable files
        raise ValueError(f"{video}: cannot read as a video ({type(e).__name__}: {e})") from None
    indices = pick_indices(total, num_frames)
    frames, times = read_frames(video, indices)
    if not frames:
        raise ValueError(f"{video}: no frame could be decoded")
    indices = indices[:len(frames)]
    labels = [f"#{i} {t:.2f}s" for i, t in zip(indices, times)] if timestamps else None
    sheet, layout = render_sheet(frames, labels, cols, tile_width, pad)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    sheet.save(out)
    meta = {"video": os.path.abspath(video), "num_video_frames": total, "size": list(layout.size),
            "layout": dataclasses.asdict(layout),
            "tiles": [{"frame": i, "time_s": t, "box": [*layout.origin(k), layout.tile_w, layout.tile_h]}
                      for k, (i, t) in enumerate(zip(indices, times))]}
    with open(out + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", help="Video file (mp4, ...).")
    parser.add_argument("--out", required=True, help="Output PNG (a JSON sidecar OUT.json is written beside it).")
    parser.add_argument("--frames", type=int, default=8, help="How many frames (default 8).")
    parser.add_argument("--cols", type=int, default=4, help="Columns of the grid (= --frames for a one-row strip).")
    parser.add_argument("--tile-width", type=int, default=None, help="Resize tiles to this width (default: native).")
    parser.add_argument("--pad", type=int, default=2, help="Gap between tiles in pixels.")
    parser.add_argument("--no-timestamps", action="store_true", help="No label band under the tiles.")


def run(args: argparse.Namespace) -> int:
    for name in ("frames", "cols"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.tile_width is not None and args.tile_width < 8:
        raise ValueError(f"--tile-width must be >= 8 pixels, got {args.tile_width}")
    if args.pad < 0:
        raise ValueError(f"--pad must be >= 0, got {args.pad}")
    if not args.out.lower().endswith(".png"):
        raise ValueError(f"--out {args.out}: give a .png path")
    meta = contact_sheet(args.video, args.out, args.frames, args.cols, args.tile_width, not args.no_timestamps,
                         args.pad)
    print(f"wrote {os.path.abspath(args.out)} ({len(meta['tiles'])} of {meta['num_video_frames']} frames, "
          f"{meta['size'][0]}x{meta['size'][1]} px)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ._cli import run_tool

    return run_tool("contact_sheet", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
