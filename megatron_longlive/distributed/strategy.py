"""What `longlive train` plugs into the trainer for TP x SP x DP runs: a step strategy and parallel hooks.

`build_parallel_training(cfg)` builds the grid from `cfg.parallel`, the model (the same full weights as
a single-process run, sliced into megatron-core TP linears when tp_size > 1) with the SP plan applied,
an `SPTeacherForcingStep` (the trainer's `StepStrategy`: each SP rank builds only its local [x_r, z_r]
tokens and returns its share of the loss) and the trainer's `ParallelHooks` (gradient all-reduce,
loss reduction, TP-aware clipping, rank-0 logging, collective DCP checkpoints).
The trainer's data loader is sharded by DP rank; the SP ranks of one DP rank read the same video.

Sigmas must agree inside an SP group and differ across DP ranks: each step draws one seed from the
trainer's generator (identical on every rank), offsets it by the DP rank, and draws the sigmas and
the per-frame noise seed from that.
"""
from __future__ import annotations

import dataclasses

import torch

from ..models.wan import WanDiT
from ..models.wan.sp_plan import WAN_SP_PLAN
from ..training.schedule import sample_sigmas
from .balanced_sp import TFLayout, sp_mask
from .data_parallel import allreduce_gradients, any_rank, reduce_loss
from .grid import ProcessGroups, init_grid
from .sp_plan import apply_sp_plan
from .sp_teacher_forcing import frame_noise, local_tf_loss, needed_frames
from .tensor_parallel import TPLinearProvider, TPQuantProvider, load_full_state_dict


@dataclasses.dataclass
class SPTeacherForcingStep:
    """Teacher-forcing forward + this rank's loss share for one micro-batch under an SP layout."""

    groups: ProcessGroups
    chunk_frames: int
    layout_kind: str = "balanced"
    shift: float = 5.0
    num_train_timesteps: int = 1000
    autocast_dtype: torch.dtype | None = None
    _masks: dict = dataclasses.field(default_factory=dict, repr=False)

    def __call__(self, model, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        g = self.groups
        latents = batch["latents"]                                   # [B, C, F, H, W], the whole clip
        b, c, f, h, w = latents.shape
        _, ph, pw = model.cfg.patch_size
        layout = TFLayout(f // self.chunk_frames, self.chunk_frames, (h // ph) * (w // pw), g.sp_size,
                          self.layout_kind)
        layout.check_even()
        if layout not in self._masks:
            self._masks[layout] = sp_mask(layout, g.device)
        # 1. sigmas (same on the SP group, different per DP rank) and layout-independent noise
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) + 7919 * g.dp_rank
        step_gen = torch.Generator().manual_seed(seed)
        sigmas = sample_sigmas((b, layout.num_chunks), self.shift, self.num_train_timesteps, step_gen)
        noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=step_gen))
        frames = needed_frames(layout, g.sp_rank)
        noise = frame_noise(noise_seed, b, c, frames, h, w, device=g.device)
        # 2. this rank's tokens, forward through the Ulysses-wrapped model, loss share
        with torch.autocast(g.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss = local_tf_loss(model, layout, g.sp_rank, latents[:, :, frames.start:frames.stop].to(g.device),
                                 noise, sigmas.to(g.device), batch["text"].to(g.device), self.num_train_timesteps,
                                 self._masks[layout])
        return loss, b * layout.seq_len // g.sp_size


def parallel_hooks(groups: ProcessGroups, output_dir: str, keep_last: int, model=None, cfg=None):
    """The trainer's ParallelHooks for this grid. Gradient reduction: megatron-core DDP or our bucketed
    all-reduce, as `cfg.parallel.ddp_impl` resolves on this device (native without a cfg)."""
    from ..training.trainer import ParallelHooks
    from .checkpoint import DistCheckpointManager
    from .mcore_ddp import McoreGradSync, resolve_ddp_impl
    from .tensor_parallel import clip_grad_norm_tp

    impl = resolve_ddp_impl(cfg.parallel.ddp_impl, groups.device.type) if cfg is not None else "native"
    zero_grad = None
    if impl == "mcore":
        p = cfg.parallel
        sync = McoreGradSync(model, groups, cfg.model, p.ddp_bucket_size, p.ddp_overlap_grad_reduce,
                             cfg.train.grad_accum)
        grad_sync, zero_grad = sync, sync.zero_grad
    else:
        grad_sync = lambda params: allreduce_gradients(params, groups)  # noqa: E731
    return ParallelHooks(grad_sync=grad_sync, zero_grad=zero_grad,
                         reduce_loss=lambda value: float(reduce_loss(value, groups)),
                         any_rank=lambda flag: any_rank(flag, groups),
                         clip_grad_norm=lambda params, max_norm: clip_grad_norm_tp(params, max_norm, groups.tp),
                         is_logger=groups.rank == 0,
                         checkpoint=DistCheckpointManager(output_dir, keep_last, groups))


def check_tp_quant(cfg) -> None:
    """What tensor parallelism combines with: bf16, fp8 and nvfp4_emulated (sharded quantized linears,
    quant/tensor_parallel.py), full fine-tunes and LoRA alike. Not: Transformer Engine's own linears, a packed
    NVFP4 base (quant.packed_base)."""
    p, q = cfg.parallel, cfg.quant
    if p.tp_size == 1:
        return
    why = ("quant.linear=te_nvfp4 builds Transformer Engine's own linears" if q.linear == "te_nvfp4" else
           "quant.packed_base=true packs a frozen base" if q.packed_base else None)
    if why:
        raise ValueError(f"parallel.tp_size={p.tp_size} with quant.linear={q.linear!r}: {why}, which has no "
                         f"tensor-parallel form here. Fix: tp_size=1 (SP/DP) for this setting, or quant.linear=fp8 / "
                         f"nvfp4_emulated with quant.packed_base=false")


def build_parallel_training(cfg, device: str | torch.device | None = None) -> dict:
    """Grid, model, step strategy and hooks for `Trainer(cfg, **build_parallel_training(cfg))`."""
    from ..training.trainer import build_model

    p = cfg.parallel
    groups = init_grid(p.tp_size, p.sp_size, cfg.model.num_heads, backend=p.backend)
    if device is not None and torch.device(device).type != groups.device.type:
        raise ValueError(f"--device {device} does not match the process-group backend {groups.backend}. "
                         f"Fix: drop --device (nccl uses this rank's GPU, gloo the CPU).")
    check_tp_quant(cfg)
    model = build_model(cfg, device="cpu")  # the full model of a single-process run (seed or init_from)
    if p.tp_size > 1:  # the same weights, sliced into column/row-parallel linears (megatron-core's, or quantized)
        from ..quant.fp8_ffn import fuse_for_training

        full = model.state_dict()
        tp_options = dict(use_cpu_initialization=True, initialize=False)
        with torch.random.fork_rng(devices=[]):  # RNG as after build_model: LoRA then draws what TP=1 draws
            provider = (TPLinearProvider(groups.tp, p.tp_size, **tp_options) if cfg.quant.linear == "bf16"
                        else TPQuantProvider(cfg.quant, groups.tp, p.tp_size, **tp_options))
            model = WanDiT(cfg.model, provider)
            fuse_for_training(model, cfg.quant)
        load_full_state_dict(model, full, groups.tp_rank, p.tp_size)
        if cfg.train.lora_rank > 0:  # TP-sharded adapters (the trainer wraps plain models itself)
            from .tp_lora import apply_tp_lora

            apply_tp_lora(model, cfg.train.lora_targets, cfg.train.lora_rank, cfg.train.lora_alpha, groups.tp)
    model = model.to(groups.device)
    apply_sp_plan(model, WAN_SP_PLAN, groups.sp)
    if groups.dp_sp is not None and cfg.quant.linear == "fp8":
        from ..quant.fp8_channel import reduce_amaxes_over

        reduce_amaxes_over(model, groups.dp_sp)   # FP8 delayed scales from the whole batch's amaxes
    autocast = torch.bfloat16 if (cfg.train.precision == "bf16" and groups.device.type == "cuda") else None
    strategy = SPTeacherForcingStep(groups, cfg.train.chunk_frames, p.sp_layout, cfg.train.timestep_shift,
                                    cfg.train.num_train_timesteps, autocast)
    return dict(model=model, strategy=strategy, device=groups.device, dp_rank=groups.dp_rank,
                dp_size=groups.dp_size, hooks=parallel_hooks(groups, cfg.train.output_dir, cfg.train.keep_last,
                                                             model, cfg))
