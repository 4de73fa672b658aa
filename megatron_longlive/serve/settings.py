"""Limits and pacing of the live viewer (no heavy imports: the CLI parser reads the defaults)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ServeSettings:
    """Limits and pacing of the viewer."""

    max_prompt_chars: int = 500
    """Longest accepted prompt (characters)."""
    min_switch_interval_s: float = 1.0
    """At most one prompt switch per this many seconds per session."""
    max_sessions: int = 1
    """Concurrent viewers; more are told the viewer is busy."""
    max_lead_s: float = 2.0
    """Generate at most this much video ahead of playback (bounds the switch latency)."""
    max_chunks: int = 0
    """Stop a session after this many chunks (0 = endless)."""
    recache: bool = True
    """Recompute the cached chunks' K/V under a new prompt (LongLive's KV recache)."""
    jpeg_quality: int = 90
    """JPEG quality of the streamed frames (1-95)."""
    default_prompt: str = "a red square slides right"
    """Prompt the page offers before the first start."""
