"""Prompt schedules: which prompt conditions which chunks, from the command line or a prompt file.

A schedule is a list of segments `(start_chunk, prompt)`; a segment lasts until the next one starts.
Sources (every error names the file and line, or the --prompt argument, and the fix):

* command line: `--prompt "a red square slides right@0" --prompt "a blue circle moves down@4"`
  (`TEXT@CHUNK`; a single prompt may omit `@0`);
* `.jsonl`, ours: one segment per line, `{"start_chunk": 0, "prompt": "..."}`;
* `.jsonl`, LongLive's: one video per line, `{"prompts": ["...", "..."], "switch_frame_indices": [40]}`
  (switch indices in latent frames, as LongLive; they may instead come from the caller, as LongLive's
  config gives them); `index` picks the line;
* `.yaml` / `.yml`: a list of `{start_chunk: 0, prompt: "..."}` mappings;
* `.txt`, ours: lines `START_CHUNK: prompt`, `#` comments and blank lines ignored (chosen when the first
  non-comment line starts with `DIGITS:`; every line must then have that form);
* `.txt`, LongLive's: one video per line, the line is that video's prompt for all its chunks; blank lines and
  `#` comments are skipped (as LongLive skips blank lines, so `index` counts prompt lines);
* a directory, LongLive's multi-shot cases: `DIR/caption/<case>/` (or `DIR/<case>/`, or DIR itself being
  one case folder) holding one JSON file per shot, `0.json, 1.json, ...` (numbering from 0 or 1, no gaps;
  `global.json` is ignored), each `{"caption": "..."}`, plus an optional `shot_durations.txt` with one
  duration in chunks per shot (integers separated by spaces, commas or newlines). Without it every shot
  lasts `chunks_per_shot` chunks, or, when that is 0, the video's chunks are split evenly over the shots
  (earlier shots get the remainder), as LongLive does. `index` picks the case (case folders sorted by name).
  Every shot after the first starts a new shot (`PromptSegment.new_shot`) and its prompt gets
  `scene_cut_prefix` (LongLive: "The scene transitions. ") in front, as LongLive marks scene cuts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

import yaml

FORMATS = (".jsonl", ".yaml", ".yml", ".txt", "a LongLive case directory")
SCENE_CUT_PREFIX = "The scene transitions. "     # LongLive's DEFAULT_SCENE_CUT_PREFIX


@dataclasses.dataclass(frozen=True)
class PromptSegment:
    """Chunks start_chunk, start_chunk + 1, ... (until the next segment) are conditioned on `prompt`."""

    start_chunk: int
    prompt: str
    where: str = ""
    """Where the segment was written (file:line or the --prompt argument), for error messages."""
    new_shot: bool = False
    """The segment starts a new shot (a scene cut): the engine replaces the shot sink there."""


def _segment(start, prompt, where: str, new_shot: bool = False) -> PromptSegment:
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"{where}: start chunk must be an integer >= 0, got {start!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: empty prompt. Fix: write the text of the segment")
    return PromptSegment(start, prompt.strip(), where, new_shot)


def parse_cli_prompts(items: Sequence[str]) -> list[PromptSegment]:
    """`TEXT@CHUNK` arguments -> segments. A lone prompt without `@CHUNK` starts at chunk 0."""
    segments = []
    for n, item in enumerate(items, 1):
        where = f"--prompt #{n} ({item!r})"
        match = re.fullmatch(r"(.*)@\s*(\d+)\s*", item, flags=re.S)
        if match:
            segments.append(_segment(int(match.group(2)), match.group(1), where))
        elif len(items) == 1:
            segments.append(_segment(0, item, where))
        else:
            raise ValueError(f"{where}: with several prompts each needs its start chunk. Fix: write TEXT@CHUNK, "
                             f"e.g. 'a red square@0'")
    return segments


def _longlive_segments(entry: dict, where: str, chunk_frames: int,
                       switch_frame_indices: Sequence[int] | None) -> list[PromptSegment]:
    prompts = entry["prompts"]
    if not isinstance(prompts, list) or not prompts:
        raise ValueError(f"{where}: 'prompts' must be a non-empty list of strings")
    switches = entry.get("switch_frame_indices", switch_frame_indices)
    if switches is None:
        switches = []
    if isinstance(switches, str):
        switches = [int(s) for s in switches.split(",") if s.strip()]
    if len(switches) != len(prompts) - 1:
        raise ValueError(f"{where}: {len(prompts)} prompts need {len(prompts) - 1} switch_frame_indices, got "
                         f"{list(switches)}. Fix: give one switch index (latent frame) per prompt after the first")
    starts = [0]
    for frame in switches:
        if not isinstance(frame, int) or frame % chunk_frames:
            raise ValueError(f"{where}: switch frame {frame!r} is not a multiple of infer.chunk_frames={chunk_frames}"
                             f". Fix: switch on chunk boundaries (latent frames {chunk_frames}, {2 * chunk_frames}, ...)")
        starts.append(frame // chunk_frames)
    return [_segment(s, p, where) for s, p in zip(starts, prompts)]


def _load_jsonl(path: str, chunk_frames: int, index: int, switch_frame_indices) -> list[PromptSegment]:
    segments, videos = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected a JSON object")
            if "prompts" in entry:
                videos.append((entry, where))  # converted below, only the selected video
            elif {"start_chunk", "prompt"} <= set(entry):
                segments.append(_segment(entry["start_chunk"], entry["prompt"], where))
            else:
                raise ValueError(f"{where}: expected {{\"start_chunk\": N, \"prompt\": \"...\"}} or LongLive's "
                                 f"{{\"prompts\": [...]}}, got keys {sorted(entry)}")
    if segments and videos:
        raise ValueError(f"{path}: mixes segment lines and LongLive 'prompts' lines. Fix: use one format per file")
    if videos:
        if not 0 <= index < len(videos):
            raise ValueError(f"{path}: prompt index {index} out of range (the file holds {len(videos)} videos)")
        return _longlive_segments(*videos[index], chunk_frames, switch_frame_indices)
    return segments


def _load_yaml(path: str) -> list[PromptSegment]:
    with open(path) as f:
        try:
            root = yaml.compose(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    if root is None:
        return []
    if not isinstance(root, yaml.SequenceNode):
        raise ValueError(f"{path}:{root.start_mark.line + 1}: expected a list of {{start_chunk, prompt}} entries")
    segments = []
    for node in root.value:
        where = f"{path}:{node.start_mark.line + 1}"
        entry = yaml.safe_load(yaml.serialize(node))
        if not isinstance(entry, dict) or not {"start_chunk", "prompt"} <= set(entry):
            raise ValueError(f"{where}: each entry needs start_chunk and prompt, got {entry!r}")
        segments.append(_segment(entry["start_chunk"], entry["prompt"], where))
    return segments


_CHUNK_LINE = re.compile(r"(\d+)\s*:(.*)", flags=re.S)


def _load_txt(path: str, index: int) -> list[PromptSegment]:
    """Ours (`START_CHUNK: prompt` lines) or LongLive's (one video's prompt per line), by the first line."""
    with open(path, encoding="utf-8") as f:
        lines = [(n, line.strip()) for n, line in enumerate(f, 1)]
    lines = [(n, text) for n, text in lines if text and not text.startswith("#")]
    if not lines:
        return []
    if not _CHUNK_LINE.fullmatch(lines[0][1]):              # LongLive: one sample per line
        if not 0 <= index < len(lines):
            raise ValueError(f"{path}: prompt index {index} out of range (the file holds {len(lines)} prompt lines; "
                             f"blank lines and # comments are skipped)")
        n, text = lines[index]
        return [_segment(0, text, f"{path}:{n}")]
    segments = []
    for n, text in lines:
        match = _CHUNK_LINE.fullmatch(text)
        if not match:
            raise ValueError(f"{path}:{n}: expected 'START_CHUNK: prompt', got {text!r}")
        segments.append(_segment(int(match.group(1)), match.group(2), f"{path}:{n}"))
    return segments


def _case_folder(path: str, index: int) -> str:
    """A LongLive prompt directory -> the case folder holding the shot JSON files."""
    if any(f.endswith(".json") for f in os.listdir(path)):
        return path                                          # DIR is one case folder
    root = os.path.join(path, "caption") if os.path.isdir(os.path.join(path, "caption")) else path
    cases = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not cases:
        raise ValueError(f"{path}: a prompt directory needs per-shot caption JSON files (0.json, 1.json, ...) in it "
                         f"or in case folders DIR/caption/<case>/ or DIR/<case>/; found none")
    if not 0 <= index < len(cases):
        raise ValueError(f"{root}: prompt index {index} out of range (it holds {len(cases)} case folders: "
                         f"{', '.join(cases[:5])}{', ...' if len(cases) > 5 else ''})")
    return os.path.join(root, cases[index])


def _shot_captions(folder: str) -> list[tuple[str, str]]:
    """(caption, file) per shot of a case folder, in shot order; the numbering must have no gaps."""
    numbered = {}
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext != ".json" or name == "global.json":
            continue
        if not stem.isdigit():
            raise ValueError(f"{os.path.join(folder, name)}: shot caption files are numbered (0.json, 1.json, ...). "
                             f"Fix: rename it or move it out of {folder}")
        numbered[int(stem)] = os.path.join(folder, name)
    if not numbered:
        raise ValueError(f"{folder}: no shot caption files (0.json, 1.json, ...) found")
    base = 0 if 0 in numbered else 1
    missing = [i for i in range(base, max(numbered) + 1) if i not in numbered]
    if missing:
        raise ValueError(f"{folder}: shot caption numbering has a gap: {missing[0]}.json is missing (found "
                         f"{', '.join(f'{i}.json' for i in sorted(numbered))}). Fix: number the shots "
                         f"{base}, {base + 1}, ... without gaps")
    shots = []
    for i in sorted(numbered):
        file = numbered[i]
        try:
            with open(file, encoding="utf-8") as f:
                entry = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(entry, dict) or "caption" not in entry:
            raise ValueError(f"{file}: expected a JSON object with a \"caption\" field")
        shots.append((entry["caption"], file))
    return shots


def _shot_durations(folder: str, num_shots: int, chunks_per_shot: int, num_chunks: int | None) -> list[int]:
    """Chunks per shot: shot_durations.txt, else chunks_per_shot, else an even split of num_chunks."""
    file = os.path.join(folder, "shot_durations.txt")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            parts = f.read().replace(",", " ").split()
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"{file}: durations must be positive integers (chunks per shot), got {parts}")
        if len(parts) != num_shots:
            raise ValueError(f"{file}: {len(parts)} durations for {num_shots} shots ({num_shots} caption files in "
                             f"{folder}). Fix: give one duration (in chunks) per shot")
        return [int(p) for p in parts]
    if chunks_per_shot > 0:
        return [chunks_per_shot] * num_shots
    if num_chunks is None:
        raise ValueError(f"{folder}: no shot_durations.txt, so the shots split the video evenly, which needs the video "
                         f"length. Fix: pass num_chunks, set infer.chunks_per_shot, or add shot_durations.txt")
    if num_shots > num_chunks:
        raise ValueError(f"{folder}: {num_shots} shots do not fit in {num_chunks} chunks. Fix: raise infer.num_chunks "
                         f"or add shot_durations.txt")
    base, extra = divmod(num_chunks, num_shots)
    return [base + (i < extra) for i in range(num_shots)]


def _load_case_dir(path: str, index: int, chunks_per_shot: int, num_chunks: int | None,
                   scene_cut_prefix: str) -> list[PromptSegment]:
    folder = _case_folder(path, index)
    shots = _shot_captions(folder)
    durations = _shot_durations(folder, len(shots), chunks_per_shot, num_chunks)
    segments, start = [], 0
    for i, ((caption, file), duration) in enumerate(zip(shots, durations)):
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{file}: empty caption. Fix: write the shot's text in its \"caption\" field")
        text = caption.strip() if i == 0 else scene_cut_prefix + caption.strip()
        segments.append(_segment(start, text, f"{file} (shot {i}, chunks {start}..{start + duration - 1})", i > 0))
        start += duration
    return segments


def load_prompt_file(path: str | os.PathLike, chunk_frames: int = 1, index: int = 0,
                     switch_frame_indices: Sequence[int] | None = None, num_chunks: int | None = None,
                     chunks_per_shot: int = 0, scene_cut_prefix: str = SCENE_CUT_PREFIX) -> list[PromptSegment]:
    """Read a prompt file (format by extension) or a LongLive case directory -> segments (not yet checked).

    index: which video of a multi-video file / which case folder. num_chunks, chunks_per_shot and
    scene_cut_prefix only matter for case directories (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: prompt file not found. Fix: check the path")
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        segments = _load_case_dir(path, index, chunks_per_shot, num_chunks, scene_cut_prefix)
    elif ext == ".jsonl":
        segments = _load_jsonl(path, chunk_frames, index, switch_frame_indices)
    elif ext in (".yaml", ".yml"):
        segments = _load_yaml(path)
    elif ext == ".txt":
        segments = _load_txt(path, index)
    else:
        raise ValueError(f"{path}: unknown prompt file format {ext!r}. Fix: use one of {', '.join(FORMATS)}")
    if not segments:
        raise ValueError(f"{path}: no prompts found")
    return segments


def check_schedule(segments: Sequence[PromptSegment], num_chunks: int) -> list[PromptSegment]:
    """Validate a schedule against the video length: starts at chunk 0, strictly increasing, inside the video."""
    if not segments:
        raise ValueError("no prompt given. Fix: pass --prompt TEXT or --prompt-file FILE")
    if segments[0].start_chunk != 0:
        raise ValueError(f"{segments[0].where}: the first segment starts at chunk {segments[0].start_chunk}, but "
                         f"chunk 0 needs a prompt. Fix: start the first segment at chunk 0")
    for prev, seg in zip(segments, segments[1:]):
        if seg.start_chunk <= prev.start_chunk:
            raise ValueError(f"{seg.where}: segment starts at chunk {seg.start_chunk}, overlapping the segment of "
                             f"{prev.where} (chunk {prev.start_chunk}). Fix: give segments increasing start chunks")
    for seg in segments:
        if seg.start_chunk >= num_chunks:
            raise ValueError(f"{seg.where}: start chunk {seg.start_chunk} is beyond the video ({num_chunks} chunks, "
                             f"0..{num_chunks - 1}). Fix: lower it or raise infer.num_chunks")
    return list(segments)


def prompt_changes(segments: Sequence[PromptSegment]) -> dict[int, str]:
    """{start_chunk: prompt} for the chunks where the prompt changes."""
    return {s.start_chunk: s.prompt for s in segments}
