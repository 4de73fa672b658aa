"""Few-step LoRA distillation by simplified DMD for `longlive distill` (issue 11)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from .base import ConfigBase


@dataclasses.dataclass
class DistillConfig(ConfigBase):
    """Generator LoRA + critic LoRA on one frozen base; the teacher is the base with adapters off.

    The AR chunk size is `train.chunk_frames`, the sigma shift `train.timestep_shift`; prompts come from the
    training data (`data.*`); the NVFP4-packed base is `quant.packed_base`; memory: `train.activation_checkpointing` and
    `train.offload_activations` apply to the shared model (generator rollout, scores and critic) as in training."""

    _section: ClassVar[str] = "distill"

    init: Literal["direct", "standalone"] = "direct"
    """`direct`: generator, critic and teacher start from the teacher-forced AR checkpoint `teacher` (scores use the
    teacher-forcing layout); `standalone`: all three start from the bidirectional base `base` (full-attention scores)
    and the LoRA is later applied to the AR model."""
    teacher: str = ""
    """AR (teacher-forced) checkpoint: run dir, step dir or .safetensors / Wan checkpoint (init=direct)."""
    base: str = ""
    """Bidirectional base checkpoint (init=standalone)."""
    output_dir: str = "runs/distill"
    """Where adapters (generator/, critic/), metrics.jsonl and the resolved config go."""
    max_steps: int = 100
    """Generator updates."""
    critic_ratio: int = 5
    """Critic updates per generator update (LongLive-2.0: 5)."""
    lr: float = 1e-4
    """Generator LoRA learning rate."""
    critic_lr: float = 1e-4
    """Critic LoRA learning rate."""
    betas: tuple[float, float] = (0.0, 0.999)
    """AdamW betas of both LoRAs."""
    grad_clip: float = 1.0
    """Max gradient norm per LoRA; 0 disables clipping."""
    real_guidance: float = 3.0
    """Classifier-free guidance scale of the real score (teacher); 1 = no unconditional pass."""
    rank: int = 16
    """Generator LoRA rank (LongLive-2.0: 128)."""
    alpha: float = 0.0
    """Generator LoRA alpha; 0 means alpha = rank."""
    critic_rank: int = 16
    """Critic LoRA rank."""
    critic_alpha: float = 0.0
    """Critic LoRA alpha; 0 means alpha = critic_rank."""
    targets: list[str] = dataclasses.field(default_factory=lambda: ["self_attn.q", "self_attn.k", "self_attn.v",
                                                                     "self_attn.o", "cross_attn.q", "cross_attn.k",
                                                                     "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"])
    """Module-name suffixes (native Wan names) that get both adapters."""
    denoising_steps: list[int] = dataclasses.field(default_factory=lambda: [1000, 500])
    """The few-step timestep list the generator is distilled for (4/3/2/1 entries)."""
    rollout_frames: int = 32
    """Latent frames of each self-generated rollout, chunk by chunk through the KV cache (paper: 32)."""
    min_sigma_ratio: float = 0.02
    """Lowest (unshifted) noise level of the DMD re-noising and the critic loss."""
    max_sigma_ratio: float = 0.98
    """Highest (unshifted) noise level of the DMD re-noising and the critic loss."""
    batch: int = 1
    """Prompts per rollout."""
    save_interval: int = 50
    """Generator steps between saves (and one at the end): peft adapters under output_dir/step_N/ and a resumable
    checkpoint (both adapters, both optimizers, step, RNG; not the frozen base) under output_dir/checkpoints/."""
    keep_last: int = 3
    """Resumable checkpoints kept in output_dir/checkpoints/ (older ones are deleted; adapter dirs are all kept)."""
    seed: int = 0
    """Seed of noise, sigmas and prompt order."""

    def validate(self) -> None:
        for name in ("max_steps", "critic_ratio", "rank", "critic_rank", "rollout_frames", "batch", "save_interval",
                     "keep_last"):
            if getattr(self, name) < 1:
                raise self.error(name, f"must be >= 1, got {getattr(self, name)}", f"set distill.{name} >= 1")
        if not 1 <= len(self.denoising_steps) <= 8:
            raise self.error("denoising_steps", f"{self.denoising_steps} must have 1..8 entries", "use e.g. [1000, 500]")
        if any(not 0 < t <= 1000 for t in self.denoising_steps) or sorted(self.denoising_steps, reverse=True) != list(
                self.denoising_steps) or len(set(self.denoising_steps)) != len(self.denoising_steps):
            raise self.error("denoising_steps", f"{self.denoising_steps} must be strictly decreasing in (0, 1000]",
                             "use e.g. [1000, 750, 500, 250]")
        if not 0 < self.min_sigma_ratio < self.max_sigma_ratio <= 1:
            raise self.error("min_sigma_ratio", f"need 0 < min_sigma_ratio < max_sigma_ratio <= 1, got "
                             f"{self.min_sigma_ratio}, {self.max_sigma_ratio}", "use 0.02 and 0.98")
        if self.real_guidance < 1:
            raise self.error("real_guidance", f"must be >= 1, got {self.real_guidance}", "use 1 (off) or e.g. 3.0")
        if self.lr <= 0 or self.critic_lr <= 0:
            raise self.error("lr", f"learning rates must be positive, got {self.lr}, {self.critic_lr}", "use e.g. 1e-4")
