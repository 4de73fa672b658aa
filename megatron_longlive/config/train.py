"""Optimisation, checkpointing and logging for `longlive train` / `longlive distill`."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from .base import ConfigBase


@dataclasses.dataclass
class TrainConfig(ConfigBase):
    """Teacher-forcing AR training (and the shared knobs of distillation)."""

    _section: ClassVar[str] = "train"

    output_dir: str = "runs/tiny"
    """Run directory: checkpoints, metrics.jsonl, wandb files, the resolved config."""
    max_steps: int = 200
    """Optimizer steps."""
    lr: float = 1e-3
    """Peak learning rate (LongLive-2.0 5B: 1e-5)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of `lr`."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (LongLive-2.0: (0, 0.999))."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    micro_batch: int = 1
    """Videos per micro-batch."""
    chunk_frames: int = 1
    """Latent frames per AR chunk (LongLive v1: 3, LongLive-2.0: 8)."""
    timestep_shift: float = 5.0
    """Shift of Wan's flow-matching sigma schedule."""
    num_train_timesteps: int = 1000
    """Discrete training timesteps."""
    ema_decay: float = 0.0
    """EMA decay of the weights; 0 disables EMA (LongLive-2.0: 0.99)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast dtype for the forward (bf16 on GPU)."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward (also applied by `longlive distill`)."""
    offload_activations: bool = False
    """With activation_checkpointing: keep each block's saved hidden-state input in pinned host memory from the forward until its recompute (copied on a side stream, the next block's prefetched during backward); exact, saves ~num_layers x tokens x dim x 2 bytes of GPU memory (bf16). Also applied by `longlive distill`."""
    compile_elementwise: str = "auto"
    """auto (on CUDA), on or off: run the DiT's elementwise chains (float32 norms, modulation, gated residuals, RoPE) as torch.compile'd fused kernels (models/compiled_ops.py) instead of one eager kernel per op; the first step compiles them. The 1.3B step on an H100: 6.59 -> 4.84 s (bf16), 6.33 -> 4.49 s (fp8). Values may differ from eager by a unit in the last place of a bf16 value (on CUDA some of eager's intermediate bf16 roundings stay float32: closer to exact math). Also applied by `longlive distill`."""
    lora_rank: int = 0
    """0: full fine-tune; > 0: frozen base + LoRA of this rank."""
    lora_alpha: float = 0.0
    """LoRA alpha (scale alpha/rank); 0 means alpha = rank."""
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["self_attn.q", "self_attn.k", "self_attn.v",
                                                                          "self_attn.o", "cross_attn.q", "cross_attn.k",
                                                                          "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"])
    """Module-name suffixes that get LoRA adapters."""
    save_interval: int = 50
    """Steps between checkpoints (and one on SIGTERM)."""
    keep_last: int = 3
    """Checkpoints to keep."""
    log_interval: int = 1
    """Steps between metric lines."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline by default (no network needed)."""
    seed: int = 0
    """Global seed."""
    init_from: str = ""
    """Starting weights: a safetensors file of WanDiT weights (official Wan names); empty = Wan's random init."""
    per_shot_text: bool = True
    """Multi-shot training: when the dataset gives per-shot captions ('texts' + shot ids), each chunk (clean and noisy twin) cross-attends its own shot's caption; False: the first caption for the whole video. No effect on one-caption data."""
    first_frame_prob: float = 0.0
    """Image-to-video training: chance per video that chunk 0's first latent frame (first temporal patch) is a clean conditioning frame (t = 0, no loss), as Wan2.2-TI2V conditions on the image latent; 0 = off."""
    long_tuning: bool = False
    """Train with the attention pattern of inference (global sink + shot sink + rolling window, sized by infer.sink_frames,
    infer.shot_sink_frames, infer.window_frames) instead of the full causal history; shots from the batch's per-shot
    captions. Needs train.chunk_frames == infer.chunk_frames and, with several shots, micro_batch 1 or equal shot starts."""
    error_recycling: bool = False
    """Error recycling: add the model's own recent x0 errors (a buffer bucketed by noise level) to clean-history chunks, so the AR model learns to recover from its drift. Loss targets never change."""
    error_recycling_clean_prob: float = 0.2
    """Error recycling: fraction of videos whose history is kept clean."""
    error_recycling_chunk_prob: float = 0.9
    """Error recycling: chance that each clean-history chunk of a non-clean video gets a recycled error."""
    error_recycling_num_buckets: int = 20
    """Error recycling: noise-level buckets over sigma in [0, 1]."""
    error_recycling_bucket_size: int = 32
    """Error recycling: errors kept per bucket (a full bucket replaces a random entry)."""
    error_recycling_modulate: float = 0.3
    """Error recycling: an injected error is scaled by a factor uniform in [1 - modulate, 1 + modulate]."""
    error_recycling_clean_update_prob: float = 0.1
    """Error recycling: chance that a video kept clean still adds its errors to the buffer."""

    def validate(self) -> None:
        for name in ("max_steps", "grad_accum", "micro_batch", "chunk_frames", "keep_last", "num_train_timesteps"):
            if getattr(self, name) < 1:
                raise self.error(name, f"must be >= 1, got {getattr(self, name)}", f"set train.{name} >= 1")
        if self.lr <= 0:
            raise self.error("lr", f"must be positive, got {self.lr}", "use e.g. 1e-4")
        if not 0 <= self.ema_decay < 1:
            raise self.error("ema_decay", f"must be in [0, 1), got {self.ema_decay}", "use 0 (off) or e.g. 0.99")
        for name in ("first_frame_prob", "error_recycling_clean_prob", "error_recycling_chunk_prob",
                     "error_recycling_modulate", "error_recycling_clean_update_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise self.error(name, f"must be in [0, 1], got {getattr(self, name)}", f"set train.{name} in [0, 1]")
        for name in ("error_recycling_num_buckets", "error_recycling_bucket_size"):
            if getattr(self, name) < 1:
                raise self.error(name, f"must be >= 1, got {getattr(self, name)}", f"set train.{name} >= 1")
        if self.offload_activations and not self.activation_checkpointing:
            raise self.error("offload_activations", "offloads the inputs that activation checkpointing saves",
                             "set train.activation_checkpointing=true as well (or offload_activations=false)")
        if self.compile_elementwise not in ("auto", "on", "off"):
            raise self.error("compile_elementwise", f"unknown value {self.compile_elementwise!r}", "use auto, on or off")
        if self.lora_rank < 0:
            raise self.error("lora_rank", f"must be >= 0, got {self.lora_rank}", "use 0 (full) or e.g. 16")
