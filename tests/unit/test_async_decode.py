"""Async decode: same frames as synchronous decode, in order, nothing dropped under a slow sink (back-pressure),
Ctrl-C / close() flush the mp4 (in process and with a real SIGINT to a child process), worker errors surface."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from megatron_longlive.inference.async_decode import AsyncDecodeConfig, AsyncDecoder, mp4_sink
from megatron_longlive.inference.video_writer import Mp4Writer, read_mp4
from megatron_longlive.models.wan.vae import WanVAE
from megatron_longlive.models.wan.vae_decoder import StreamingVAEDecoder


@pytest.fixture(scope="module")
def tiny_vae():
    return WanVAE.tiny("wan2.1", seed=7)


def _chunks(vae, n=5, k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, vae.z_dim, k, 2, 2, generator=g) for _ in range(n)]


def _run(vae, chunks, config, sink_delay=0.0):
    dec = StreamingVAEDecoder(vae, device="cpu", dtype=torch.float32)
    got = []

    def sink(frames):
        time.sleep(sink_delay)
        got.append(frames)

    with AsyncDecoder(dec.decode, sink, config) as ad:
        for c in chunks:
            ad.submit(c)
    return got, ad


@pytest.mark.parametrize("output", ["uint8", "float"])
def test_thread_mode_equals_sync_with_slow_sink(tiny_vae, output):
    chunks = _chunks(tiny_vae)
    ref, _ = _run(tiny_vae, chunks, AsyncDecodeConfig(mode="sync", output=output))
    got, ad = _run(tiny_vae, chunks, AsyncDecodeConfig(mode="thread", max_queue=1, output=output), sink_delay=0.05)
    assert len(got) == len(ref) == 5 and ad.chunks_written == 5
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert ad.frames_written == 1 + 4 * 4  # 1 + 4k rule over the whole clip
    # and sync itself equals a one-shot full decode of the concatenated latents (the uint8 path via Mp4Writer's rule)
    full = tiny_vae.decode(torch.cat(chunks, 2))
    if output == "float":
        assert (torch.cat(got, 2) - full).abs().max() <= 1e-4


def test_back_pressure_bounds_in_flight_chunks_and_keeps_order():
    """A sink 20x slower than the producer: submit blocks, at most queue+in-flight chunks are pending, none lost."""
    delivered, pending_max = [], [0]
    submitted = [0]

    def sink(frames):
        time.sleep(0.02)
        delivered.append(int(frames[0, 0, 0, 0, 0]))

    def decode(z):  # a cheap deterministic "decoder": chunk id -> a frame holding it
        return torch.full((1, 3, 1, 2, 2), float(z.item()) / 127.5 - 1)

    cfg = AsyncDecodeConfig(mode="thread", max_queue=2)
    with AsyncDecoder(decode, sink, cfg) as ad:
        for i in range(40):
            ad.submit(torch.tensor(float(i)))
            submitted[0] += 1
            pending_max[0] = max(pending_max[0], submitted[0] - len(delivered))
    assert delivered == list(range(40))
    # 2 in the input queue + 1 decoding + 2 in the output queue + 1 in the sink (+1 racing the counter)
    assert pending_max[0] <= 2 * cfg.max_queue + 3, pending_max[0]


def test_keyboard_interrupt_mid_stream_writes_everything_submitted(tiny_vae, tmp_path):
    path = tmp_path / "clip.mp4"
    writer = Mp4Writer(path, fps=16)
    dec = StreamingVAEDecoder(tiny_vae, device="cpu", dtype=torch.float32)
    chunks = _chunks(tiny_vae, n=4)
    ad = AsyncDecoder(dec.decode, mp4_sink(writer), AsyncDecodeConfig(mode="thread", max_queue=1),
                      on_close=writer.close)
    with pytest.raises(KeyboardInterrupt):
        with ad:
            for c in chunks:
                ad.submit(c)
            raise KeyboardInterrupt
    frames = read_mp4(path)
    assert ad.chunks_written == 4 and frames.shape[0] == 1 + 4 * 3 == ad.frames_written
    sync = []
    ref = AsyncDecoder(StreamingVAEDecoder(tiny_vae, device="cpu", dtype=torch.float32).decode, sync.append,
                       AsyncDecodeConfig(mode="sync"))
    for c in chunks:
        ref.submit(c)
    ref.close()
    expected = torch.cat([f[0] for f in sync]).numpy()  # [T, H, W, 3] uint8
    assert frames.shape == expected.shape  # (pixel values differ by the lossy codec; the count and size must not)


CHILD = textwrap.dedent("""
    import sys, time, torch
    from megatron_longlive.inference.async_decode import AsyncDecodeConfig, AsyncDecoder, mp4_sink
    from megatron_longlive.inference.video_writer import Mp4Writer
    from megatron_longlive.models.wan.vae import WanVAE
    from megatron_longlive.models.wan.vae_decoder import StreamingVAEDecoder
    torch.set_num_threads(1)
    vae = WanVAE.tiny("wan2.1", seed=7)
    dec = StreamingVAEDecoder(vae, device="cpu", dtype=torch.float32)
    writer = Mp4Writer(sys.argv[1], fps=16)
    sink = mp4_sink(writer)
    def slow_sink(frames):
        time.sleep(0.05)
        sink(frames)
    ad = AsyncDecoder(dec.decode, slow_sink, AsyncDecodeConfig(mode="thread", max_queue=1), on_close=writer.close)
    try:
        with ad:
            for i in range(10**6):
                ad.submit(torch.randn(1, 16, 1, 2, 2))
                print("submitted", ad.chunks_submitted, flush=True)
    except KeyboardInterrupt:
        print("done", ad.chunks_submitted, ad.chunks_written, ad.frames_written, flush=True)
        sys.exit(130)
""")


@pytest.mark.slow  # a fresh interpreter importing torch + diffusers: ~10 s idle, minutes on a loaded 2-core box
def test_sigint_to_a_streaming_process_leaves_a_complete_mp4(tmp_path):
    path = tmp_path / "child.mp4"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line.split())
        if line.startswith("submitted 3"):
            proc.send_signal(signal.SIGINT)
            break
    out, _ = proc.communicate(timeout=300)
    lines += [ln.split() for ln in out.splitlines()]
    assert proc.returncode == 130, lines[-3:]
    done = [ln for ln in lines if ln[0] == "done"][-1]
    submitted, written, frames = map(int, done[1:])
    assert submitted >= 3 and written == submitted  # nothing dropped
    assert frames == 1 + 4 * (submitted - 1)
    assert read_mp4(path).shape[0] == frames  # the mp4 was flushed and closed: every frame is readable


def test_worker_error_reaches_the_producer():
    def decode(z):
        raise ValueError("boom")

    ad = AsyncDecoder(decode, lambda f: None, AsyncDecodeConfig(mode="thread", max_queue=1))
    with pytest.raises(RuntimeError, match="boom"):
        for _ in range(100):  # the error surfaces in a later submit
            ad.submit(torch.zeros(1))
            time.sleep(0.01)
    with pytest.raises(RuntimeError, match="boom"):
        ad.close()  # and in close, which still stops the workers
    ad.close()  # idempotent, no hang
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("vae-"))


def test_config_errors():
    with pytest.raises(ValueError, match="max_queue"):
        AsyncDecodeConfig(max_queue=0)
    with pytest.raises(ValueError, match="mode"):
        AsyncDecodeConfig(mode="gpu")
    with pytest.raises(ValueError, match="device"):
        AsyncDecodeConfig(mode="device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="thread"):
            AsyncDecoder(lambda z: z, print, AsyncDecodeConfig(mode="stream"))
