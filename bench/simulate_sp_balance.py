"""Per-rank work of teacher-forcing training under Balanced vs naive SP, by simulation (no GPU needed).

For each model setting, video length and SP degree this counts, per rank: tokens (real and padded to the
all-to-all size), loss-bearing tokens, training FLOPs (linears, Ulysses self-attention counting only
the blocks the teacher-forcing mask allows, cross-attention; x3 for forward + backward), the FLOPs a
ring-style context-parallel attention would need for the rank's own queries (where layout balance
matters for attention), pixel frames the rank must VAE-encode (own frames + left halo), and memory
estimates (activations without and with per-block checkpointing, VAE input). Weights and optimizer state are identical on
all ranks and left out. Prints a table; appends one JSON line per (setting, seconds, sp, layout) to --out.

  python bench/simulate_sp_balance.py --out bench/results.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.record import record  # noqa: E402
from megatron_longlive.config import preset_config  # noqa: E402
from megatron_longlive.distributed.balanced_sp import split_evenly  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    preset: str
    fps: int
    tokens_per_frame: int
    chunk_frames: int
    pixel_hw: tuple[int, int]


SETTINGS = [Setting("wan2.1-1.3b 480p", "wan2.1-1.3b", 16, 1560, 3, (480, 832)),
            Setting("wan2.2-ti2v-5b 704p", "wan2.2-ti2v-5b", 24, 880, 8, (704, 1280))]
BYTES = 2  # bf16 activations


def latent_frames(seconds: int, fps: int) -> int:
    """Wan's causal VAE: 1 + 4k pixel frames -> 1 + k latent frames."""
    return (fps * seconds) // 4 + 1


def pixel_frames(lat_lo: int, lat_hi: int) -> int:
    """Pixel frames behind latent frames [lo, hi): latent 0 <- 1 frame, latent j >= 1 <- 4 frames."""
    return sum(1 if j == 0 else 4 for j in range(lat_lo, lat_hi))


def rank_token_ranges(kind: str, n: int, c: int, tpf: int, sp: int, r: int) -> list[tuple[int, int]]:
    """Rank r's tokens as [start, end) ranges of the global [clean | noisy] sequence."""
    per_chunk, half = c * tpf, n * c * tpf
    if kind == "balanced":
        chunks = split_evenly(n, sp, r)
        a, b = chunks.start * per_chunk, chunks.stop * per_chunk
        return [(a, b), (half + a, half + b)]
    tokens = split_evenly(2 * half, sp, r)
    return [(tokens.start, tokens.stop)]


def allowed_keys(token: int, n: int, c: int, tpf: int) -> int:
    """Keys a query token may see under the teacher-forcing mask (DESIGN.md §3)."""
    per_chunk, half = c * tpf, n * c * tpf
    chunk = (token % half) // per_chunk
    return (chunk + 1) * per_chunk if token < half else chunk * per_chunk + per_chunk


def range_allowed_pairs(a: int, b: int, n: int, c: int, tpf: int) -> int:
    """Σ allowed keys over query tokens [a, b), chunk by chunk (closed form inside a chunk)."""
    per_chunk, total, t = c * tpf, 0, a
    while t < b:
        end = min(b, (t // per_chunk + 1) * per_chunk)
        total += (end - t) * allowed_keys(t, n, c, tpf)
        t = end
    return total


def latent_windows(ranges: list[tuple[int, int]], half: int, tpf: int) -> list[tuple[int, int]]:
    """Merged [lo, hi) windows of video latent frames whose latents the token ranges need."""
    windows = []
    for a, b in ranges:
        for lo, hi in ((a, min(b, half)), (max(a, half), b)):  # clean part, noisy part
            if lo < hi:
                windows.append(((lo % half) // tpf, ((hi - 1) % half) // tpf + 1))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(windows):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def simulate(setting: Setting, seconds: int, sp: int, kind: str, halo_frames: int) -> dict:
    m = preset_config(setting.preset)
    frames = latent_frames(seconds, setting.fps)
    n, c, tpf = frames // setting.chunk_frames, setting.chunk_frames, setting.tokens_per_frame
    seq = 2 * n * c * tpf
    half = seq // 2
    d, hd, heads, layers, text = m.dim, m.head_dim, m.num_heads, m.num_layers, m.text_len
    ranges = [rank_token_ranges(kind, n, c, tpf, sp, r) for r in range(sp)]
    tokens = [sum(b - a for a, b in rr) for rr in ranges]
    padded = max(tokens)  # all-to-all needs equal shards: short ranks compute padding
    all_pairs = range_allowed_pairs(0, seq, n, c, tpf)
    rows = []
    for r, rr in enumerate(ranges):
        loss_tok = sum(max(0, b - max(a, half)) for a, b in rr)
        lin = 2 * padded * layers * (4 * d * d + 2 * d * d + 2 * d * m.ffn_dim) + 2 * layers * 2 * d * d * text
        ulysses_attn = 4 * hd * (heads // sp) * all_pairs * layers
        cross = 4 * hd * heads * padded * text * layers
        ring_attn = 4 * hd * heads * layers * sum(range_allowed_pairs(a, b, n, c, tpf) for a, b in rr)
        own, halo = 0, 0
        for lo, hi in latent_windows(rr, half, tpf):  # each window: own frames + a left halo
            own += pixel_frames(lo, hi)
            halo += min(halo_frames, pixel_frames(0, lo))
        vae_frames = own + halo
        kv_full = 2 * seq * (heads // sp) * hd * BYTES              # gathered K, V of one layer (Ulysses)
        per_layer = padded * BYTES * (16 * d + 2 * m.ffn_dim)      # rough saved activations of one block
        act = layers * per_layer + kv_full
        act_ckpt = padded * layers * d * BYTES + per_layer + kv_full  # block inputs + one block recomputed
        vae_in = vae_frames * 3 * setting.pixel_hw[0] * setting.pixel_hw[1] * BYTES
        rows.append(dict(rank=r, tokens=tokens[r], padded_tokens=padded, loss_tokens=loss_tok,
                         train_tflops=3 * (lin + ulysses_attn + cross) / 1e12,
                         ring_attn_tflops=3 * ring_attn / 1e12, vae_pixel_frames=vae_frames,
                         act_gb=act / 2**30, act_ckpt_gb=act_ckpt / 2**30, vae_input_gb=vae_in / 2**30))
    return dict(setting=setting.name, seconds=seconds, latent_frames=frames, frames_used=n * c, num_chunks=n,
                sp=sp, layout=kind, seq_len=seq, ranks=rows)


def summary(result: dict) -> dict:
    ranks = result["ranks"]

    def spread(key):
        values = [r[key] for r in ranks]
        return max(values), min(values)

    out = {}
    for key in ("loss_tokens", "train_tflops", "ring_attn_tflops", "vae_pixel_frames", "act_gb", "act_ckpt_gb", "vae_input_gb"):
        hi, lo = spread(key)
        out[key] = (hi, lo, (hi / lo) if lo else float("inf"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="append JSON lines here (e.g. bench/results.jsonl)")
    p.add_argument("--seconds", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--sp", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--halo-frames", type=int, default=112,
                   help="left VAE halo in pixel frames (LongLive-2.0: 28 latents = 112 frames)")
    args = p.parse_args(argv)
    head = (f"{'setting':20} {'s':>3} {'chunks':>6} {'sp':>2} {'layout':8} {'loss tok max/min':>22} "
            f"{'train TFLOP max/min':>22} {'ring-attn TFLOP max/min':>24} {'VAE frames max/min':>18} "
            f"{'act GB':>7} {'ckpt GB':>7} {'VAE in GB max':>13}")
    print(head)
    print("-" * len(head))
    for setting in SETTINGS:
        for seconds in args.seconds:
            for sp in args.sp:
                heads = preset_config(setting.preset).num_heads
                if heads % sp:
                    print(f"{setting.name:20} {seconds:>3} {'':>6} {sp:>2} skipped: Ulysses needs sp | num_heads={heads}")
                    continue
                for kind in ("balanced", "naive"):
                    res = simulate(setting, seconds, sp, kind, args.halo_frames)
                    s = summary(res)
                    lt, tf, ra, vf, ag, ac, vi = (s[k] for k in ("loss_tokens", "train_tflops", "ring_attn_tflops",
                                                                  "vae_pixel_frames", "act_gb", "act_ckpt_gb",
                                                                  "vae_input_gb"))
                    print(f"{setting.name:20} {seconds:>3} {res['num_chunks']:>6} {sp:>2} {kind:8} "
                          f"{lt[0]:>9}/{lt[1]:<9} {lt[2]:>4.2f} {tf[0]:>9.1f}/{tf[1]:<9.1f} {tf[2]:>4.2f} "
                          f"{ra[0]:>9.1f}/{ra[1]:<9.1f} {ra[2]:>5.2f} {vf[0]:>6}/{vf[1]:<6} {vf[2]:>4.2f} "
                          f"{ag[0]:>7.1f} {ac[0]:>7.1f} {vi[0]:>13.2f}")
                    record(args.out, f"{setting.name} {seconds}s sp{sp} {kind} TF per-rank simulation",
                           "train_tflops_max_over_min", tf[2], "ratio", simulation=res,
                           loss_tokens_max_over_min=lt[2], vae_frames_max_over_min=vf[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
