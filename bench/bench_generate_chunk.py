"""Time one generated chunk of the streaming engine (k denoising passes + 1 cache pass), DiT only, random weights.

Settings (the cache is filled to its full window before timing, so every timed chunk attends a full window):
  tiny            64x64, chunk 1, window 4 (sink 1), 4 steps             - CPU, float32
  wan2.1-1.3b     832x480, chunk 3, window 12 (sink 3), 4 steps [1000, 750, 500, 250] - GPU, bf16
  wan2.2-ti2v-5b  1280x704, chunk 8, window 32 (sink 8), 2 steps          - GPU, bf16
FPS = pixel frames per chunk (4 x latent frames, the VAE's temporal stride) / seconds per chunk.

    python bench/bench_generate_chunk.py --settings tiny --out bench/results.jsonl
    python bench/bench_generate_chunk.py --settings wan2.1-1.3b wan2.2-ti2v-5b --out bench/results.jsonl   # GPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.record import record  # noqa: E402
from megatron_longlive.config import InferConfig, preset_config  # noqa: E402
from megatron_longlive.inference.engine import StreamingEngine  # noqa: E402
from megatron_longlive.models.wan import WanDiT  # noqa: E402

# name -> (preset, height, width, spatial stride, infer settings, result name)
SETTINGS = {
    "tiny": ("tiny", 64, 64, 8, dict(chunk_frames=1, window_frames=4, sink_frames=1,
                                     denoising_steps=[1000, 750, 500, 250]), "tiny 64px 4-step"),
    "wan2.1-1.3b": ("wan2.1-1.3b", 480, 832, 8, dict(chunk_frames=3, window_frames=12, sink_frames=3,
                                                      denoising_steps=[1000, 750, 500, 250]), "wan2.1-1.3b 480p 4-step"),
    "wan2.2-ti2v-5b": ("wan2.2-ti2v-5b", 704, 1280, 16, dict(chunk_frames=8, window_frames=32, sink_frames=8,
                                                              denoising_steps=[1000, 500]), "wan2.2-5b 704p 2-step"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_setting(name: str, device: torch.device, dtype: torch.dtype, timed: int) -> dict:
    preset, height, width, stride, infer_kw, label = SETTINGS[name]
    cfg = preset_config(preset)
    infer = InferConfig(height=height, width=width, **infer_kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanDiT(cfg)
        model.init_weights()
    model = model.to(dtype).eval()
    engine = StreamingEngine(model, infer, (height // stride, width // stride), batch=1)
    engine.set_prompt(torch.randn(1, cfg.text_len, cfg.text_dim, device=device))
    shape = (1, *engine.latent_shape)
    warm = engine.layout.num_slots + 1           # fill sinks and window: steady state from here on
    with torch.inference_mode():
        for _ in range(warm):
            engine.generate_chunk(torch.randn(shape, device=device))
        _sync(device)
        times = []
        for _ in range(timed):
            t0 = time.perf_counter()
            engine.generate_chunk(torch.randn(shape, device=device))
            _sync(device)
            times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]   # median
    frames = 4 * infer.chunk_frames
    return dict(setting=name, label=label, ms=sec * 1e3, fps=frames / sec, passes=len(infer.denoising_steps) + 1,
                tokens_per_chunk=engine.layout.tokens_per_chunk, kv_tokens=engine.layout.num_tokens,
                cache_gib=engine.cache.memory_bytes() / 2 ** 30, dtype=str(dtype).replace("torch.", ""))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=None, choices=sorted(SETTINGS),
                   help="default: tiny on CPU; the two full-size settings on CUDA")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--chunks", type=int, default=5, help="timed chunks (median reported)")
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    settings = args.settings or (["wan2.1-1.3b", "wan2.2-ti2v-5b"] if device.type == "cuda" else ["tiny"])
    rows = []
    for name in settings:
        r = bench_setting(name, device, dtype, args.chunks)
        rows.append(r)
        extra = dict(setting=r["setting"], dtype=r["dtype"], passes=r["passes"], kv_tokens=r["kv_tokens"],
                     cache_gib=round(r["cache_gib"], 3), engine="eager kv-cache engine")
        record(args.out, f"{r['label']} generate chunk ms", "chunk_time", round(r["ms"], 3), "ms", **extra)
        record(args.out, f"{r['label']} generate chunk dit fps", "fps", round(r["fps"], 3), "frames/s", **extra)
    print(f"{'setting':<16}{'dtype':<10}{'passes':>7}{'q tokens':>10}{'kv tokens':>11}{'cache GiB':>11}"
          f"{'ms/chunk':>11}{'DiT FPS':>10}")
    for r in rows:
        print(f"{r['setting']:<16}{r['dtype']:<10}{r['passes']:>7}{r['tokens_per_chunk']:>10}{r['kv_tokens']:>11}"
              f"{r['cache_gib']:>11.3f}{r['ms']:>11.2f}{r['fps']:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
