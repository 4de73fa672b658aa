"""Cross-attention text context: one text per video, or one of N texts per token frame (multi-shot).

`WanDiT.embed_context(text)` gives per layer a `(k, v)` pair [B, L, H, D] that every video token attends.
Multi-shot teacher forcing needs each chunk (clean and noisy twin) to attend the caption of its own shot,
while self-attention still spans all shots. `FrameText` carries the K/V of all N captions of a video and
the caption index of every token frame; it is built outside the model (`frame_text_context`) and passed
where the `(k, v)` pair would go, so the model keeps no shot logic and no flags.

Tokens are grouped per (video, caption): each group attends its own caption's K/V in one attention call,
which is exactly the per-chunk computation (no [S, N*L] mask, no K/V copies per frame). Sequence
parallelism (each rank holding whole frames) needs only `frame_text` for the rank's local frames.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass
class FrameText:
    """Per-layer cross-attention K/V of N texts per video and the text each token frame attends.

    k, v: [B, N, L, H, D]; frame_text: [B, F] long in [0, N), F = token frames of the query sequence.
    """

    k: torch.Tensor
    v: torch.Tensor
    frame_text: torch.Tensor

    def attend(self, core: nn.Module, q: torch.Tensor) -> torch.Tensor:
        """q: [B, S, H, D] with S = F * tokens_per_frame -> [B, S, H, Dv]; frame f attends text frame_text[b, f]."""
        b, s, h, d = q.shape
        f = self.frame_text.shape[1]
        assert s % f == 0, f"{s} query tokens are not whole frames of the {f} frames in frame_text"
        qf = q.view(b, f, s // f, h, d)                                       # [B, F, T, H, D]
        ids = self.frame_text.tolist()
        rows, cols, outs = [], [], []
        for bi in range(b):
            for n in sorted(set(ids[bi])):
                sel = [fi for fi, t in enumerate(ids[bi]) if t == n]
                sel_t = torch.tensor(sel, device=q.device)
                qs = qf[bi].index_select(0, sel_t).reshape(1, -1, h, d)      # [1, |sel| * T, H, D]
                o = core(qs, self.k[bi, n][None], self.v[bi, n][None])       # [1, |sel| * T, H, Dv]
                outs.append(o.view(len(sel), s // f, h, -1))
                rows.append(torch.full((len(sel),), bi, device=q.device, dtype=torch.long))
                cols.append(sel_t)
        out = outs[0].new_zeros(b, f, s // f, h, outs[0].shape[-1])
        out = out.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(outs))
        return out.view(b, s, h, -1)


def cross_attend(core: nn.Module, q: torch.Tensor, context) -> torch.Tensor:
    """Attention of queries q [B, S, H, D] to a text context: a `(k, v)` pair or a `FrameText`."""
    if isinstance(context, FrameText):
        return context.attend(core, q)
    k, v = context
    return core(q, k, v)


def frame_text_context(model, texts: torch.Tensor, frame_text: torch.Tensor) -> list[FrameText]:
    """Per-layer `FrameText` of a `WanDiT`: texts [B, N, L, text_dim] (N captions per video), frame_text [B, F]."""
    b, n = texts.shape[:2]
    if frame_text.shape[0] != b:
        raise ValueError(f"frame_text has batch {frame_text.shape[0]}, texts {b}")
    if frame_text.numel() and (int(frame_text.min()) < 0 or int(frame_text.max()) >= n):
        raise ValueError(f"frame_text indices must lie in [0, {n}) for {n} texts per video, got "
                         f"[{int(frame_text.min())}, {int(frame_text.max())}]")
    kv = model.embed_context(texts.flatten(0, 1))                             # per layer ([B*N, L, H, D], ...)
    return [FrameText(k.unflatten(0, (b, n)), v.unflatten(0, (b, n)), frame_text) for k, v in kv]
