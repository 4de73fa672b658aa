"""End-to-end streaming FPS: DiT chunk loop + streaming VAE decode + frames delivered to a sink, on one GPU.

FPS counts pixel frames that reached the sink (uint8 frames on the CPU, or an mp4 with --mp4), not DiT steps.
Decode modes: `sync` (decode after each chunk, in series: the LongLive baseline layout) and `stream` (decode
on a side CUDA stream in a worker thread, overlapping chunk i's decode with chunk i+1's denoising:
inference/async_decode.py). The DiT runs with the chosen chunk step (inference/chunk_step.py), the VAE
with our streaming decoder (models/wan/vae_decoder.py, compile + CUDA graph by default). Random weights.

    python bench/bench_e2e.py --settings wan2.1-1.3b wan2.1-1.3b-2step wan2.2-ti2v-5b --out bench/results.jsonl  # GPU
    python bench/bench_e2e.py --settings tiny --chunks 3            # CPU smoke run (tiny VAE, thread mode)

The dedicated-GPU layout (DiT on one GPU, VAE on another) is estimated from the same run as
min(DiT FPS, VAE FPS) with both measured alone; --decode-device cuda:1 measures it where two GPUs exist.
Under torchrun every process is one SP rank of the DiT (distributed/sp_inference.py) and rank 0 also decodes,
e.g. 4 SP ranks + a fifth GPU for the VAE (issue 14):
    torchrun --nproc-per-node 4 bench/bench_e2e.py --step compile --decode-device cuda:4 --modes device
Also reported: first-frame latency (a new stream in a warm process: the first chunk, its passes eager while the
cache fills, plus its decode) and per-chunk latency p50 / p99 (chunk start -> its frames at the sink).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_generate_chunk import LINEARS, SETTINGS, build_model  # noqa: E402
from bench.record import record  # noqa: E402
from megatron_longlive.config import InferConfig, ParallelConfig, preset_config  # noqa: E402
from megatron_longlive.distributed.sp_inference import build_engine, init_sp_inference  # noqa: E402
from megatron_longlive.inference.async_decode import AsyncDecodeConfig, AsyncDecoder  # noqa: E402
from megatron_longlive.inference.window_attention import WINDOW_MODES  # noqa: E402
from megatron_longlive.models.wan.vae_decoder import StreamingVAEDecoder, random_autoencoder  # noqa: E402

VAE_KIND = {"tiny": "wan2.1", "wan2.1-1.3b": "wan2.1", "wan2.1-1.3b-2step": "wan2.1", "wan2.2-ti2v-5b": "wan2.2"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_setting(name: str, device: torch.device, dtype: torch.dtype, args, sp_group=None, main: bool = True
                ) -> list[dict]:
    """Every SP rank runs the chunk loop (same noise, same latents); the main rank also decodes and times."""
    _, height, width, stride, infer_kw, label = SETTINGS[name]
    infer = InferConfig(height=height, width=width, attention=args.attention, vae_conv=args.vae_conv, **infer_kw)
    model = build_model(name, device, dtype, args.linear)
    engine = build_engine(model, infer, (height // stride, width // stride), sp_group, kv_cache=args.kv,
                          step=args.step)
    engine.set_prompt(torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=torch.Generator().manual_seed(1)))
    tiny = name == "tiny"
    dec_device = torch.device(args.decode_device) if args.decode_device else device
    on_cuda = dec_device.type == "cuda"
    decoder = None
    if main:
        vae = random_autoencoder(VAE_KIND[name], tiny=tiny, device=dec_device, dtype=dtype)
        decoder = StreamingVAEDecoder(vae, dec_device, dtype, compile=on_cuda and not args.vae_eager,
                                      cuda_graph=on_cuda and not args.vae_eager, conv_precision=infer.vae_conv)
    shape = (1, *engine.latent_shape)
    gen = torch.Generator().manual_seed(0)
    frames = {"n": 0, "arrivals": []}

    def sink(x: torch.Tensor) -> None:
        frames["n"] += x.shape[1]
        frames["arrivals"].append(time.perf_counter())

    def chunk() -> torch.Tensor:
        return engine.generate_chunk(torch.randn(shape, generator=gen).to(device))

    # no_grad, not inference_mode: the decode thread must update the decoder caches made here
    # warm-up in series: fills the cache, compiles and captures both the DiT step and the decoder
    with torch.no_grad():
        for _ in range(engine.layout.num_slots + 3):
            z = chunk()
            if main:
                decoder.decode(z)
        _sync(device)
        # each part alone (steady state)
        t0 = time.perf_counter()
        lat = [chunk() for _ in range(args.chunks)]
        _sync(device)
        dit_s = (time.perf_counter() - t0) / args.chunks
        px, vae_s = 0, float("nan")
        if main:
            t0 = time.perf_counter()
            for z in lat:
                px += decoder.decode(z).shape[2]
            _sync(dec_device)
            vae_s = (time.perf_counter() - t0) / args.chunks
    frames_per_chunk = px // args.chunks if main else 0
    rows = []
    for mode in args.modes:
        if mode == "device" and not args.decode_device:
            continue
        frames["n"], frames["arrivals"] = 0, []
        starts = []
        cfg = AsyncDecodeConfig(mode=mode if on_cuda or mode == "sync" else "thread", device=args.decode_device)
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            if main:
                with AsyncDecoder(decoder.decode, sink, cfg) as pipe:
                    for _ in range(args.chunks):
                        starts.append(time.perf_counter())
                        pipe.submit(chunk())
            else:
                for _ in range(args.chunks):
                    chunk()
                _sync(device)
            elapsed = time.perf_counter() - t0
        if not main:
            continue
        assert frames["n"] == frames_per_chunk * args.chunks, (frames["n"], frames_per_chunk, args.chunks)
        latency = [1e3 * (a - s) for s, a in zip(starts, frames["arrivals"])]   # chunk start -> its frames out
        rows.append(dict(setting=name, label=label, mode=mode, fps=frames["n"] / elapsed,
                         dit_fps=frames_per_chunk / dit_s, vae_fps=frames_per_chunk / vae_s,
                         dedicated_estimate=frames_per_chunk / max(dit_s, vae_s),
                         chunk_latency_p50_ms=float(np.percentile(latency, 50)),
                         chunk_latency_p99_ms=float(np.percentile(latency, 99))))
    # a new stream from a warm process: the first chunk runs its passes eagerly while the cache fills
    with torch.no_grad():
        engine.reset()
        if main:
            decoder.reset()
        _sync(device)
        t0 = time.perf_counter()
        z = chunk()
        if main:
            decoder.decode(z).cpu()
        _sync(device)
        first_frame_ms = 1e3 * (time.perf_counter() - t0)
    for r in rows:
        r["first_frame_ms"] = first_frame_ms
    del engine, model, decoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=None, choices=sorted(SETTINGS))
    p.add_argument("--modes", nargs="+", default=["sync", "stream"], choices=("sync", "stream", "device"))
    p.add_argument("--step", default="auto", help="DiT chunk step (inference/chunk_step.py); auto = fastest")
    p.add_argument("--linear", default="bf16", choices=LINEARS, help="fp8-fast: fp8 with quant.fp8_fast_accum")
    p.add_argument("--kv", default="bf16", choices=("bf16", "nvfp4"))
    p.add_argument("--attention", default="sdpa", choices=("sdpa", *WINDOW_MODES),
                   help="infer.attention: self-attention over the KV window (fp8 / triton: the Triton window kernel)")
    p.add_argument("--vae-eager", action="store_true", help="no compile / CUDA graph for the decoder")
    p.add_argument("--vae-conv", default="bf16", choices=("bf16", "fp8"),
                   help="infer.vae_conv: the streaming decoder's convs in BF16 or FP8 (quant/fp8_conv)")
    p.add_argument("--decode-device", default=None, help="e.g. cuda:1: measure the dedicated-GPU layout")
    p.add_argument("--chunks", type=int, default=8, help="timed chunks per mode")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = args.settings or (["wan2.1-1.3b", "wan2.2-ti2v-5b"] if device.type == "cuda" else ["tiny"])
    groups = None
    if world > 1:   # torchrun: every process one SP rank; rank 0 also decodes (on --decode-device if given)
        groups = init_sp_inference(ParallelConfig(sp_size=world), min(preset_config(SETTINGS[s][0]).num_heads
                                                                      for s in settings))
        device = groups.device
    main_rank = groups is None or groups.rank == 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name in settings:
        for r in run_setting(name, device, dtype, args, groups.sp if groups else None, main_rank):
            rows.append(r)
            extra = dict(setting=name, decode=r["mode"], step=args.step, linear=args.linear, kv=args.kv,
                         attention=args.attention, vae_conv=args.vae_conv, sp_size=world,
                         decode_device=args.decode_device, dit_alone_fps=round(r["dit_fps"], 2),
                         vae_alone_fps=round(r["vae_fps"], 2), first_frame_ms=round(r["first_frame_ms"], 1),
                         chunk_latency_p50_ms=round(r["chunk_latency_p50_ms"], 1),
                         chunk_latency_p99_ms=round(r["chunk_latency_p99_ms"], 1))
            attn = "" if args.attention == "sdpa" else f", attention {args.attention}"
            attn += "" if args.vae_conv == "bf16" else f", vae conv {args.vae_conv}"
            attn += "" if world == 1 else f", sp {world}"
            attn += "" if not args.decode_device else f", decode on {args.decode_device}"
            record(args.out, f"{r['label']} e2e fps ({r['mode']} decode, linear {args.linear}{attn})", "fps",
                   round(r["fps"], 2), "frames/s", **extra)
            record(args.out, f"{r['label']} first-frame latency ({r['mode']} decode, linear {args.linear}{attn})",
                   "latency", round(r["first_frame_ms"], 1), "ms", **extra)
            record(args.out, f"{r['label']} chunk latency p99 ({r['mode']} decode, linear {args.linear}{attn})",
                   "latency", round(r["chunk_latency_p99_ms"], 1), "ms", **extra)
            if r["mode"] == rows[0]["mode"]:
                record(args.out, f"{r['label']} e2e fps (dedicated decode GPU, estimated from one-GPU parts)",
                       "fps", round(r["dedicated_estimate"], 2), "frames/s", **extra)
            print(f"[{name} {r['mode']}] e2e {r['fps']:.1f} FPS (DiT alone {r['dit_fps']:.1f}, VAE alone "
                  f"{r['vae_fps']:.1f}, dedicated-GPU estimate {r['dedicated_estimate']:.1f}); first frame "
                  f"{r['first_frame_ms']:.0f} ms, chunk latency p50 {r['chunk_latency_p50_ms']:.0f} / p99 "
                  f"{r['chunk_latency_p99_ms']:.0f} ms", flush=True)
    if groups is not None:
        from megatron_longlive.distributed.grid import destroy_grid

        destroy_grid()
    return 0


if __name__ == "__main__":
    sys.exit(main())
