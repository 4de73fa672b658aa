"""SP streaming inference (distributed/sp_inference.py): time per chunk, FPS, per-rank KV memory and bytes sent.

One process per GPU under torchrun; SP = world size (1 = the plain one-rank engine, the baseline). Same
settings and random weights as bench/bench_generate_chunk.py (the cache is filled to its full window before
timing). Per setting and KV cache: median ms per chunk (k denoising passes + 1 cache pass), DiT FPS (4 x
latent frames per chunk / s), per-rank K/V bytes, peak GPU memory, and the bytes each rank sent per chunk,
measured by the engine's counters and by the shape formula (`chunk_comm_bytes`, which must agree). Rank 0
prints the table and appends JSON lines to --out.

    torchrun --nproc_per_node 1 bench/bench_sp_inference.py --kv bf16 nvfp4 --out bench/results.jsonl   # baseline
    torchrun --nproc_per_node 2 bench/bench_sp_inference.py --kv bf16 nvfp4 nvfp4-fused --out bench/results.jsonl
    torchrun --nproc_per_node 4 bench/bench_sp_inference.py --kv bf16 nvfp4 nvfp4-fused --out bench/results.jsonl
CPU smoke test: torchrun --nproc_per_node 2 bench/bench_sp_inference.py --settings tiny --chunks 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_generate_chunk import SETTINGS, build_model  # noqa: E402
from bench.record import record  # noqa: E402
from megatron_longlive.config import InferConfig, ParallelConfig, preset_config  # noqa: E402
from megatron_longlive.distributed.grid import destroy_grid  # noqa: E402
from megatron_longlive.distributed.sp_inference import build_engine, init_sp_inference, kv_bytes  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def bench(model, name: str, kv: str, sp_group, device, timed: int, step: str = "eager") -> dict:
    _, height, width, stride, infer_kw, _ = SETTINGS[name]
    infer = InferConfig(height=height, width=width, **infer_kw)
    extra = {"kv_attention": "fused"} if kv == "nvfp4-fused" else {}    # SP engine only
    engine = build_engine(model, infer, (height // stride, width // stride), sp_group, batch=1,
                          kv_cache=kv.removesuffix("-fused"), step=step, **extra)
    text_gen = torch.Generator().manual_seed(1)
    engine.set_prompt(torch.randn(1, model.cfg.text_len, model.cfg.text_dim, generator=text_gen))
    shape = (1, *engine.latent_shape)
    gen = torch.Generator().manual_seed(0)                   # the same noise on every rank
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        for _ in range(engine.layout.num_slots + 1):         # fill sinks and window
            engine.generate_chunk(torch.randn(shape, generator=gen).to(device))
        _sync(device)
        sent0 = engine.sent_bytes()["total"] if sp_group is not None else 0
        times = []
        for _ in range(timed):
            noise = torch.randn(shape, generator=gen).to(device)
            _sync(device)
            t0 = time.perf_counter()
            engine.generate_chunk(noise)
            _sync(device)
            times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    sent = (engine.sent_bytes()["total"] - sent0) / timed if sp_group is not None else 0
    formula = engine.chunk_comm().total if sp_group is not None else 0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    out = dict(ms=sec * 1e3, fps=4 * infer.chunk_frames / sec, kv_bytes=kv_bytes(engine.cache), sent=sent,
               formula=formula, peak=peak, passes=len(infer.denoising_steps) + 1)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=None, choices=sorted(SETTINGS),
                   help="default: tiny on CPU; the two full-size settings on CUDA")
    p.add_argument("--kv", nargs="+", default=["bf16"], choices=("bf16", "nvfp4", "nvfp4-fused"),
                   help="KV-cache kinds; nvfp4-fused: the fused NVFP4-KV Triton attention (SP > 1 only)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--chunks", type=int, default=5, help="timed chunks (median reported)")
    p.add_argument("--step", default="eager", choices=("eager", "compile", "auto"),
                   help="chunk passes: eager, or compiled blocks (SP passes capture no CUDA graphs; auto = "
                        "compile+cuda_graph on one GPU, compile under SP)")
    p.add_argument("--out", default=None, help="append JSON lines here (rank 0; e.g. bench/results.jsonl)")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    settings = args.settings or (["wan2.1-1.3b", "wan2.2-ti2v-5b"] if cuda else ["tiny"])
    groups = None
    if world > 1:
        heads = min(preset_config(SETTINGS[s][0]).num_heads for s in settings)
        groups = init_sp_inference(ParallelConfig(sp_size=world), heads)
    device = groups.device if groups else torch.device("cuda" if cuda else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    main_rank = groups is None or groups.rank == 0
    rows = []
    for name in settings:
        model = build_model(name, device, dtype, "bf16")
        for kv in args.kv:
            if kv == "nvfp4-fused" and groups is None:
                print("nvfp4-fused: skipped at SP=1 (the one-rank engine attends dequantized K/V)")
                continue
            r = bench(model, name, kv, groups.sp if groups else None, device, args.chunks, args.step)
            r.update(setting=name, kv=kv)
            rows.append(r)
            if main_rank:
                label = f"{SETTINGS[name][5]} sp{world} kv {kv}"
                extra = dict(setting=name, sp_size=world, kv=kv, dtype=str(dtype).replace("torch.", ""),
                             passes=r["passes"], kv_bytes_per_rank=r["kv_bytes"], sent_bytes_per_chunk=r["sent"],
                             formula_bytes_per_chunk=r["formula"], peak_bytes=r["peak"])
                record(args.out, f"{label} dit fps", "fps", round(r["fps"], 3), "frames/s", **extra)
                record(args.out, f"{label} chunk ms", "chunk_time", round(r["ms"], 3), "ms", **extra)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if main_rank:
        print(f"\nSP={world}, {dtype}, rank 0")
        print(f"{'setting':<19}{'kv':<13}{'ms/chunk':>10}{'DiT FPS':>9}{'KV MiB/rank':>13}{'peak GiB':>10}"
              f"{'sent MB/chunk':>15}{'formula MB':>12}")
        for r in rows:
            print(f"{r['setting']:<19}{r['kv']:<13}{r['ms']:>10.2f}{r['fps']:>9.1f}{r['kv_bytes'] / 2 ** 20:>13.2f}"
                  f"{r['peak'] / 2 ** 30:>10.2f}{r['sent'] / 1e6:>15.2f}{r['formula'] / 1e6:>12.2f}")
    destroy_grid()
    return 0


if __name__ == "__main__":
    sys.exit(main())
