"""Asynchronous streaming VAE decode: latent chunks in, frames out to a sink (mp4 writer, viewer), in order.

    producer (DiT loop) --submit--> [bounded queue] --> decode worker --> [bounded queue] --> sink worker --> sink()

* Back-pressure, nothing dropped: both queues are bounded, so `submit` blocks while the decoder or the sink is
  behind; every submitted chunk reaches the sink exactly once, in submission order (one FIFO consumer per queue).
* Modes (`AsyncDecodeConfig.mode`): "stream" decodes on a separate CUDA stream of the producer's GPU (overlapping
  decode of chunk i with denoising of chunk i+1; an event orders it after the producer's kernels);
  "device" decodes on a dedicated GPU (`device`, e.g. "cuda:1"; latents are copied there); "thread" is the CPU
  fallback (a plain worker thread); "sync" decodes inline in `submit` (the reference the others must equal).
* Frames go to the sink as `[B, T, H, W, 3]` uint8 CPU tensors (`output="uint8"`, converted on the decode device
  with the exact formula of `video_writer.to_uint8_frames`) or `[B, 3, T, H, W]` float32 in [-1, 1].
* Shutdown: `close()` (or leaving the `with` block, also on Ctrl-C / KeyboardInterrupt) drains both queues, so
  everything submitted is written, then calls `on_close` (e.g. `Mp4Writer.close`, which flushes the encoder).
  A second Ctrl-C while draining stops decoding the rest and still closes the sink. A worker error is re-raised
  in the producer by the next `submit` or by `close`.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Literal

import torch

Mode = Literal["auto", "sync", "stream", "device", "thread"]
_STOP = object()


@dataclasses.dataclass
class AsyncDecodeConfig:
    """How decoded frames are produced and delivered."""

    mode: Mode = "auto"
    """auto (stream on CUDA, else thread) | stream (side CUDA stream) | device (dedicated GPU) | thread | sync."""
    device: str | None = None
    """Decode device for mode=device, e.g. "cuda:1" (the decoder must already live there)."""
    max_queue: int = 2
    """Chunks that may wait in each of the two queues before `submit` blocks (>= 1)."""
    output: Literal["uint8", "float"] = "uint8"
    """uint8: [B, T, H, W, 3] uint8 frames; float: [B, 3, T, H, W] float32 in [-1, 1]; both on the CPU."""

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "sync", "stream", "device", "thread"):
            raise ValueError(f"AsyncDecodeConfig.mode={self.mode!r} unknown. Fix: use auto, sync, stream, device "
                             f"or thread.")
        if self.max_queue < 1:
            raise ValueError(f"AsyncDecodeConfig.max_queue={self.max_queue} must be >= 1 (bounded, not "
                             f"unbounded). Fix: use 1-4.")
        if self.output not in ("uint8", "float"):
            raise ValueError(f"AsyncDecodeConfig.output={self.output!r}. Fix: use uint8 or float.")
        if self.mode == "device" and not self.device:
            raise ValueError("AsyncDecodeConfig.mode=device needs device (e.g. 'cuda:1'). Fix: set device.")


def frames_for_sink(pixels: torch.Tensor, output: str) -> torch.Tensor:
    """Decoded pixels [B, 3, T, H, W] in [-1, 1] -> CPU frames ([B, T, H, W, 3] uint8, or float32 as is)."""
    x = pixels.detach().float().clamp(-1, 1)
    if output == "uint8":  # same rounding as video_writer.to_uint8_frames, done on the decode device
        x = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    return x.cpu()


class AsyncDecoder:
    """Decode latent chunks off the producer's critical path and deliver frames to `sink` in order.

    decode: the stateful chunk decoder (e.g. `StreamingVAEDecoder.decode`), called with chunks in submission
    order from one thread; sink: called with each chunk's frames (see `AsyncDecodeConfig.output`);
    on_close: called once after the last frames reached the sink (e.g. the mp4 writer's `close`)."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], sink: Callable[[torch.Tensor], None],
                 config: AsyncDecodeConfig | None = None, on_close: Callable[[], None] | None = None):
        self.cfg = config or AsyncDecodeConfig()
        mode = self.cfg.mode
        if mode == "auto":
            mode = "stream" if torch.cuda.is_available() else "thread"
        if mode in ("stream", "device") and not torch.cuda.is_available():
            raise ValueError(f"async decode mode={mode!r} needs CUDA. Fix: use mode='thread' (CPU) or 'sync'.")
        self.mode = mode
        self.decode_fn, self.sink, self.on_close = decode, sink, on_close
        self.chunks_submitted = self.chunks_written = self.frames_written = 0
        self.decode_seconds = self.sink_seconds = 0.0
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._closed = False
        self._stream = None
        if mode == "stream":
            self._stream = torch.cuda.Stream()
        elif mode == "device":
            self._stream = torch.cuda.Stream(torch.device(self.cfg.device))
        self._threads: list[threading.Thread] = []
        if mode != "sync":
            self._in: queue.Queue = queue.Queue(self.cfg.max_queue)
            self._out: queue.Queue = queue.Queue(self.cfg.max_queue)
            self._threads = [threading.Thread(target=self._decode_loop, name="vae-decode", daemon=True),
                             threading.Thread(target=self._sink_loop, name="vae-sink", daemon=True)]
            for t in self._threads:
                t.start()

    # ---- producer side -------------------------------------------------------------------------------------
    def submit(self, latents: torch.Tensor) -> None:
        """Queue the next latent chunk; blocks while the queue is full (back-pressure). Raises a worker error."""
        if self._closed:
            raise RuntimeError("AsyncDecoder.submit after close(). Fix: create a new AsyncDecoder per clip.")
        self._raise_error()
        if self.mode == "sync":
            self._deliver(self._decode(latents, None))
            self.chunks_submitted += 1
            return
        ready = None
        if latents.is_cuda:  # order the decode after the producer's kernels that wrote `latents`
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(latents.device))
            if self.mode == "stream":
                latents.record_stream(self._stream)  # keep its memory until the side stream used it
        item = (latents, ready)
        while True:
            try:
                self._in.put(item, timeout=0.1)
                break
            except queue.Full:
                self._raise_error()
        self.chunks_submitted += 1

    def close(self) -> None:
        """Decode and deliver everything submitted, stop the workers, call `on_close`; re-raise a worker error."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._threads:
                try:
                    self._in.put(_STOP)
                    for t in self._threads:
                        t.join()
                except KeyboardInterrupt:  # second Ctrl-C: skip the rest, still close the sink cleanly
                    self._abort.set()
                    for t in self._threads:
                        t.join()
                    raise
        finally:
            if self.on_close is not None:
                self.on_close()
        self._raise_error()

    def __enter__(self) -> "AsyncDecoder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an exception (KeyboardInterrupt included) is propagating: flush, and let it propagate
            self.close()
        except Exception:  # noqa: BLE001 - the original exception is the one to report
            pass

    # ---- workers ----------------------------------------------------------------------------------------------
    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"async VAE decode failed: {self._error!r}") from self._error

    def _decode(self, latents: torch.Tensor, ready) -> torch.Tensor:
        t0 = time.perf_counter()
        if self._stream is None:
            frames = frames_for_sink(self.decode_fn(latents), self.cfg.output)
        else:
            with torch.cuda.device(self._stream.device), torch.cuda.stream(self._stream):
                if self.mode == "device":
                    if ready is not None:
                        ready.synchronize()
                    latents = latents.to(self._stream.device)
                elif ready is not None:
                    self._stream.wait_event(ready)
                frames = frames_for_sink(self.decode_fn(latents), self.cfg.output)  # .cpu() waits for the stream
        self.decode_seconds += time.perf_counter() - t0
        return frames

    def _deliver(self, frames: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.sink(frames)
        self.sink_seconds += time.perf_counter() - t0
        self.chunks_written += 1
        self.frames_written += frames.shape[1] if self.cfg.output == "uint8" else frames.shape[2]

    def _decode_loop(self) -> None:
        while True:
            item = self._in.get()
            if item is _STOP:
                self._out.put(_STOP)
                return
            if self._error is not None or self._abort.is_set():
                continue  # keep consuming so the producer never blocks forever
            try:
                frames = self._decode(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the producer thread
                self._error = e
                continue
            del item
            self._out.put(frames)

    def _sink_loop(self) -> None:
        while True:
            frames = self._out.get()
            if frames is _STOP:
                return
            if self._error is not None or self._abort.is_set():
                continue
            try:
                self._deliver(frames)
            except BaseException as e:  # noqa: BLE001
                self._error = e


def mp4_sink(writer) -> Callable[[torch.Tensor], None]:
    """A sink writing batch element 0 of uint8 frames [B, T, H, W, 3] to a `video_writer.Mp4Writer`."""
    def sink(frames: torch.Tensor) -> None:
        writer.write(frames[0].numpy())
    return sink
