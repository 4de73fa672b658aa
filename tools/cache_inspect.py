"""Inspect and validate a Zarr latent cache written by `longlive preprocess`.

    python -m tools.cache_inspect CACHE               # one row per video: shapes, dtypes, shots, captions
    python -m tools.cache_inspect CACHE --validate    # + manifests, chunk files, every chunk decodes
    python -m tools.cache_inspect CACHE --json        # the same as one JSON object

Validation reads every manifest line (a line that is not JSON or lacks a field is reported as FILE:LINE; the
torn last line of a killed writer is only a warning, as the loader ignores it), checks that each listed video
exists with the latent shape, chunking and shot count of its manifest line, that each chunk file is on disk
(a missing one would read as zeros) and decodes, and that the values are finite. Every problem is printed
with the path at fault; the exit status is 1 when there is any.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import zarr
from tqdm import tqdm

from dataloaders.zarr_cache import FORMAT, from_stored

REQUIRED = ("type", "key", "group", "latent_shape", "chunk_frames", "num_shots")
NOT_GROUPS = ("_manifest", "_tmp", "_reports")


@dataclasses.dataclass
class Finding:
    """One problem (or warning) with the file or directory it is about."""

    path: str
    reason: str


@dataclasses.dataclass
class CacheReport:
    root: str
    videos: list[dict]
    problems: list[Finding]
    warnings: list[Finding]

    def as_json(self) -> dict:
        return {"root": self.root, "videos": self.videos, "problems": [dataclasses.asdict(p) for p in self.problems],
                "warnings": [dataclasses.asdict(w) for w in self.warnings]}


def read_manifests(root: str) -> tuple[list[dict], list[Finding], list[Finding]]:
    """Video lines of every shard manifest (first wins on duplicates), problems, warnings."""
    mdir = os.path.join(root, "_manifest")
    videos: dict[str, dict] = {}
    problems, warnings = [], []
    if not os.path.isdir(mdir):
        return [], [Finding(mdir, "no _manifest directory: nothing was committed (or this is not a cache root)")], []
    for name in sorted(os.listdir(mdir)):
        if not name.endswith(".jsonl"):
            continue
        path = os.path.join(mdir, name)
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        for i, line in enumerate(lines, 1):
            where = f"{path}:{i}"
            if not line.endswith("\n") and i == len(lines):
                warnings.append(Finding(where, "torn last line (a killed writer); the loader ignores it"))
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(Finding(where, f"not JSON ({e.msg})"))
                continue
            if not isinstance(rec, dict) or "type" not in rec:
                problems.append(Finding(where, "not a manifest record (no 'type')"))
                continue
            if rec["type"] != "video":
                continue
            missing = [k for k in REQUIRED if k not in rec]
            if missing:
                problems.append(Finding(where, f"video line lacks {', '.join(missing)}"))
                continue
            if rec["key"] in videos:
                warnings.append(Finding(where, f"video {rec['key']} listed again (first line kept)"))
                continue
            videos[rec["key"]] = dict(rec, manifest=where)
    return sorted(videos.values(), key=lambda r: (r["group"], r["key"])), problems, warnings


def _chunk_problems(arr: zarr.Array, path: str, what: str) -> list[Finding]:
    """Every chunk of `arr` is on disk, decodes and holds finite values."""
    out = []
    grid = [-(-s // c) for s, c in zip(arr.shape, arr.chunks)]
    for coords in np.ndindex(*grid):
        rel = arr.metadata.encode_chunk_key(coords)
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            out.append(Finding(file, f"{what} chunk {coords} is missing (would read as zeros)"))
            continue
        sel = tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, arr.chunks))
        try:
            values = from_stored(arr[sel], arr.attrs.get("dtype", str(arr.dtype)))
        except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt chunk
            out.append(Finding(file, f"{what} chunk {coords} does not decode: {type(e).__name__}: {e}"))
            continue
        if values.is_floating_point() and not values.float().isfinite().all():
            out.append(Finding(file, f"{what} chunk {coords} holds NaN/Inf"))
    return out


def inspect_video(root: str, rec: dict, validate: bool) -> tuple[dict, list[Finding]]:
    """Row for one manifest video and its problems."""
    gpath = os.path.join(root, rec["group"], rec["key"])
    row = {"key": rec["key"], "group": rec["group"], "source": rec.get("source", ""),
           "duration_s": rec.get("duration_s", 0.0), "num_shots": rec["num_shots"]}
    if not os.path.isfile(os.path.join(gpath, "zarr.json")):
        return row, [Finding(gpath, f"listed in {rec['manifest']} but not on disk")]
    problems = []
    try:
        g = zarr.open_group(gpath, mode="r")
        lat, txt = g["latents"], g["text"]
    except Exception as e:  # noqa: BLE001
        return row, [Finding(gpath, f"cannot open the video group: {type(e).__name__}: {e}")]
    attrs = dict(g.attrs)
    row.update(latents_shape=list(lat.shape), latents_dtype=lat.attrs.get("dtype", str(lat.dtype)),
               text_shape=list(txt.shape), text_dtype=txt.attrs.get("dtype", str(txt.dtype)),
               chunk_frames=lat.chunks[1], captions=list(attrs.get("captions", [])),
               shot_chunks=attrs.get("shot_chunks", []))
    if not validate:
        return row, problems
    lp, tp = os.path.join(gpath, "latents"), os.path.join(gpath, "text")
    if list(lat.shape) != list(rec["latent_shape"]):
        problems.append(Finding(lp, f"shape {list(lat.shape)} != manifest {rec['latent_shape']} ({rec['manifest']})"))
    if lat.chunks[1] != rec["chunk_frames"]:
        problems.append(Finding(lp, f"chunked by {lat.chunks[1]} latent frames != manifest chunk_frames "
                                    f"{rec['chunk_frames']}"))
    if txt.shape[0] != rec["num_shots"]:
        problems.append(Finding(tp, f"{txt.shape[0]} text rows != manifest num_shots {rec['num_shots']}"))
    if len(row["captions"]) != txt.shape[0]:
        problems.append(Finding(os.path.join(gpath, "zarr.json"),
                                f"{len(row['captions'])} captions for {txt.shape[0]} shots"))
    problems += _chunk_problems(lat, lp, "latents") + _chunk_problems(txt, tp, "text")
    return row, problems


def inspect_cache(root: str, validate: bool = False, progress: bool = True) -> CacheReport:
    root = os.path.abspath(root)
    if not os.path.isfile(os.path.join(root, "zarr.json")):
        raise FileNotFoundError(f"{root}: not a latent cache (no zarr.json). Fix: pass the directory given to "
                                "`longlive preprocess --out`")
    report = CacheReport(root, [], [], [])
    fmt = zarr.open_group(root, mode="r").attrs.get("format")
    if fmt != FORMAT:
        report.problems.append(Finding(os.path.join(root, "zarr.json"), f"format {fmt!r}, expected {FORMAT!r}"))
    videos, problems, report.warnings = read_manifests(root)
    report.problems += problems
    for rec in tqdm(videos, desc="validate" if validate else "inspect", unit="video", disable=not progress):
        row, problems = inspect_video(root, rec, validate)
        row["ok"] = not problems
        report.videos.append(row)
        report.problems += problems
    if validate:
        listed = {(v["group"], v["key"]) for v in videos}
        for group in sorted(os.listdir(root)):
            gdir = os.path.join(root, group)
            if group in NOT_GROUPS or not os.path.isdir(gdir):
                continue
            for key in sorted(os.listdir(gdir)):
                if os.path.isdir(os.path.join(gdir, key)) and (group, key) not in listed:
                    report.warnings.append(Finding(os.path.join(gdir, key), "on disk but in no manifest (the next "
                                                   "`longlive preprocess` of its shard adds it)"))
    return report


def format_table(report: CacheReport, width: int = 60) -> str:
    header = ("key", "group", "latents", "text", "shots", "seconds", "captions")
    rows = []
    for v in report.videos:
        caps = " | ".join(v.get("captions", []))
        rows.append((v["key"], v["group"], f"{v.get('latents_shape', '?')} {v.get('latents_dtype', '')}",
                     f"{v.get('text_shape', '?')} {v.get('text_dtype', '')}", str(v["num_shots"]),
                     f"{v['duration_s']:.2f}", caps if len(caps) <= width else caps[:width - 3] + "..."))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache", help="Cache root (the --out directory of `longlive preprocess`).")
    parser.add_argument("--validate", action="store_true", help="Check manifests and decode every chunk.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of the table.")
    parser.add_argument("--caption-width", type=int, default=60, help="Truncate the captions column (table only).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def run(args: argparse.Namespace) -> int:
    if args.caption_width < 10:
        raise ValueError(f"--caption-width {args.caption_width} is too small; use 10 or more")
    report = inspect_cache(args.cache, args.validate, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(format_table(report, args.caption_width))
        for w in report.warnings:
            print(f"WARNING {w.path}: {w.reason}")
        for p in report.problems:
            print(f"CORRUPT {p.path}: {p.reason}")
        checked = "validated" if args.validate else "listed (run with --validate to decode every chunk)"
        print(f"{len(report.videos)} video(s) {checked}; {len(report.problems)} problem(s), "
              f"{len(report.warnings)} warning(s)")
    return 1 if report.problems else 0


def main(argv: list[str] | None = None) -> int:
    from ._cli import run_tool

    return run_tool("cache_inspect", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
