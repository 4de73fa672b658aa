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
* `.txt`: lines `START_CHUNK: prompt`, `#` comments and blank lines ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

import yaml

FORMATS = (".jsonl", ".yaml", ".yml", ".txt")


@dataclasses.dataclass(frozen=True)
class PromptSegment:
    """Chunks start_chunk, start_chunk + 1, ... (until the next segment) are conditioned on `prompt`."""

    start_chunk: int
    prompt: str
    where: str = ""
    """Where the segment was written (file:line or the --prompt argument), for error messages."""


def _segment(start, prompt, where: str) -> PromptSegment:
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"{where}: start chunk must be an integer >= 0, got {start!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: empty prompt. Fix: write the text of the segment")
    return PromptSegment(start, prompt.strip(), where)


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


def _load_txt(path: str) -> list[PromptSegment]:
    segments = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            match = re.fullmatch(r"(\d+)\s*:(.*)", text)
            if not match:
                raise ValueError(f"{path}:{lineno}: expected 'START_CHUNK: prompt', got {text!r}")
            segments.append(_segment(int(match.group(1)), match.group(2), f"{path}:{lineno}"))
    return segments


def load_prompt_file(path: str | os.PathLike, chunk_frames: int = 1, index: int = 0,
                     switch_frame_indices: Sequence[int] | None = None) -> list[PromptSegment]:
    """Read a prompt file in any supported format (by extension) -> segments (not yet checked)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: prompt file not found. Fix: check the path")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        segments = _load_jsonl(path, chunk_frames, index, switch_frame_indices)
    elif ext in (".yaml", ".yml"):
        segments = _load_yaml(path)
    elif ext == ".txt":
        segments = _load_txt(path)
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
