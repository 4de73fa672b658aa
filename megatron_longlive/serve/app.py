"""Starlette app of the live viewer: `/` serves the page, `/ws` streams JPEG frames and takes prompt switches.

WebSocket protocol (JSON text messages unless noted):
  client -> server  {"type": "start", "prompt": str}                  once, first
                    {"type": "prompt", "prompt": str, "new_shot": bool} any time after start
  server -> client  {"type": "hello", fps, width, height, chunk_frames, limits}
                    {"type": "queued", prompt, new_shot, apply_at}     a switch was accepted for chunk apply_at
                    {"type": "switch", chunk, prompt, new_shot}        chunks >= chunk use prompt (sent before them)
                    {"type": "chunk", chunk, first_frame, frames}      then `frames` binary messages:
                    binary: uint32 chunk, uint32 frame index (big-endian), JPEG bytes
                    {"type": "error", message}  {"type": "busy", message} (then close 1013)  {"type": "end", reason}
Generation runs in a worker thread one chunk at a time, at most `max_lead_s` of video ahead of real time,
so a switch shows up on screen within about that lead. Limits: prompt length, one switch per
`min_switch_interval_s`, `max_sessions` concurrent viewers (1 by default).
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import time
import traceback
from collections import OrderedDict

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .settings import ServeSettings
from .stream import LiveStream

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
CLOSE_TRY_AGAIN_LATER = 1013


def jpeg(frame: np.ndarray, quality: int) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Viewer:
    """Shared state: the loaded model and encoders, the settings, the open sessions."""

    def __init__(self, cfg, model, vae, text_encoder, settings: ServeSettings | None = None,
                 seed_latents=None):
        """seed_latents: every session starts from these clean latents (an image's, `serve --image`)."""
        self.cfg, self.model, self.vae, self.text_encoder = cfg, model, vae, text_encoder
        self.seed_latents = seed_latents
        self.settings = settings or ServeSettings()
        self.active = 0
        self.streams: list[LiveStream] = []     # every session's stream, newest last (for tests and logs)
        self.embeds: OrderedDict = OrderedDict()

    def check_prompt(self, prompt) -> str | None:
        """None if acceptable, else the reason shown to the user."""
        limit = self.settings.max_prompt_chars
        if not isinstance(prompt, str) or not prompt.strip():
            return "empty prompt: type some text describing the scene"
        if len(prompt) > limit:
            return f"prompt too long: {len(prompt)} characters, the limit is {limit}. Shorten it"
        return None

    def hello(self) -> dict:
        inf, s = self.cfg.infer, self.settings
        return {"type": "hello", "fps": inf.fps, "width": inf.width, "height": inf.height,
                "chunk_frames": inf.chunk_frames, "default_prompt": s.default_prompt,
                "limits": {"max_prompt_chars": s.max_prompt_chars, "min_switch_interval_s": s.min_switch_interval_s,
                           "max_sessions": s.max_sessions, "max_chunks": s.max_chunks}}

    async def session(self, ws: WebSocket) -> None:
        await ws.accept()
        if self.active >= self.settings.max_sessions:
            n = self.settings.max_sessions
            await ws.send_json({"type": "busy", "message": f"the viewer is busy: {n} session{'s' * (n > 1)} already "
                                f"streaming (limit --max-sessions {n}). Try again when it ends"})
            await ws.close(code=CLOSE_TRY_AGAIN_LATER)
            return
        self.active += 1
        try:
            await self._run(ws)
        except WebSocketDisconnect:
            pass
        finally:
            self.active -= 1

    async def _start_prompt(self, ws: WebSocket) -> str:
        while True:
            msg = await _receive(ws)
            if msg is None or msg.get("type") != "start":
                await ws.send_json({"type": "error", "message": "send {\"type\": \"start\", \"prompt\": ...} first"})
                continue
            reason = self.check_prompt(msg.get("prompt"))
            if reason is None:
                return msg["prompt"].strip()
            await ws.send_json({"type": "error", "message": reason})

    async def _run(self, ws: WebSocket) -> None:
        await ws.send_json(self.hello())
        prompt = await self._start_prompt(ws)
        try:
            stream = await asyncio.to_thread(LiveStream, self.cfg, self.model, self.vae, self.text_encoder, prompt,
                                             self.settings.recache, self.embeds, self.seed_latents)
        except ValueError as e:
            await ws.send_json({"type": "error", "message": f"cannot start the stream: {e}"})
            await ws.close(code=1011)
            return
        self.streams.append(stream)
        stop = asyncio.Event()
        receiver = asyncio.create_task(self._receive_switches(ws, stream, stop))
        try:
            await self._produce(ws, stream, stop)
        finally:
            stop.set()
            receiver.cancel()

    async def _receive_switches(self, ws: WebSocket, stream: LiveStream, stop: asyncio.Event) -> None:
        last = -float("inf")
        interval = self.settings.min_switch_interval_s
        try:
            while not stop.is_set():
                msg = await _receive(ws)
                if msg is None:
                    await ws.send_json({"type": "error", "message": "messages must be JSON objects"})
                    continue
                if msg.get("type") != "prompt":
                    await ws.send_json({"type": "error", "message": f"unknown message type {msg.get('type')!r}; "
                                        f"send {{\"type\": \"prompt\", \"prompt\": ..., \"new_shot\": false}}"})
                    continue
                reason = self.check_prompt(msg.get("prompt"))
                wait = last + interval - time.monotonic()
                if reason is None and wait > 0:
                    reason = (f"too many prompt switches: wait {wait:.1f} s (limit: one switch per {interval:g} s)")
                if reason is not None:
                    await ws.send_json({"type": "error", "message": reason})
                    continue
                last = time.monotonic()
                prompt, new_shot = msg["prompt"].strip(), bool(msg.get("new_shot", False))
                chunk = stream.request_switch(prompt, new_shot)
                await ws.send_json({"type": "queued", "prompt": prompt, "new_shot": new_shot, "apply_at": chunk})
        except (WebSocketDisconnect, RuntimeError):
            stop.set()

    async def _produce(self, ws: WebSocket, stream: LiveStream, stop: asyncio.Event) -> None:
        s, fps = self.settings, self.cfg.infer.fps
        t0, sent = None, 0
        while not stop.is_set():
            if s.max_chunks and len(stream.latents) >= s.max_chunks:
                await ws.send_json({"type": "end", "reason": f"reached --max-chunks {s.max_chunks}"})
                await ws.close()
                return
            if t0 is not None:      # pacing: stay at most max_lead_s of video ahead of playback
                ahead = sent / fps - (time.monotonic() - t0) - s.max_lead_s
                if ahead > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), timeout=ahead)
                    except asyncio.TimeoutError:
                        pass
                    continue
            try:
                chunk, switch, frames = await asyncio.to_thread(stream.next_chunk)
                blobs = await asyncio.to_thread(lambda: [jpeg(f, s.jpeg_quality) for f in frames])
            except Exception as e:  # noqa: BLE001 - tell the page, log the traceback, end the session
                traceback.print_exc()
                await ws.send_json({"type": "error", "message": f"generation failed: {type(e).__name__}: {e}"})
                await ws.close(code=1011)
                return
            if stop.is_set():
                return
            if switch is not None:
                await ws.send_json({"type": "switch", "chunk": switch.chunk, "prompt": switch.prompt,
                                    "new_shot": switch.new_shot})
            await ws.send_json({"type": "chunk", "chunk": chunk, "first_frame": sent, "frames": len(blobs)})
            for blob in blobs:
                await ws.send_bytes(struct.pack(">II", chunk, sent) + blob)
                sent += 1
            if t0 is None:
                t0 = time.monotonic()


async def _receive(ws: WebSocket) -> dict | None:
    """Next client message as a dict (None if it is not a JSON object); raises WebSocketDisconnect."""
    text = await ws.receive_text()
    try:
        msg = json.loads(text)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) else None


def build_app(viewer: Viewer) -> Starlette:
    """The ASGI app: `/` (page), `/health` (JSON), `/ws` (stream)."""

    async def index(request):
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    async def health(request):
        return JSONResponse({"ok": True, "active_sessions": viewer.active, **viewer.hello()})

    app = Starlette(routes=[Route("/", index), Route("/health", health), WebSocketRoute("/ws", viewer.session)])
    app.state.viewer = viewer
    return app
