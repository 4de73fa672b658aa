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
    (`use_fast_accum`, Transformer Engine's choice for fprop; ~14-bit accumulation on Hopper); the data- and
    weight-gradient GEMMs always promote to fp32. H100: 5B DiT 50.4 -> 53.1 FPS, 5B FFN training linears
    1.45 -> 1.55x BF16, 1.35e-3 relative error vs exact accumulation (bench/RESULTS.md). Off: every GEMM promotes."""
    kv_cache: Literal["bf16", "nvfp4"] = "bf16"
    """KV-cache storage at inference."""
    packed_base: bool = False
    """Store frozen base weights packed in NVFP4 (LoRA memory mode)."""
