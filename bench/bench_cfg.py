"""Cost of classifier-free guidance in the streaming engine: seconds per chunk without guidance, with guidance as
ONE batched forward of 2B rows (the engine), and with guidance as two guidance-free engines run one after the
other (the naive way, LongLive's positive/negative caches). DiT only, random weights, cache filled first.

Settings: tiny (CPU or GPU, float32) and wan2.1-1.3b (832x480, chunk 3, window 12, sink 3, 4 steps; GPU, bf16).
Also prints the KV-cache bytes of each (guidance doubles them) and checks the batched result equals the two
engines' result (max abs diff of the last chunk).

    python bench/bench_cfg.py --settings tiny --out bench/results.jsonl
    python bench/bench_cfg.py --settings wan2.1-1.3b --out bench/results.jsonl        # GPU
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

# name -> (preset, height, width, spatial stride, infer settings)
SETTINGS = {
    "tiny": ("tiny", 64, 64, 8, dict(chunk_frames=1, window_frames=4, sink_frames=1,
                                     denoising_steps=[1000, 750, 500, 250])),
    "wan2.1-1.3b": ("wan2.1-1.3b", 480, 832, 8, dict(chunk_frames=3, window_frames=12, sink_frames=3,
                                                      denoising_steps=[1000, 750, 500, 250])),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TwoEngines:
    """The naive guidance: a conditional and an unconditional engine, each pass run twice in sequence."""

    def __init__(self, model, infer, hw, text, neg):
        self.cond = StreamingEngine(model, infer, hw, guidance=False)
        self.uncond = StreamingEngine(model, infer, hw, guidance=False)
        self.cond.set_prompt(text)
        self.uncond.set_prompt(neg)
        self.scale = infer.guidance_scale
        self.latent_shape = self.cond.latent_shape
        self.cache_bytes = self.cond.cache.memory_bytes() + self.uncond.cache.memory_bytes()

    def generate_chunk(self, noise):
        x = noise.float()
        sig = self.cond.sigmas
        for sigma, sigma_next in zip(sig[:-1], sig[1:]):
            v_c, v_u = self.cond.predict(x, sigma).float(), self.uncond.predict(x, sigma).float()
            x = x + (sigma_next - sigma) * (v_u + self.scale * (v_c - v_u))
        self.cond.commit(x)
        self.uncond.commit(x)
        return x


def run_setting(name, device, dtype, timed, out):
    preset, height, width, stride, infer_kw = SETTINGS[name]
    cfg = preset_config(preset)
    torch.manual_seed(0)
    with torch.device(device):
        model = WanDiT(cfg)
        model.init_weights()
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    text, neg = (torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(device) for _ in range(2))
    hw = (height // stride, width // stride)
    rows = []
    results = {}
    for variant in ("no guidance", "guidance, one 2B forward", "guidance, two engines"):
        infer = InferConfig(height=height, width=width, guidance_scale=1.0 if variant == "no guidance" else 5.0,
                            **infer_kw)
        if variant == "guidance, two engines":
            engine = TwoEngines(model, infer, hw, text, neg)
            cache_bytes = engine.cache_bytes
        else:
            engine = StreamingEngine(model, infer, hw)
            if engine.guidance:
                engine.set_negative_prompt(neg)
            engine.set_prompt(text)
            cache_bytes = engine.cache.memory_bytes()
        shape = (1, *engine.latent_shape)
        gen = torch.Generator().manual_seed(0)
        warm = infer.window_frames // infer.chunk_frames + 1
        with torch.inference_mode():
            for _ in range(warm):
                engine.generate_chunk(torch.randn(shape, generator=gen).to(device))
            times = []
            for _ in range(timed):
                noise = torch.randn(shape, generator=gen).to(device)
                _sync(device)
                t0 = time.perf_counter()
                last = engine.generate_chunk(noise)
                _sync(device)
                times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2]
        results[variant] = last.float().cpu()
        rows.append((variant, sec, cache_bytes))
        record(out, f"{name} cfg: {variant}", "seconds per chunk", sec, "s", cache_bytes=cache_bytes,
               dtype=str(dtype).replace("torch.", ""))
    diff = (results["guidance, one 2B forward"] - results["guidance, two engines"]).abs().max().item()
    base = rows[0][1]
    print(f"\n{name} ({device}, {str(dtype).replace('torch.', '')}, median of {timed} chunks)")
    print(f"{'variant':<28}{'s/chunk':>10}{'x no-CFG':>10}{'cache MiB':>11}")
    for variant, sec, cache_bytes in rows:
        print(f"{variant:<28}{sec:>10.4f}{sec / base:>10.2f}{cache_bytes / 2**20:>11.2f}")
    print(f"batched vs two engines, last chunk max |diff|: {diff:.3g}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["tiny"], choices=sorted(SETTINGS))
    p.add_argument("--timed", type=int, default=5, help="Timed chunks per variant (median reported).")
    p.add_argument("--out", default=None, help="Append JSON lines here (e.g. bench/results.jsonl).")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in args.settings:
        dtype = torch.bfloat16 if device.type == "cuda" and name != "tiny" else torch.float32
        run_setting(name, device, dtype, args.timed, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
