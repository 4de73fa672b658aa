"""Prompt switches typed while a video streams (`longlive generate --interactive`).

A reader thread collects lines from a text stream (stdin); at every chunk boundary the generator takes at most
one of them, first in first out, so each typed line becomes the prompt from the next chunk on:

    a blue circle moves down        switch the prompt (same shot: the cached window keeps its K/V)
    /shot a green square appears    scene cut: a new shot (shot sink) and a KV recache under the new prompt
    /quit                           stop reading (the video runs to infer.num_chunks with the last prompt)
"""
from __future__ import annotations

import queue
import threading
from typing import TextIO

from .prompts import PromptSegment, _segment


class LivePrompts:
    """Callable `(chunk) -> PromptSegment | None` fed by a reader thread over `stream`."""

    def __init__(self, stream: TextIO, echo: bool = True):
        self._lines: queue.Queue = queue.Queue()
        self.echo = echo
        self.applied: list[PromptSegment] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), name="live-prompts", daemon=True)
        self._thread.start()

    def _read(self, stream: TextIO) -> None:
        for n, line in enumerate(stream, 1):
            line = line.strip()
            if line == "/quit":
                return
            if line:
                self._lines.put((n, line))

    def __call__(self, chunk: int) -> PromptSegment | None:
        if chunk == 0:
            return None          # chunk 0 follows the starting prompt
        try:
            n, line = self._lines.get_nowait()
        except queue.Empty:
            return None
        new_shot = line.startswith("/shot ")
        text = line[len("/shot "):] if new_shot else line
        if line.startswith("/") and not new_shot:
            print(f"stdin line {n}: unknown command {line.split()[0]!r} ignored (use /shot TEXT or /quit)", flush=True)
            return None
        try:
            seg = _segment(chunk, text, f"stdin line {n}", new_shot)
        except ValueError as e:
            print(f"{e}; ignored", flush=True)
            return None
        self.applied.append(seg)
        if self.echo:
            print(f"chunk {chunk}: {'new shot: ' if new_shot else ''}{seg.prompt}", flush=True)
        return seg
