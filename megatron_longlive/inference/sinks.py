"""The one visibility rule of long multi-shot video, shared by the streaming engine and teacher forcing (issue 8).

Chunk j plays exactly one role, fixed when it is committed:
  * "global": j < num_sink_chunks - the first chunk(s) of the video, kept for the whole video;
  * "shot":   among the first num_shot_sink_chunks non-global chunks of its shot - the shot sink; a new
              shot's first chunk(s) replace the previous shot's sink (the old sink chunks leave the context);
  * "window": every other chunk; the last num_window_chunks of them form the rolling window.
Chunk i attends (besides itself): all global chunks, the shot-sink chunks of its own shot, and the last
num_window_chunks window-role chunks before it (previous shots' recent chunks included). Window-role chunks
are never sinks, so the three sets are disjoint. `num_window_chunks=None` means an unbounded window.

The KV cache holds exactly `visible_chunks(i, ...)` when chunk i is computed (the engine asserts it), and
`training.teacher_forcing.tf_block_table(..., rule=...)` is built from the same function.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import Literal, Sequence

ChunkRole = Literal["global", "shot", "window"]


@dataclasses.dataclass(frozen=True)
class SinkRule:
    """Sizes in chunks (InferConfig's latent-frame sizes divided by chunk_frames)."""

    num_sink_chunks: int
    num_shot_sink_chunks: int = 0
    num_window_chunks: int | None = None

    def __post_init__(self):
        if self.num_sink_chunks < 0 or self.num_shot_sink_chunks < 0 or (self.num_window_chunks or 0) < 0:
            raise ValueError(f"SinkRule sizes must be >= 0, got {self}")

    @classmethod
    def from_layout(cls, layout) -> "SinkRule":
        """The rule of a `kv_cache.CacheLayout` (its regions, in chunks)."""
        return cls(layout.num_sink_chunks, layout.num_shot_sink_chunks, layout.num_window_chunks)


def normalize_shot_starts(shot_starts: Sequence[int]) -> list[int]:
    """Sorted distinct shot start chunks, always including 0 (the video's first shot)."""
    if any(s < 0 for s in shot_starts):
        raise ValueError(f"shot starts must be chunk indices >= 0, got {list(shot_starts)}")
    return sorted(set(shot_starts) | {0})


def shot_start_of(j: int, starts: list[int]) -> int:
    """Start chunk of the shot holding chunk j (starts normalized)."""
    return starts[bisect.bisect_right(starts, j) - 1]


def chunk_role(j: int, starts: list[int], rule: SinkRule) -> ChunkRole:
    """Role of chunk j (starts normalized by `normalize_shot_starts`)."""
    if j < rule.num_sink_chunks:
        return "global"
    first = max(shot_start_of(j, starts), rule.num_sink_chunks)     # first non-global chunk of j's shot
    return "shot" if j - first < rule.num_shot_sink_chunks else "window"


def visible_chunks(i: int, shot_starts: Sequence[int], rule: SinkRule) -> list[int]:
    """Earlier clean chunks that chunk i attends, ascending. Cost O(window + sinks * shots in reach), not O(i)."""
    starts = normalize_shot_starts(shot_starts)
    glob = list(range(min(i, rule.num_sink_chunks)))
    shot_first = max(shot_start_of(i, starts), rule.num_sink_chunks)
    shot = list(range(shot_first, min(i, shot_first + rule.num_shot_sink_chunks)))
    window: list[int] = []
    limit = rule.num_window_chunks
    j = i - 1
    while j >= rule.num_sink_chunks and (limit is None or len(window) < limit):
        if chunk_role(j, starts, rule) == "window":
            window.append(j)
        j -= 1
    return sorted(glob + shot + window)


def shot_starts_from_chunk_shot(chunk_shot: Sequence[int]) -> tuple[int, ...]:
    """Per-chunk shot ids (a data item's 'chunk_shot' [num_chunks], non-decreasing) -> shot start chunks."""
    ids = [int(s) for s in chunk_shot]
    if any(b < a for a, b in zip(ids, ids[1:])):
        raise ValueError(f"chunk_shot={ids} must be non-decreasing (shots are contiguous runs of chunks)")
    return tuple(i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1])
