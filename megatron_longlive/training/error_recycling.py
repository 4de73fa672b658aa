"""Error recycling for teacher forcing: train the clean history on the model's own degraded predictions.

At inference the AR model conditions on chunks it generated itself, which carry its errors; teacher
forcing conditions on clean data. Error recycling (as in LongLive / Stable-Video-Infinity) closes part of
that gap: each step records the model's x0 errors, and later steps add recorded errors to clean-history
chunks, so the model learns to continue from drifted context.

* Recorded error of noisy chunk i: the x0 estimate minus the clean chunk,
  x0_hat - x = (z - sigma * v_hat) - x = -sigma * (v_hat - v)   [C, chunk_frames, H, W], detached, on CPU.
* Buffer: `num_buckets` noise-level buckets over sigma in [0, 1] (each error goes to its chunk's sigma
  bucket), `bucket_size` entries each; a full bucket replaces a random entry. Per-bucket capacity keeps
  every noise level represented although Wan's shifted schedule draws mostly high sigmas.
* Injection (`degrade`): a video is kept clean with probability `clean_prob`; otherwise each of its clean
  chunks gets, with probability `chunk_prob`, an error drawn uniformly from the stored entries (errors of
  any noise level: a generated chunk has been through the whole denoising chain), scaled by a factor
  uniform in [1 - modulate, 1 + modulate]. Only the clean history changes: noisy twins and loss targets
  are built from the data (`teacher_forcing.build_tf_inputs(history=...)`).
* Recording (`record`): videos kept clean by choice add their errors with probability
  `clean_update_prob` only (their errors come from unrealistically clean context).
All randomness comes from the recycler's own generator, so turning it on does not shift the trainer's
sigma / noise stream, and its state (buffer + generator) round-trips through checkpoints.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class RecyclingOptions:
    """See TrainConfig.error_recycling_* for the meaning of each field."""

    clean_prob: float = 0.2
    chunk_prob: float = 0.9
    num_buckets: int = 20
    bucket_size: int = 32
    modulate: float = 0.3
    clean_update_prob: float = 0.1

    @classmethod
    def from_train_config(cls, tc) -> "RecyclingOptions":
        return cls(**{f.name: getattr(tc, f"error_recycling_{f.name}") for f in dataclasses.fields(cls)})


class ErrorRecycler:
    """Noise-level-bucketed buffer of recent x0 errors and their injection into the clean history."""

    def __init__(self, options: RecyclingOptions, seed: int = 0):
        self.opt = options
        self.generator = torch.Generator().manual_seed(seed)
        # chunk shape (C, cf, H, W) -> one list of [C, cf, H, W] float32 CPU errors per sigma bucket
        self.buckets: dict[tuple[int, ...], list[list[torch.Tensor]]] = {}
        self.total_added = 0

    # ----- buffer -----------------------------------------------------------------------------------
    def bucket_of(self, sigma: float) -> int:
        return min(max(int(sigma * self.opt.num_buckets), 0), self.opt.num_buckets - 1)

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def add(self, error: torch.Tensor, sigma: float) -> None:
        """Store one chunk's error [C, cf, H, W] in the bucket of `sigma`."""
        entry = error.detach().to("cpu", torch.float32, copy=True)
        bucket = self.buckets.setdefault(tuple(entry.shape), [[] for _ in range(self.opt.num_buckets)])
        bucket = bucket[self.bucket_of(sigma)]
        if len(bucket) < self.opt.bucket_size:
            bucket.append(entry)
        else:
            bucket[int(torch.randint(len(bucket), (), generator=self.generator))] = entry
        self.total_added += 1

    def entries(self, shape: tuple[int, ...]) -> list[torch.Tensor]:
        """All stored errors of chunk shape `shape` (every bucket)."""
        return [e for bucket in self.buckets.get(tuple(shape), []) for e in bucket]

    def sample(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """One stored error, uniform over entries, times the modulation factor; None when none is stored."""
        pool = self.entries(shape)
        if not pool:
            return None
        err = pool[int(torch.randint(len(pool), (), generator=self.generator))]
        scale = 1 + self.opt.modulate * (2 * self._rand() - 1)
        return err * scale

    def stats(self) -> dict:
        sizes = [len(b) for per_shape in self.buckets.values() for b in per_shape]
        return {"total_added": self.total_added, "entries": sum(sizes), "filled_buckets": sum(s > 0 for s in sizes)}

    # ----- one training step ------------------------------------------------------------------------
    @torch.no_grad()
    def degrade(self, latents: torch.Tensor, chunk_frames: int, keep_first: int = 0,
                keep_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Clean history for latents [B, C, F, H, W]: (history or None when nothing was injected, clean [B] bool).

        clean[b]: video b was kept clean by the `clean_prob` draw. keep_first / keep_mask: the first
        `keep_first` latent frames of videos with keep_mask True stay exact (a conditioning frame).
        """
        b, c, f, h, w = latents.shape
        shape = (c, chunk_frames, h, w)
        clean = torch.zeros(b, dtype=torch.bool)
        if not self.entries(shape):
            return None, clean
        history = latents.clone()
        injected = False
        for bi in range(b):
            if self._rand() < self.opt.clean_prob:
                clean[bi] = True
                continue
            for j in range(f // chunk_frames):
                if self._rand() < self.opt.chunk_prob:
                    err = self.sample(shape).to(latents.device, latents.dtype)
                    history[bi, :, j * chunk_frames:(j + 1) * chunk_frames] += err
                    injected = True
        if keep_first and keep_mask is not None:
            m = keep_mask.to(latents.device)
            history[m, :, :keep_first] = latents[m, :, :keep_first]
        return (history if injected else None), clean

    @torch.no_grad()
    def record(self, pred: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, chunk_frames: int,
               clean: torch.Tensor | None = None, loss_weight: torch.Tensor | None = None) -> None:
        """Store this step's x0 errors -sigma * (pred - target) per chunk. pred, target: [B, C, F, H, W]
        velocities of the noisy half; sigma: [B, n]; frames without loss (loss_weight 0) store zero error."""
        b, _, f, _, _ = pred.shape
        sig = sigma.detach().to("cpu", torch.float64)
        err = (pred.detach().float() - target.detach().float()).cpu()
        if loss_weight is not None:
            err = err * loss_weight.detach().cpu()[:, None, :, None, None]
        for bi in range(b):
            if clean is not None and bool(clean[bi]) and self._rand() >= self.opt.clean_update_prob:
                continue
            for j in range(f // chunk_frames):
                s = float(sig[bi, j])
                self.add(-s * err[bi, :, j * chunk_frames:(j + 1) * chunk_frames], s)

    # ----- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "total_added": self.total_added,
                "buckets": {k: [list(b) for b in v] for k, v in self.buckets.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.total_added = int(state["total_added"])
        self.buckets = {tuple(k): [list(b) for b in v] for k, v in state["buckets"].items()}
        for per_shape in self.buckets.values():
            if len(per_shape) != self.opt.num_buckets:
                raise ValueError(f"error-recycling state has {len(per_shape)} buckets but "
                                 f"train.error_recycling_num_buckets={self.opt.num_buckets}. Fix: resume with the "
                                 f"same number of buckets")
