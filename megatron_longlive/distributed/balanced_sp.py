"""Balanced-SP layout of a teacher-forcing sequence (DESIGN.md §4): pure functions, no communication.

The global teacher-forcing sequence is `[x_0 .. x_{n-1} | z_0 .. z_{n-1}]` (clean chunks, then noisy
chunks; `training/teacher_forcing.py`), i.e. `2F` "sequence frames" of `tokens_per_frame` tokens,
sequence frame `g` being video frame `g % F`, noisy iff `g >= F`.

* balanced: rank r holds the clean *and* noisy tokens of the same contiguous chunks, local layout
  `[x_r, z_r]`; every rank carries the same number of loss-bearing (noisy) tokens, and only needs the
  latents of its own frames (so it VAE-encodes only those, plus a halo).
* naive: the global sequence is cut contiguously; with SP=2 rank 0 holds only clean tokens and no loss.

Ulysses' all-to-all gathers the ranks' local sequences rank-major, so attention sees the order
`gathered_order(layout)` (`[x_0, z_0, x_1, z_1, ...]` for balanced); `sp_mask` is the teacher-forcing
mask permuted into that order, i.e. still exactly the mask of DESIGN.md §3.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from ..models.wan.attention import ChunkMask
from ..training.teacher_forcing import teacher_forcing_mask

LayoutKind = Literal["balanced", "naive"]


@dataclasses.dataclass(frozen=True)
class TFLayout:
    """How a teacher-forcing sequence of `num_chunks` chunks is split over `sp_size` ranks."""

    num_chunks: int
    chunk_frames: int
    tokens_per_frame: int
    sp_size: int
    kind: LayoutKind = "balanced"

    def __post_init__(self):
        for name in ("num_chunks", "chunk_frames", "tokens_per_frame", "sp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TFLayout.{name} must be >= 1, got {getattr(self, name)}")
        if self.kind not in ("balanced", "naive"):
            raise ValueError(f"parallel.sp_layout: unknown layout {self.kind!r}. Fix: use 'balanced' or 'naive'.")

    @property
    def num_frames(self) -> int:
        """Latent frames of the video (F)."""
        return self.num_chunks * self.chunk_frames

    @property
    def seq_len(self) -> int:
        """Tokens of the whole [clean | noisy] sequence."""
        return 2 * self.num_frames * self.tokens_per_frame

    def check_even(self) -> None:
        """Raise unless every rank holds the same number of whole frames (needed by the all-to-all)."""
        if self.kind == "balanced" and self.num_chunks % self.sp_size:
            raise ValueError(f"balanced SP: num_chunks={self.num_chunks} must be divisible by sp_size={self.sp_size}. "
                             f"Fix: use clips of a multiple of {self.sp_size * self.chunk_frames} latent frames "
                             f"or change parallel.sp_size.")
        if self.kind == "naive" and (2 * self.num_frames) % self.sp_size:
            raise ValueError(f"naive SP: 2 * num_frames={2 * self.num_frames} must be divisible by "
                             f"sp_size={self.sp_size} (ranks hold whole frames). Fix: change the clip length.")


def split_evenly(n: int, parts: int, index: int) -> range:
    """The `index`-th of `parts` contiguous ranges covering 0..n-1 (earlier ranges get the remainder)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def rank_chunks(layout: TFLayout, rank: int) -> range:
    """Balanced layout: the temporal chunks whose clean and noisy tokens rank `rank` holds."""
    assert layout.kind == "balanced", "rank_chunks is defined for the balanced layout"
    return split_evenly(layout.num_chunks, layout.sp_size, rank)


def local_seq_frames(layout: TFLayout, rank: int) -> torch.Tensor:
    """[F_local] long: the global sequence frames (0..2F-1, see module doc) rank `rank` holds, in local order."""
    f = layout.num_frames
    if layout.kind == "naive":
        return torch.tensor(list(split_evenly(2 * f, layout.sp_size, rank)), dtype=torch.long)
    chunks = rank_chunks(layout, rank)
    clean = torch.arange(chunks.start * layout.chunk_frames, chunks.stop * layout.chunk_frames)
    return torch.cat([clean, clean + f])  # [x_r, z_r]


def frames_to_tokens(seq_frames: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Sequence-frame indices -> token indices of the global [clean | noisy] sequence."""
    return (seq_frames[:, None] * tokens_per_frame + torch.arange(tokens_per_frame)).reshape(-1)


def local_token_index(layout: TFLayout, rank: int) -> torch.Tensor:
    """[S_local] long: positions in the global [clean | noisy] sequence of rank `rank`'s local tokens."""
    return frames_to_tokens(local_seq_frames(layout, rank), layout.tokens_per_frame)


def gathered_order(layout: TFLayout) -> torch.Tensor:
    """[S] long: the global token order attention sees after the rank-major all-to-all gather."""
    return torch.cat([local_token_index(layout, r) for r in range(layout.sp_size)])


def sp_mask(layout: TFLayout, device: torch.device | str | None = None) -> ChunkMask:
    """The teacher-forcing mask in the gathered (rank-major) order."""
    mask = teacher_forcing_mask(layout.num_chunks, layout.chunk_frames, layout.tokens_per_frame)
    return mask.permute(gathered_order(layout)).to(device)


def local_frame_info(layout: TFLayout, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(video frame index [F_local], is_noisy [F_local] bool) of rank `rank`'s local frames, local order."""
    g = local_seq_frames(layout, rank)
    return g % layout.num_frames, g >= layout.num_frames


def loss_tokens_per_rank(layout: TFLayout) -> list[int]:
    """Loss-bearing (noisy) tokens each rank holds."""
    return [int(local_frame_info(layout, r)[1].sum()) * layout.tokens_per_frame for r in range(layout.sp_size)]


def balance_report(layout: TFLayout) -> dict:
    """Per-rank token and loss-token counts with their max/min (max/min = inf when some rank has none)."""
    loss = loss_tokens_per_rank(layout)
    tokens = [local_seq_frames(layout, r).numel() * layout.tokens_per_frame for r in range(layout.sp_size)]
    return dict(kind=layout.kind, sp_size=layout.sp_size, tokens=tokens, loss_tokens=loss,
                loss_max=max(loss), loss_min=min(loss),
                loss_max_over_min=(max(loss) / min(loss)) if min(loss) else float("inf"))
