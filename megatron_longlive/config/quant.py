"""Precision of linears and of the KV cache (applied from outside the model, STYLE.md §2)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from .base import ConfigBase

# Module names kept in BF16 by default (LongLive-2.0 keeps embeddings, the head and all norms).
DEFAULT_KEEP = ("patch_embedding", "text_embedding.*", "time_embedding.*", "time_projection.*", "head.*")


@dataclasses.dataclass
class QuantConfig(ConfigBase):
    """Which linear implementation the provider builds, and which modules stay in high precision."""

    _section: ClassVar[str] = "quant"

    linear: Literal["bf16", "fp8", "nvfp4_emulated", "te_nvfp4"] = "bf16"
    """Linear backend: `bf16` (plain torch), `fp8` (Hopper scaled-mm), `nvfp4_emulated` (exact, any device),
    `te_nvfp4` (Transformer Engine on Blackwell)."""
    keep_high_precision: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_KEEP))
    """fnmatch patterns of module names that keep the plain linear whatever `linear` says."""
    rht: bool = True
    """NVFP4: random Hadamard transform on the weight-gradient GEMM inputs."""
    stochastic_rounding: bool = True
    """NVFP4: stochastic rounding of gradients."""
    weight_2d: bool = True
    """NVFP4: 16x16 weight blocks (the same quantization for W and W^T)."""
    fp8_fast_accum: bool = True
    """FP8: forward GEMMs (training fprop and inference) accumulate in the tensor cores' fast accumulator
    (`use_fast_accum`, Transformer Engine's choice for fprop; ~14-bit accumulation on Hopper). H100: 5B DiT
    50.4 -> 53.1 FPS, 1.35e-3 relative error vs promoted accumulation (bench/RESULTS.md). Off: the forward GEMMs
    promote to fp32."""
    fp8_fast_accum_backward: bool = True
    """FP8 training: the data- and weight-gradient GEMMs use the fast accumulator too (default on since the
    measurements below; off: they promote to fp32, Transformer Engine's default). H100, 65520 tokens
    (bench/RESULTS.md "Session 16"): against the exact product of the BF16 operands the wgrad's error goes from
    3.74e-2 (promoted, the E4M3 operands' own cost) to 3.80e-2, fprop and dgrad stay at 3.67e-2; the fast wgrad
    is 0.15% smaller in scale (a least-squares fit). The loss of 60 AdamW steps at the 1.3B block shapes differs
    from the promoted run's by at most 0.023% (smoothed), against 0.60% between FP8 and BF16
    (bench/bench_fp8_loss_track.py). One training pass, channel recipe, promoted -> fast: 1.3B 1536->8960
    1.48 -> 1.56x BF16, FFN with GELU 1.32 -> 1.53x, 5B FFN 1.50 -> 1.67x."""
    fp8_recipe: Literal["rowwise", "channel_delayed"] = "channel_delayed"
    """FP8 training: how x and dy are scaled. `rowwise`: current per-token scales for the GEMMs that reduce over
    channels and per-channel ones for the weight gradient (two codes per operand, 6 bytes per value to quantize).
    `channel_delayed` (default): one delayed per-channel scale per operand (its amax history), folded into the
    weight, so one pointwise E4M3 copy serves all three GEMMs (4 bytes per value, one pass; quant/fp8_channel.py),
    and the FFN's GELU fuses into its quantizers. Faster than `rowwise` on every 1.3B and 5B layer shape (H100,
    graphed, the training step's 65520 tokens: 1.06-1.68x BF16 against 0.82-1.45x; every 5B shape >= 1.53x),
    tiny-model losses within 0.015% of BF16 (rowwise 0.16%); its scales lag one step, so a sudden outlier
    saturates at +-448 for that step (2 binades of headroom)."""
    fp8_amax_history: int = 16
    """FP8 channel_delayed: steps of channel amaxes the scales take the max over."""
    fp8_amax_margin: int = 2
    """FP8 channel_delayed: binades of headroom above that max (values beyond the range saturate at +-448)."""
    kv_cache: Literal["bf16", "nvfp4"] = "bf16"
    """KV-cache storage at inference."""
    packed_base: bool = False
    """Store frozen base weights packed in NVFP4 (LoRA memory mode)."""
