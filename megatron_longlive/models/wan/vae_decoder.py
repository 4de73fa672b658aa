"""Causal streaming decoder for the Wan2.1 / Wan2.2 VAEs: decode latent chunk i from the carried conv caches of i-1.

Why it is exact. diffusers' `AutoencoderKLWan.decode` runs the decoder once per latent frame with a `feat_cache`
holding the last 2 input frames of every temporal conv (kernel 3). That is one causal convolution (2 zero frames
on the left) over the whole video, cut into 1-frame pieces. Here a chunk of k latent frames goes through the
decoder in one call: every temporal conv sees `cat(cache[2 frames], x[t frames])` and writes the last 2 frames
of that back into its cache in place. Zero caches are the zero padding, so the first chunk uses the same code.
The only first-chunk differences are the causal frame grouping (1 + 4k pixel frames):

* `upsample3d` (temporal x2): the clip's first frame is not upsampled in time; frames 1.. go through the causal
  `time_conv` (zero-padded as if frame 1 started the clip) and each becomes 2 frames (channels [0:c] / [c:2c]).
* Wan2.2's `DupUp3D` shortcut drops its first `factor_t - 1` output frames on the first chunk.

So chunk 0 of k latent frames gives 1 + 4(k - 1) pixel frames and every later chunk 4k; the concatenation equals
the full-video decode (tests/unit/test_vae_decoder.py, float32 <= 1e-4). Everything else (RMS norm over
channels, SiLU, per-frame spatial attention, nearest 2x upsampling + 3x3 conv) works frame by frame. The
upsampling + 3x3 conv runs as one 2x2 conv per output phase on the source (`NearestUp2xConv`): 2.25x fewer MACs.

Speed comes from batching the k latent frames (4k pixel frames) through each conv instead of 1 frame at a time,
from channels-last 3D convs (cuDNN NDHWC), BF16, and from in-place caches at fixed addresses, which keep the
steady-state step free of allocations so it can be captured in a CUDA graph (`StreamingVAEDecoder(cuda_graph=True)`)
or compiled (`compile=True`). Weights load from the diffusers `AutoencoderKLWan` state dict with the same key
names (official files go through diffusers' conversion in `vae.py`).
"""
from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

CACHE_FRAMES = 2  # temporal kernel 3 - 1: frames of its input each causal conv carries to the next chunk


def _like_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d if `x` is laid out that way (C innermost), else contiguous."""
    if x.dim() == 5 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


class CausalConv3d(nn.Module):
    """Conv3d, causal in time via a carried cache of the last 2 input frames; spatial zero padding."""

    def __init__(self, in_dim: int, out_dim: int, kernel: tuple[int, int, int], scale: int = 1):
        super().__init__()
        kt, kh, kw = kernel
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim, kt, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.in_dim, self.out_dim, self.kt, self.padding = in_dim, out_dim, kt, (0, kh // 2, kw // 2)
        self.scale = scale  # spatial size of the input relative to the latent grid (for cache shapes)
        self.tscale = 1  # frames of its input per latent frame (set by the decoder; for activation sizes)
        self.slot: int | None = None  # index into the cache list (temporal convs only), set by the decoder

    def forward(self, x: torch.Tensor, caches: list[torch.Tensor] | None = None) -> torch.Tensor:
        if self.kt > 1:
            assert self.kt == CACHE_FRAMES + 1 and caches is not None and self.slot is not None
            cache = caches[self.slot]  # [b, c, 2, h, w]
            x = torch.cat([cache, x], dim=2)  # [b, c, 2 + t, h, w]
            cache.copy_(x[:, :, -CACHE_FRAMES:])
        return self.conv(x)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution proper, on the cache-extended input (no temporal padding). Other number formats
        replace this module from outside (quant/fp8_conv/module.py: FP8CausalConv3d overrides only this)."""
        return F.conv3d(x, self.weight, self.bias, padding=self.padding)


class RMSNorm(nn.Module):
    """Wan's RMS norm over channels (dim 1), computed in float32: normalize(x) * sqrt(C) * gamma."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))
        self.scale = dim ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma.view(1, -1, 1, 1, 1) if x.dim() == 5 else self.gamma
        return F.normalize(x.float(), dim=1).to(x.dtype) * self.scale * gamma


class ResidualBlock(nn.Module):
    """RMS norm, SiLU, causal conv, twice, plus a 1x1x1 shortcut when the width changes."""

    def __init__(self, in_dim: int, out_dim: int, scale: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3), scale)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3), scale)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, (1, 1, 1), scale) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)), caches)
        x = self.conv2(F.silu(self.norm2(x)), caches)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions of each frame (1x1 convs as linears)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        fmt = _like_format(x)
        y = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)  # [bt, 1, hw, c]
        q, k, v = F.linear(y, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [bt, 1, hw, c]
        y = F.linear(y, self.proj.weight.view(c, c), self.proj.bias)
        y = y.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)  # [b, c, t, h, w], channels-last strides
        return (y + x).contiguous(memory_format=fmt)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, 1), ResidualBlock(dim, dim, 1)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
        x = self.resnets[0](x, caches)
        return self.resnets[1](self.attentions[0](x), caches)


def nearest_up2x_phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin, 1, 3, 3] -> [4 * Cout, Cin, 1, 2, 2]: the 3x3 conv of a nearest-2x-upsampled input as one 2x2
    conv of the source per output phase (py, px) (output pixel (2i + py, 2j + px)), phase-major rows.

    Why: nearest 2x repeats each source pixel twice per axis, so the 3 taps of an output row of phase py cover only
    2 distinct source rows: phase 0 reads rows i - 1 (tap 0) and i (taps 1 + 2), phase 1 rows i (taps 0 + 1) and
    i + 1 (tap 2). Summing the taps that meet the same source pixel gives the 2x2 phase kernels: 16 MACs per output
    pixel instead of 36, on a 4x smaller input that is never materialized upsampled."""
    m = weight.new_tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]])   # [phase, 2 source taps, 3 taps]
    w = torch.einsum("yak,xbl,oitkl->yxoitab", m, m, weight)                   # [py, px, Cout, Cin, 1, 2, 2]
    return w.reshape(-1, *w.shape[3:])


def interleave_phases(y: torch.Tensor, cout: int, h: int, w: int,
                      memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The 2x2 phase conv's output y [b, 4 * Cout, t, h + 1, w + 1] (corner positions of the source padded by 1)
    -> the upsampled conv output [b, Cout, t, 2h, 2w]: pixel (2i + py, 2j + px) is phase (py, px) at corner
    (i + py, j + px), in `memory_format`."""
    b, _, t = y.shape[:3]
    y = y.view(b, 2, 2, cout, t, h + 1, w + 1)
    rows = [torch.stack([y[:, py, px, :, :, py:py + h, px:px + w] for px in (0, 1)], dim=-1) for py in (0, 1)]
    return torch.stack(rows, dim=-3).reshape(b, cout, t, 2 * h, 2 * w).contiguous(memory_format=memory_format)


class NearestUp2xConv(CausalConv3d):
    """Nearest 2x upsampling of h and w (= diffusers' 'nearest-exact' at an integer factor) followed by a per-frame
    3x3 conv, computed without the upsampled tensor: one 2x2 conv of the source with the 4 phase kernels of
    `nearest_up2x_phase_weights` (2.25x fewer MACs), then `interleave_phases`. Input [b, c, t, h, w], output
    [b, Cout, t, 2h, 2w]; the weight keeps the 3x3 shape of the checkpoints. `scale` is the output's spatial size
    relative to the latent grid."""

    def __init__(self, in_dim: int, out_dim: int, scale: int):
        super().__init__(in_dim, out_dim, (1, 3, 3), scale)

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = F.conv3d(x, nearest_up2x_phase_weights(self.weight), self.bias.repeat(4), padding=(0, 1, 1))
        return interleave_phases(y, self.out_dim, h, w, _like_format(x))


class Upsample(nn.Module):
    """Optional causal temporal x2 (`upsample3d`), then spatial nearest x2 + 3x3 conv per frame (NearestUp2xConv)."""

    def __init__(self, dim: int, out_dim: int, temporal: bool, scale: int):
        super().__init__()
        # nn.Identity keeps diffusers' parameter names (resample.1.*; resample.0 was the parameter-free upsampling)
        self.resample = nn.Sequential(nn.Identity(), NearestUp2xConv(dim, out_dim, 2 * scale))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), scale) if temporal else None

    def forward(self, x: torch.Tensor, caches: list[torch.Tensor], first: bool) -> torch.Tensor:
        if self.time_conv is not None:
            head, rest = (x[:, :, :1], x[:, :, 1:]) if first else (None, x)
            if rest.shape[2]:
                b, c, t, h, w = rest.shape
                y = self.time_conv(rest, caches)  # [b, 2c, t, h, w]: channels [0:c] -> even frame, [c:] -> odd
                rest = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device,
                                   memory_format=_like_format(x))
                rest[:, :, 0::2] = y[:, :c]
                rest[:, :, 1::2] = y[:, c:]
            x = rest if head is None else (torch.cat([head, rest], dim=2) if rest.shape[2] else head)
        return self.resample[1](x)


class DupUp(nn.Module):
    """Wan2.2's parameter-free shortcut: spread channel groups over (time, h, w) sub-positions."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def forward(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        b, _, t, h, w = x.shape
        fmt = _like_format(x)
        x = x.repeat_interleave(self.repeats, dim=1).reshape(b, self.out_dim, self.ft, self.fs, self.fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * self.ft, h * self.fs, w * self.fs)
        if first:
            x = x[:, :, self.ft - 1:]
        return x.contiguous(memory_format=fmt)


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks, then the stage's upsampler; Wan2.2 adds the DupUp shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample: str | None, residual: bool,
                 scale: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(in_dim if i == 0 else out_dim, out_dim, scale)
                                      for i in range(num_res_blocks + 1)])
        self.residual = residual
        up = None
        if upsample is not None:
            up = Upsample(out_dim, out_dim if residual else out_dim // 2, upsample == "upsample3d", scale)
        if residual:  # diffusers WanResidualUpBlock names
            self.upsampler = up
            self.avg_shortcut = (DupUp(in_dim, out_dim, 2 if upsample == "upsample3d" else 1, 2)
                                 if up is not None else None)
        else:  # diffusers WanUpBlock names
            self.upsamplers = nn.ModuleList([up]) if up is not None else None

    def forward(self, x: torch.Tensor, caches: list[torch.Tensor], first: bool) -> torch.Tensor:
        x_in = x
        for resnet in self.resnets:
            x = resnet(x, caches)
        up = self.upsampler if self.residual else (self.upsamplers[0] if self.upsamplers is not None else None)
        if up is not None:
            x = up(x, caches, first)
        if self.residual and self.avg_shortcut is not None:
            x = x + self.avg_shortcut(x_in, first)
        return x


class Decoder(nn.Module):
    """The Wan VAE decoder (diffusers `WanDecoder3d` parameter names), run on a chunk with explicit caches."""

    def __init__(self, dim: int, z_dim: int, dim_mult: list[int], num_res_blocks: int,
                 temperal_upsample: list[bool], out_channels: int, is_residual: bool):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
        self.conv_in = CausalConv3d(z_dim, dims[0], (3, 3, 3), 1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList()
        scale = 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0 and not is_residual:
                in_dim //= 2  # Wan2.1's upsamplers halve the width
            up_flag = i != len(dim_mult) - 1
            mode = ("upsample3d" if temperal_upsample[i] else "upsample2d") if up_flag else None
            self.up_blocks.append(UpBlock(in_dim, out_dim, num_res_blocks, mode, is_residual, scale))
            scale *= 2 if up_flag else 1
        self.norm_out = RMSNorm(out_dim)
        self.conv_out = CausalConv3d(out_dim, out_channels, (3, 3, 3), scale)
        tscale = 1
        for block in self.up_blocks:
            for m in block.resnets.modules():
                if isinstance(m, CausalConv3d):
                    m.tscale = tscale
            up = block.upsampler if is_residual else (block.upsamplers[0] if block.upsamplers else None)
            if up is not None and up.time_conv is not None:
                up.time_conv.tscale, tscale = tscale, 2 * tscale
            if up is not None:
                up.resample[1].tscale = tscale
        self.conv_out.tscale = tscale

    def forward(self, x: torch.Tensor, caches: list[torch.Tensor], first: bool) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x, caches), caches)
        for block in self.up_blocks:
            x = block(x, caches, first)
        return self.conv_out(F.silu(self.norm_out(x)), caches)


@dataclasses.dataclass
class DecodeState:
    """The carried causal-conv caches of one stream (fixed addresses: reset zeroes them in place)."""

    caches: list[torch.Tensor]
    """Per temporal conv: the last 2 frames of its input, [b, c_in, 2, h * scale, w * scale]."""
    first: bool = True
    """The next chunk starts the clip (1 + 4(k-1) pixel frames)."""

    def reset(self) -> None:
        for c in self.caches:
            c.zero_()
        self.first = True


class StreamingWanDecoder(nn.Module):
    """post_quant_conv + decoder (+ unpatchify, clamp): raw latent chunk [b, z, k, h, w] -> pixels in [-1, 1]."""

    def __init__(self, config: dict):
        super().__init__()
        c = dict(config)
        self.z_dim, self.patch_size = c["z_dim"], c.get("patch_size") or 1
        self.temporal_stride = c.get("scale_factor_temporal", 4)
        self.post_quant_conv = CausalConv3d(c["z_dim"], c["z_dim"], (1, 1, 1))
        self.decoder = Decoder(c.get("decoder_base_dim") or c["base_dim"], c["z_dim"], list(c["dim_mult"]),
                               c["num_res_blocks"], list(c["temperal_downsample"])[::-1], c["out_channels"],
                               bool(c.get("is_residual", False)))
        if c.get("attn_scales"):
            raise ValueError(f"VAE config attn_scales={c['attn_scales']}: the Wan decoder has no attention in its "
                             f"up blocks. Fix: use an official Wan2.1/Wan2.2 VAE config (attn_scales=[]).")
        for i, m in enumerate(self.temporal_convs):
            m.slot = i

    @property
    def temporal_convs(self) -> list[CausalConv3d]:
        """The convs that carry a cache, in slot order (looked up each time: convs may be swapped from outside)."""
        return [m for m in self.modules() if isinstance(m, CausalConv3d) and m.kt > 1]

    @classmethod
    def from_diffusers(cls, model: nn.Module) -> "StreamingWanDecoder":
        """Build from a diffusers `AutoencoderKLWan` (config + weights), on its device and dtype."""
        p = model.decoder.conv_in.weight
        with torch.device("meta"):
            ours = cls(dict(model.config))
        ours = ours.to_empty(device=p.device).to(p.dtype)
        ours.load_diffusers_state_dict(model.state_dict())
        return ours

    def to_channels_last(self, enable: bool = True) -> "StreamingWanDecoder":
        """Store the conv weights channels-last 3D (NDHWC, what cuDNN runs fastest in BF16) or back."""
        fmt = torch.channels_last_3d if enable else torch.contiguous_format
        for p in self.parameters():
            if p.dim() == 5:
                p.data = p.data.contiguous(memory_format=fmt)
        return self

    def load_diffusers_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load the `decoder.*` and `post_quant_conv.*` tensors of an `AutoencoderKLWan` state dict (strict)."""
        own = self.state_dict()
        missing = [k for k in own if k not in sd]
        if missing:
            raise ValueError(f"diffusers VAE state dict lacks {len(missing)} decoder tensors, e.g. {missing[:5]}. "
                             f"Fix: pass the state dict of an AutoencoderKLWan with the same config.")
        new = {}
        for k, v in own.items():
            src = sd[k]
            if src.dim() == 4 and v.dim() == 5:  # per-frame Conv2d [o, i, kh, kw] -> [o, i, 1, kh, kw]
                src = src.unsqueeze(2)
            if src.shape != v.shape:
                raise ValueError(f"VAE tensor {k}: shape {tuple(src.shape)} != expected {tuple(v.shape)}. "
                                 f"Fix: build the decoder from the same config as the weights.")
            new[k] = src
        self.load_state_dict(new, strict=True)

    def new_state(self, batch: int, height: int, width: int, device=None, dtype=None,
                  channels_last: bool = False) -> DecodeState:
        """Zero caches for latents of spatial size height x width."""
        p = next(self.parameters())
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        caches = [torch.zeros(batch, m.in_dim, CACHE_FRAMES, height * m.scale, width * m.scale,
                              device=device or p.device, dtype=dtype or p.dtype).contiguous(memory_format=fmt)
                  for m in self.temporal_convs]
        return DecodeState(caches)

    def largest_activation(self, batch: int, height: int, width: int, latent_frames: int) -> int:
        """Elements of the largest conv input/output when decoding `latent_frames` at once (cache included)."""
        return max(batch * max(m.in_dim, m.out_dim) * (m.tscale * latent_frames + (m.kt - 1))
                   * height * m.scale * width * m.scale for m in self.modules() if isinstance(m, CausalConv3d))

    def pixel_frames(self, latent_frames: int, first: bool) -> int:
        """Pixel frames a chunk of `latent_frames` decodes to (1 + 4(k-1) for the first chunk, else 4k)."""
        return self.temporal_stride * latent_frames - (self.temporal_stride - 1 if first else 0)

    def forward(self, z: torch.Tensor, caches: list[torch.Tensor], first: bool) -> torch.Tensor:
        """Raw (denormalized) latents [b, z, k, h, w] -> pixels [b, 3, T, H, W] in [-1, 1]; updates caches."""
        x = self.decoder(self.post_quant_conv(z), caches, first)  # [b, 3 * p * p, T, H / p, W / p]
        p = self.patch_size
        if p > 1:  # diffusers' unpatchify: channel index = c * p * p + q_w * p + q_h
            b, cp, t, h, w = x.shape
            x = x.reshape(b, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2).reshape(b, -1, t, h * p, w * p)
        return x.clamp(-1.0, 1.0)

    def decode_chunk(self, z: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """Decode the next chunk of raw latents of the stream `state`."""
        if z.dim() != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"latent chunk must be [B, {self.z_dim}, k, h, w], got {tuple(z.shape)}.")
        out = self(z, state.caches, state.first)
        state.first = False
        return out


def random_autoencoder(kind: str, tiny: bool = False, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, seed: int = 0, with_encoder: bool = False) -> nn.Module:
    """A diffusers `AutoencoderKLWan` of the official (or tiny) `kind` architecture with random weights, built on
    the meta device and filled directly on `device` (PyTorch's default init distribution: U(+-1/sqrt(fan_in)) for
    weights and biases, ones for norm gains). Much faster than CPU init for the real 0.5-1.4 B-parameter VAEs.
    Without `with_encoder` only `decoder` and `post_quant_conv` are materialized (the encoder stays on meta)."""
    from diffusers import AutoencoderKLWan

    from .vae import WanVAE

    with torch.device("meta"):
        model = AutoencoderKLWan(**WanVAE.config_for(kind, tiny=tiny))  # type: ignore[arg-type]
    parts = [model.decoder, model.post_quant_conv] + ([model.encoder, model.quant_conv] if with_encoder else [])
    gen = torch.Generator(device=device).manual_seed(seed)
    for part in parts:
        part.to_empty(device=device)
        with torch.no_grad():
            for module in part.modules():
                weight = getattr(module, "weight", None)
                if isinstance(weight, nn.Parameter) and weight.dim() > 1:
                    bound = 1.0 / math.sqrt(weight[0].numel())  # 1 / sqrt(fan_in)
                    weight.uniform_(-bound, bound, generator=gen)
                    if isinstance(getattr(module, "bias", None), nn.Parameter):
                        module.bias.uniform_(-bound, bound, generator=gen)
                if isinstance(getattr(module, "gamma", None), nn.Parameter):
                    module.gamma.fill_(1.0)
    for part in parts:
        part.to(dtype)
    return model.eval()


class StreamingVAEDecoder:
    """The engine-facing streaming decoder: normalized latent chunks in, pixel chunks in [-1, 1] out.

    One stream at a time (`reset()` starts a new clip). `decode(chunk)` takes [B, z, k, h, w] latents in the DiT's
    normalized space (WanVAE's convention), returns [B, 3, T, H, W] in `dtype` on `device` with T = 1 + 4(k-1)
    for the clip's first chunk and 4k after. `compile=True` wraps the network in `torch.compile`;
    `cuda_graph=True` captures one CUDA graph per steady-state chunk shape (the first chunk runs eagerly).
    A chunk whose largest activation would exceed `max_elements` (2^31 - 1: 32-bit indexing in conv kernels; e.g.
    Wan2.2 at 704p with 8 latent frames) is decoded as equal sub-chunks in sequence, which is exact because the
    caches carry the causal state (`sub_chunk`).
    `conv_precision="fp8"` swaps the compute-bound convs for E4M3 ones (quant/fp8_conv: FP8 tensor cores on Hopper /
    Ada; input scale per call, so a chunked decode differs from a one-call decode by the quantization noise);
    "bf16" keeps every conv in `dtype`; `fp8_select(name, conv) -> bool` overrides which convs go FP8 (default: the
    roofline rule of quant/fp8_conv/module.py, which keeps narrow, bandwidth-bound convs in `dtype`)."""

    def __init__(self, vae: nn.Module, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                 channels_last: bool | None = None, compile: bool = False, cuda_graph: bool = False,
                 max_elements: int = 2**31 - 1, conv_precision: str = "bf16", fp8_select=None):
        model = getattr(vae, "model", vae)  # WanVAE or AutoencoderKLWan
        cfg = model.config
        self.device = torch.device(device) if device is not None else model.decoder.conv_in.weight.device
        self.dtype = dtype
        self.net = StreamingWanDecoder.from_diffusers(model).to(device=self.device, dtype=dtype).eval()
        self.net.requires_grad_(False)
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        if self.channels_last:
            self.net.to_channels_last()
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("StreamingVAEDecoder(cuda_graph=True) needs a CUDA device. Fix: pass device='cuda' or "
                             "cuda_graph=False.")
        self.cuda_graph = cuda_graph
        if conv_precision == "fp8":  # precision from outside: the quant package swaps modules, the model is unchanged
            from ...quant.fp8_conv.module import apply_fp8_convs, check_fp8_device

            check_fp8_device(self.device)
            if not apply_fp8_convs(self.net, fp8_select):
                warnings.warn("conv_precision='fp8': the selection rule picked no conv of this VAE (all too narrow "
                              "to gain); decoding with every conv in the decoder's dtype", stacklevel=2)
        elif conv_precision != "bf16":
            raise ValueError(f"conv_precision={conv_precision!r}: use 'bf16' (convs in `dtype`) or 'fp8'.")
        self.max_elements = max_elements  # per-call activation limit (32-bit indexing of conv kernels)
        self.mean = torch.tensor(cfg.latents_mean, device=self.device).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, device=self.device).view(1, -1, 1, 1, 1)
        self.fn = torch.compile(self.net, dynamic=False) if compile else self.net
        self.state: DecodeState | None = None
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @property
    def z_dim(self) -> int:
        return self.net.z_dim

    def reset(self) -> None:
        """Start a new clip: zero the caches in place (captured graphs stay valid)."""
        if self.state is not None:
            self.state.reset()

    def pixel_frames(self, latent_frames: int, first: bool) -> int:
        return self.net.pixel_frames(latent_frames, first)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Next normalized latent chunk [B, z, k, h, w] -> pixels [B, 3, T, H, W] in [-1, 1]."""
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"latent chunk must be [B, {self.z_dim}, k, h, w], got {tuple(latents.shape)}.")
        b, _, _, h, w = latents.shape
        if self.state is None or self.state.caches[0].shape[0] != b or self.state.caches[0].shape[-2:] != (h, w):
            if self.state is not None and not self.state.first:
                raise ValueError(f"latent chunk size changed mid-clip to batch {b}, {h}x{w}. Fix: call reset() "
                                 f"before decoding a clip of another size.")
            self.state = self.net.new_state(b, h, w, self.device, self.dtype, self.channels_last)
            self._graphs.clear()
        fmt = torch.channels_last_3d if self.channels_last else torch.contiguous_format
        z = (latents.to(self.device, torch.float32) * self.std + self.mean).to(self.dtype)
        s = self.sub_chunk(b, h, w, z.shape[2])
        outs = []
        for i in range(0, z.shape[2], s):
            zi = z[:, :, i:i + s].contiguous(memory_format=fmt)
            if self.state.first:  # once per clip: eager (keeps compile / CUDA graphs to the steady-state shape)
                outs.append(self.net(zi, self.state.caches, True))
            elif self.cuda_graph:
                outs.append(self._replay(zi))
            else:
                outs.append(self.fn(zi, self.state.caches, False))
            self.state.first = False
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def sub_chunk(self, batch: int, height: int, width: int, latent_frames: int) -> int:
        """Latent frames per decoder call: the largest divisor of `latent_frames` within `max_elements`."""
        for s in range(latent_frames, 0, -1):
            if latent_frames % s == 0 and self.net.largest_activation(batch, height, width, s) <= self.max_elements:
                return s
        raise ValueError(f"one latent frame of {height}x{width} (batch {batch}) already needs "
                         f"{self.net.largest_activation(batch, height, width, 1)} elements > max_elements="
                         f"{self.max_elements}. Fix: decode a smaller batch or raise max_elements.")

    def _replay(self, z: torch.Tensor) -> torch.Tensor:
        key = tuple(z.shape)
        if key not in self._graphs:
            caches = self.state.caches
            saved = [c.clone() for c in caches]
            static_in = z.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up (cuDNN plans, compile) outside the capture
                for _ in range(2):
                    self.fn(static_in, caches, False)
            torch.cuda.current_stream(self.device).wait_stream(side)
            for c, v in zip(caches, saved):  # the warm-up advanced the caches: restore them
                c.copy_(v)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # the DiT may run in another thread
                static_out = self.fn(static_in, caches, False)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(z)
        graph.replay()
        return static_out.clone()
