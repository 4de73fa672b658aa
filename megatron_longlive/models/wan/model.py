"""Wan-family diffusion transformer, written as plain math (no process groups, no precision flags).

Parameter names follow the official Wan checkpoints (`blocks.0.self_attn.q.weight`, `head.head`, ...),
so official files load without renaming. Two details make it fit autoregressive training:

* Time modulation is per latent frame: `t` is [B, F], so clean (t=0) and noisy chunks can share one
  sequence. The token sequence is always a concatenation of whole frames of `tokens_per_frame` tokens.
* RoPE positions are explicit (`positions` [S, 3]), so a clean chunk and its noisy twin share
  temporal positions and streaming can keep counting frames.

Linear layers and QK norms come from a `LinearProvider` (precision and tensor parallelism are chosen
there); the self-attention core is an `AttentionCore` module that sequence parallelism may wrap.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...config.model import ModelConfig
from ..compiled_ops import elementwise
from ..provider import LinearProvider
from ..save_inputs import save_inputs
from .attention import AttentionCore, ChunkMask
from .rope import apply_rope, grid_positions, rope_cos_sin
from .text_context import cross_attend

# A per-layer hook of the streaming KV cache: given this chunk's (k, v) [B, S, H, D] and the mask,
# return the (k, v, mask) to attend over (cache contents + this chunk), writing the cache as it likes.
KVHook = Callable[[torch.Tensor, torch.Tensor, "ChunkMask | None"], tuple]


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, cast back (as Wan does). Backward keeps x as given (bf16), not its
    float32 upcast, and recomputes the norm (save_inputs.py: bit for bit the same gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (), (weight,) or (weight, bias): torch's LayerNorm has no bias without a weight
        affine = [p for p in (self.weight, self.bias) if p is not None]
        return save_inputs(functools.partial(layer_norm_fp32, eps=self.eps), x, *affine)


def hi(x: torch.Tensor) -> torch.Tensor:
    """Upcast to at least float32 (bf16 -> fp32; fp64 stays fp64) for norms, modulation and residuals."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@elementwise
def layer_norm_fp32(x: torch.Tensor, *affine: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim in >= float32, cast back to x's dtype; affine: (), (weight,) or (weight, bias)."""
    xf = hi(x)
    w, b = (*(a.to(xf.dtype) for a in affine), None, None)[:2]
    return F.layer_norm(xf, xf.shape[-1:], w, b, eps).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift with per-frame shift/scale. x: [B, S, D]; shift, scale: [B, F, D]."""
    b, s, d = x.shape
    xf = hi(x).view(b, shift.shape[1], -1, d)
    return (xf * (1 + scale[:, :, None]) + shift[:, :, None]).view(b, s, d).type_as(x)


@elementwise
def _norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return modulate(layer_norm_fp32.eager(x, eps=eps), shift, scale)


def norm_modulate(norm: FP32LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """modulate(norm(x), shift, scale); backward keeps only x, shift and scale (not the float32 copies of x
    and of the norm's output that plain autograd keeps when scale is trained) and recomputes both ops."""
    assert norm.weight is None and norm.bias is None, "the norm's parameters would get no gradient"
    return save_inputs(functools.partial(_norm_modulate, eps=norm.eps), x, shift, scale)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate with a per-frame gate [B, F, D], in float32. A trained gate's gradient needs y: backward
    keeps y as given (bf16), not its float32 copy; a frozen gate needs nothing of y, so plain autograd."""
    yg = save_inputs(_times_gate, y, gate) if gate.requires_grad else _times_gate(y, gate)
    return _plus_residual(x, yg)


@elementwise
def _times_gate(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    b, s, d = y.shape
    return hi(y).view(b, gate.shape[1], -1, d) * gate[:, :, None]


@elementwise
def _plus_residual(x: torch.Tensor, yg: torch.Tensor) -> torch.Tensor:
    """x [B, S, D] + yg [B, F, S/F, D] (float32), cast back to x's dtype."""
    return (hi(x).view(yg.shape) + yg).view(x.shape).type_as(x)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep embedding: [cos, sin] of t * 10000^(-i/half), computed in float64. t: [...] -> [..., dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class AttentionProjections(nn.Module):
    """What Wan's self- and cross-attention share: q/k/v column projections, the o row projection, optional
    RMS norms of q and k, and the attention core."""

    def __init__(self, cfg: ModelConfig, provider: LinearProvider, prefix: str):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q = provider.linear(f"{prefix}.q", cfg.dim, cfg.dim, True, "column")
        self.k = provider.linear(f"{prefix}.k", cfg.dim, cfg.dim, True, "column")
        self.v = provider.linear(f"{prefix}.v", cfg.dim, cfg.dim, True, "column")
        self.o = provider.linear(f"{prefix}.o", cfg.dim, cfg.dim, True, "row")
        self.norm_q = provider.qk_norm(f"{prefix}.norm_q", cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = provider.qk_norm(f"{prefix}.norm_k", cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.core = AttentionCore()


class WanSelfAttention(AttentionProjections):
    same_input = ("q", "k", "v")        # children that project the same tensor (a precision backend may share work)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: ChunkMask | torch.Tensor | None = None, kv_hook: KVHook | None = None) -> torch.Tensor:
        # 1. project and split heads: [B, S, H, D] (H is the local head count under TP), rotary positions
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, (-1, self.head_dim)), cos, sin)
        k, v = self.key_value(x, cos, sin)
        # 2. streaming: let the KV cache add its history (and store this chunk)
        if kv_hook is not None:
            k, v, mask = kv_hook(k, v, mask)
        # 3. attention, merge heads, output projection
        return self.o(self.core(q, k, v, mask).flatten(2))

    def key_value(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K (normed, rotated) and V [B, S, H, D] of the tokens x."""
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, (-1, self.head_dim)), cos, sin)
        return k, self.v(x).unflatten(-1, (-1, self.head_dim))


class WanCrossAttention(AttentionProjections):
    """Attention from video tokens to text tokens (no mask, no RoPE)."""
    same_input = ("k", "v")             # both project the text context

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text K/V [B, L, H, D]; computed once per prompt and reusable across chunks."""
        k = self.norm_k(self.k(context)).unflatten(-1, (-1, self.head_dim))
        v = self.v(context).unflatten(-1, (-1, self.head_dim))
        return k, v

    def forward(self, x: torch.Tensor, context_kv) -> torch.Tensor:
        """context_kv: `(k, v)` [B, L, H, D], or a `text_context.FrameText` (a text per token frame, multi-shot)."""
        q = self.norm_q(self.q(x)).unflatten(-1, (-1, self.head_dim))
        return self.o(cross_attend(self.core, q, context_kv).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, provider: LinearProvider, prefix: str):
        super().__init__()
        self.norm1 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(cfg, provider, f"{prefix}.self_attn")
        self.norm3 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(cfg, provider, f"{prefix}.cross_attn")
        self.norm2 = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(provider.linear(f"{prefix}.ffn.0", cfg.dim, cfg.ffn_dim, True, "column"),
                                 nn.GELU(approximate="tanh"),
                                 provider.linear(f"{prefix}.ffn.2", cfg.ffn_dim, cfg.dim, True, "row"))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                context_kv: tuple[torch.Tensor, torch.Tensor], mask: ChunkMask | torch.Tensor | None = None,
                kv_hook: KVHook | None = None) -> torch.Tensor:
        """x: [B, S, D]; e: [B, F, 6, D] float32 time projection per frame."""
        shift, scale, gate, c_shift, c_scale, c_gate = self.modulations(e)
        y = self.self_attn(norm_modulate(self.norm1, x, shift, scale), cos, sin, mask, kv_hook)
        x = gated_residual(x, y, gate)
        x = x + self.cross_attn(self.norm3(x), context_kv)
        y = self.ffn(norm_modulate(self.norm2, x, c_shift, c_scale))
        return gated_residual(x, y, c_gate)

    def modulations(self, e: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift, scale, gate, cross shift, cross scale, cross gate) [B, F, D] float32 from e [B, F, 6, D]."""
        return (hi(self.modulation)[:, None] + e).unbind(2)

    def write_kv(self, x: torch.Tensor, e: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 kv_hook: KVHook) -> None:
        """Only the part of `forward` that reaches the KV cache: this block's K/V of x, handed to kv_hook. The
        last block of a pass whose output is dropped (the streaming context pass) needs nothing else."""
        shift, scale = self.modulations(e)[:2]
        kv_hook(*self.self_attn.key_value(norm_modulate(self.norm1, x, shift, scale), cos, sin), None)


class WanHead(nn.Module):
    def __init__(self, cfg: ModelConfig, provider: LinearProvider):
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = provider.linear("head.head", cfg.dim, math.prod(cfg.patch_size) * cfg.out_channels, True,
                                    "replicated")
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x: torch.Tensor, e_time: torch.Tensor) -> torch.Tensor:
        """x: [B, S, D]; e_time: [B, F, D] float32 time embedding per frame."""
        shift, scale = (hi(self.modulation)[:, None] + e_time[:, :, None]).unbind(2)
        return self.head(norm_modulate(self.norm, x, shift, scale))


def call_block(block: Callable, *args) -> torch.Tensor | None:
    """The default `run_block` of `forward_tokens`: block(*args), where block is a WanBlock or its `write_kv` (a
    compiled step compiles this function once for all blocks, and once more for write_kv)."""
    return block(*args)


class WanDiT(nn.Module):
    """The Wan DiT. `forward` runs a whole video (bidirectional or masked); the finer-grained methods
    (`patchify`, `time_embed`, `embed_context`, `forward_tokens`, `unpatchify`) let teacher forcing and
    the streaming engine assemble their own token sequences."""

    def __init__(self, cfg: ModelConfig, provider: LinearProvider | None = None):
        super().__init__()
        provider = provider or LinearProvider()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(provider.linear("text_embedding.0", cfg.text_dim, d),
                                            nn.GELU(approximate="tanh"),
                                            provider.linear("text_embedding.2", d, d))
        self.time_embedding = nn.Sequential(provider.linear("time_embedding.0", cfg.freq_dim, d), nn.SiLU(),
                                            provider.linear("time_embedding.2", d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), provider.linear("time_projection.1", d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(cfg, provider, f"blocks.{i}") for i in range(cfg.num_layers))
        self.head = WanHead(cfg, provider)

    # ----- pieces -------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, C, T, H, W] latents -> tokens [B, S, D] (frame-major raster) and the token grid (F, H', W')."""
        x = self.patch_embedding(x)
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid

    def unpatchify(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """[B, S, p*C] head output -> [B, C, T, H, W]."""
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        x = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, -1)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw)

    def time_embed(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame timesteps [B, F] (0..1000) -> (embedding [B, F, D], projection [B, F, 6, D]), >= float32."""
        # The linears run in their parameters' dtype (or autocast's); results are upcast to >= fp32.
        w = self.time_embedding[0].weight
        e = self.time_embedding(sinusoidal_embedding(t, self.cfg.freq_dim).to(w.dtype))
        e0 = hi(self.time_projection(e)).unflatten(-1, (6, self.cfg.dim))
        e = hi(e)
        return e, e0

    def embed_context(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Text tokens [B, L, text_dim] -> per-layer cross-attention (k, v), reusable across chunks."""
        ctx = self.text_embedding(context)
        return [blk.cross_attn.project_context(ctx) for blk in self.blocks]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer positions [S, 3] -> cos, sin [S, head_dim/2]."""
        return rope_cos_sin(positions, self.cfg.rope_dims, self.cfg.rope_theta)

    def forward_tokens(self, tokens: torch.Tensor, t: torch.Tensor, context_kv: list, positions: torch.Tensor,
                       mask: ChunkMask | torch.Tensor | None = None, kv_cache=None,
                       run_block: Callable | None = None, need_output: bool = True) -> torch.Tensor | None:
        """Run all blocks and the head on an assembled token sequence.

        tokens: [B, S, D], whole frames; t: [B, F] timesteps of those frames (S = F * tokens_per_frame);
        context_kv: from `embed_context`; positions: [S, 3]; mask: over the S tokens (or None = full);
        kv_cache: None, or an object whose `.hook(layer_index)` returns a `KVHook`.
        run_block: how a block is called, `run_block(block, x, e0, cos, sin, context_kv, mask, hook)`
        (default: plain call); lets a compiled step run every block through one compiled function.
        Returns the head output [B, S, prod(patch) * out_channels]. need_output=False (a pass run only to fill
        kv_cache, e.g. the streaming context pass): the last block stops at its K/V write and the head is
        skipped; returns None. Without a kv_cache the pass is whole (the K/V may be written inside the attention
        core, as SP inference does) and the output is returned.
        """
        e, e0 = self.time_embed(t)
        cos, sin = self.rope(positions)
        x = tokens
        kv_only = not need_output and kv_cache is not None
        run = run_block or call_block
        for i, block in enumerate(self.blocks):
            hook = kv_cache.hook(i) if kv_cache is not None else None
            if kv_only and i == len(self.blocks) - 1:
                run(block.write_kv, x, e0, cos, sin, hook)
                return None
            x = run(block, x, e0, cos, sin, context_kv[i], mask, hook)
        return self.head(x, e)

    # ----- whole video --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, frame_offset: int = 0,
                mask: ChunkMask | torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow velocity of a latent video.

        x: [B, C, T, H, W]; t: [B] (one timestep per video, as Wan) or [B, T'] (per latent frame after
        temporal patching); context: [B, L, text_dim]. mask=None is the bidirectional base model.
        """
        tokens, grid = self.patchify(x)
        if t.ndim == 1:
            t = t[:, None].expand(-1, grid[0])
        positions = grid_positions(*grid, frame_offset=frame_offset, device=x.device)
        out = self.forward_tokens(tokens, t, self.embed_context(context), positions, mask)
        return self.unpatchify(out, grid)

    # ----- initialisation (Wan's scheme) -----------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in list(self.text_embedding) + list(self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        if self.head.head.bias is not None:
            nn.init.zeros_(self.head.head.bias)
