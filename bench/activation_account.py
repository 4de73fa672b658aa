"""Activation memory ACCOUNT of one teacher-forcing training step with activation checkpointing (issue 6):
which saved tensors hold the bytes between forward and backward, counted on the CPU and extrapolated.

Method (a measurement of saved tensors at small size, then a stated linear model):
  * The model of `--preset` is built at its real width (dim, ffn_dim, heads, text length) but 2 layers, as
    training builds the variant (bench/train_variants.py; LoRA applied as the Trainer does), and run under
    bf16 autocast on the CPU at two short sequence lengths S (clean + noisy tokens).
  * `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd keeps for backward; each is
    attributed to the module that saved it (forward hooks keep a module stack), counted once per storage
    (views of one buffer, and tables shared by all blocks, count once), and parameters / buffers are left
    out (they are training state: bench/memory_account.py).
  * Attention is modelled as FlashAttention / FlexAttention keep it on the GPU (q, k, v, out in bf16 and
    a float32 log-sum-exp per query and head), not as the CPU's math path that keeps the S x S weights.
  * Three parts: (1) the checkpointed step: what the checkpoint saves per block (its inputs) and what
    the layers outside the blocks save (embeddings, text K/V, head, loss); (2) one block run without
    checkpointing: what its recompute holds while its backward runs; (3) per part, bytes = a + b * S
    fitted on the two lengths (exact for these layers: every saved activation is [.., S, ..] or S-free)
    and evaluated at the training shape's S.
  Predicted activation peak during backward (lower bound: gradients in flight and kernel workspaces are
  not counted) = L * x_block + outside + one block's recompute, and with train.offload_activations
  2 * x_block + outside + one block's recompute (the block being recomputed and the prefetched one).

  python bench/activation_account.py --preset wan2.1-1.3b                       # 21 x 480 x 832, chunk 3
  python bench/activation_account.py --preset tiny --latent-frames 4 --height 64 --width 64
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.record import record  # noqa: E402
from bench.train_variants import build_variant_model, variant_tree  # noqa: E402
from megatron_longlive.config import build_config  # noqa: E402
from megatron_longlive.models.wan.attention import AttentionCore  # noqa: E402
from megatron_longlive.training.lora import apply_lora  # noqa: E402
from megatron_longlive.training.teacher_forcing import teacher_forcing_loss, teacher_forcing_mask  # noqa: E402
from megatron_longlive.training.trainer import apply_activation_checkpointing  # noqa: E402

BLOCK = re.compile(r"^blocks\.\d+$")


class SavedTensorAccount:
    """Bytes autograd saves for backward, by label. label(module_stack, tensor) names where a saved tensor
    belongs; the stack lists the qualified names of the modules whose forward is running (outermost first)."""

    def __init__(self, model: torch.nn.Module, label):
        self.model, self.label = model, label
        self.bytes: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._seen: dict[int, torch.Tensor] = {}          # storage pointer -> tensor (kept alive: no pointer reuse)
        self._state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def _pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self._state and ptr not in self._seen:
            self._seen[ptr] = t
            self.bytes[self.label(self._stack, t)] += t.untyped_storage().nbytes()
        return t

    @contextlib.contextmanager
    def counting(self):
        names = {m: n for n, m in self.model.named_modules()}
        handles = []

        def leave(mod, args, out) -> None:  # a forward hook that returned a value would replace the output
            self._stack.pop()

        for m, n in names.items():
            handles.append(m.register_forward_pre_hook(lambda mod, args, n=n: self._stack.append(n)))
            handles.append(m.register_forward_hook(leave))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()


class _FlashLikeAttention(torch.autograd.Function):
    """Saves what FlashAttention / FlexAttention keep for backward: q, k, v, out and a float32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, mask, core):
        with torch.no_grad():
            out = core(q, k, v, mask)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)   # [B, H, S]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("accounting only")


@contextlib.contextmanager
def flash_like_attention():
    original = AttentionCore.forward

    def forward(self, q, k, v, mask=None):
        return _FlashLikeAttention.apply(q, k, v, mask, lambda *a: original(self, *a))

    AttentionCore.forward = forward
    try:
        yield
    finally:
        AttentionCore.forward = original


def _step_label(stack: list[str], t: torch.Tensor) -> str:
    if any(BLOCK.match(n) for n in stack):                     # the checkpoint's save of a block's inputs
        return "block input x (per block)" if t.dim() == 3 else "shared inputs (e0, cos, sin; once)"
    if not stack:
        return "outside: loss and glue"
    name = stack[-1]
    if re.match(r"^blocks\.\d+\.cross_attn\.", name):           # embed_context's per-layer text K/V projections
        return "outside: text K/V projections (all layers)"
    return "outside: " + name.split(".")[0]


def _block_label(stack: list[str], t: torch.Tensor) -> str:
    inner = [n for n in stack if n.startswith("blocks.0.")]
    if not inner:
        return "block ops (modulate, residuals)"
    parts = inner[-1].split(".")[2:]
    if parts[-1] in ("lora_A", "lora_B", "base_layer"):
        parts = parts[:-1]
    return ".".join(parts[:2])


def _config(a, latent_frames: int, layers: int, variant: str):
    tree = variant_tree(variant, a.lora_rank)
    train = {**tree["train"], "precision": "bf16", "wandb_mode": "disabled", "chunk_frames": a.chunk_frames}
    train.pop("offload_activations", None)
    return build_config({"model": {"preset": a.preset, "num_layers": layers}, "quant": tree["quant"],
                         "data": {"height": a.height, "width": a.width, "num_frames": 1 + 4 * (latent_frames - 1)},
                         "train": train})


def measure(a, variant: str, latent_frames: int, height: int, width: int) -> tuple[int, dict, dict]:
    """Saved bytes of (the checkpointed step, one block's recompute) at a small shape; returns (S, step, block)."""
    cfg = _config(a, latent_frames, 2, variant)
    model = build_variant_model(cfg, "cpu", packed_dtype=torch.bfloat16)
    if cfg.train.lora_rank > 0:
        apply_lora(model, cfg.train.lora_targets, cfg.train.lora_rank, cfg.train.lora_alpha)  # base dtype (bf16)
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, m.in_channels, latent_frames, height, width, generator=g)
    text = torch.randn(1, m.text_len, m.text_dim, generator=g)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    # (2) one block without checkpointing, on the inputs the step gives it
    with autocast, torch.no_grad():
        tokens, grid = model.patchify(latents)
        ctx = model.embed_context(text)[0]
    s = 2 * tokens.shape[1]
    x = torch.randn(1, s, m.dim, generator=g).to(tokens.dtype).requires_grad_()
    full = cfg.train.lora_rank == 0
    _, e0 = model.time_embed(torch.zeros(1, 2 * grid[0]))
    e0 = e0.detach().requires_grad_(full)
    positions = torch.cat([torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1)
                           .reshape(-1, 3)] * 2)
    cos, sin = model.rope(positions)
    ctx = tuple(c.detach().requires_grad_() for c in ctx)
    pt = m.patch_size[0]
    mask = teacher_forcing_mask(latent_frames // a.chunk_frames, a.chunk_frames // pt, grid[1] * grid[2])
    block = SavedTensorAccount(model, _block_label)
    with flash_like_attention(), block.counting(), autocast:
        model.blocks[0](x, e0, cos, sin, ctx, mask)
    # (1) the whole step, blocks checkpointed
    apply_activation_checkpointing(model)
    step = SavedTensorAccount(model, _step_label)
    with flash_like_attention(), step.counting(), autocast:
        teacher_forcing_loss(model, latents, text, a.chunk_frames, torch.Generator().manual_seed(1))
    step.bytes["block input x (per block)"] //= cfg.model.num_layers
    return s, dict(step.bytes), dict(block.bytes)


def fit(small: tuple[int, dict], large: tuple[int, dict], s: int) -> dict[str, tuple[float, float, float]]:
    """Per label: (fixed bytes a, bytes per token b, a + b * s) from the two measured lengths."""
    (s1, d1), (s2, d2) = small, large
    out = {}
    for k in sorted(set(d1) | set(d2)):
        b = (d2.get(k, 0) - d1.get(k, 0)) / (s2 - s1)
        fixed = d1.get(k, 0) - b * s1
        out[k] = (fixed, b, fixed + b * s)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="wan2.1-1.3b")
    p.add_argument("--latent-frames", type=int, default=21, help="latent frames of the training clip")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--chunk-frames", type=int, default=3)
    p.add_argument("--lora-rank", type=int, default=0, help="nvfp4_lora adapter rank (0: 16)")
    p.add_argument("--variants", nargs="+", default=["nvfp4_lora", "bf16"], choices=["nvfp4_lora", "bf16"])
    p.add_argument("--out", default=None, help="append JSON lines here (bench/record.py)")
    a = p.parse_args(argv)
    cfg = _config(a, a.latent_frames, 1, "bf16")
    layers = build_config({"model": {"preset": a.preset}}).model.num_layers
    f, hh, ww = a.latent_frames, a.height // 8, a.width // 8
    _, ph, pw = cfg.model.patch_size
    s = 2 * f * (hh // ph) * (ww // pw)
    # small shapes: 1 chunk, then 2 chunks, of 16 x 16-latent frames (64 tokens per frame with 2 x 2 patches)
    small = [(a.chunk_frames, 16, 16), (2 * a.chunk_frames, 16, 16)]
    gib = 2 ** 30 if s >= 2 ** 14 else 2 ** 20   # GiB at training sizes, MiB for small runs
    unit = "GiB" if gib == 2 ** 30 else "MiB"
    print(f"Activation memory ACCOUNT (saved tensors, CPU-measured at S = 2 x frames x 64 tokens, fitted a + b*S; "
          f"attention as FlashAttention), {a.preset}, extrapolated to {f} x {a.height} x {a.width} (S = {s}), "
          f"{layers} layers, bf16 autocast, activation checkpointing")
    for variant in a.variants:
        runs = [measure(a, variant, *shape) for shape in small]
        step = fit((runs[0][0], runs[0][1]), (runs[1][0], runs[1][1]), s)
        block = fit((runs[0][0], runs[0][2]), (runs[1][0], runs[1][2]), s)
        label = variant + (f" r{a.lora_rank or 16}" if variant == "nvfp4_lora" else "")
        print(f"\n{label}: checkpointed step (what stays from forward to backward)")
        print(f"  {'part':<46}{'bytes/token':>12}{'fixed MiB':>11}{unit + ' at S':>10}")
        for k, (fixed, b, at) in step.items():
            print(f"  {k:<46}{b:>12.0f}{fixed / 2**20:>11.1f}{at / gib:>10.3f}")
        x = step["block input x (per block)"][2]
        outside = sum(v[2] for k, v in step.items() if not k.startswith("block input"))
        print(f"  {'=> block inputs, all ' + str(layers) + ' layers':<46}{'':>12}{'':>11}{layers * x / gib:>10.3f}")
        print(f"{label}: one block's recompute (held while its backward runs)")
        for k, (fixed, b, at) in sorted(block.items(), key=lambda kv: -kv[1][2]):
            print(f"  {k:<46}{b:>12.0f}{fixed / 2**20:>11.1f}{at / gib:>10.3f}")
        internals = sum(v[2] for v in block.values())
        print(f"  {'=> one block':<46}{'':>12}{'':>11}{internals / gib:>10.3f}")
        peak = layers * x + outside + internals
        peak_off = 2 * x + outside + internals
        print(f"{label}: predicted activation peak (lower bound) = L*x + outside + block = {layers} x "
              f"{x / gib:.3f} + {outside / gib:.3f} + {internals / gib:.3f} = {peak / gib:.2f} {unit}; with "
              f"offload_activations 2*x + outside + block = {peak_off / gib:.2f} {unit}")
        name = f"{a.preset} activation account {f}x{a.height}x{a.width} chunk{a.chunk_frames} bf16 ac {label}"
        parts = {"block_input_x": x, "outside": outside, "block_recompute": internals}
        for suffix, value in (("", peak), (" offload", peak_off)):
            record(a.out, name + suffix, "activation_peak_model", round(value / 2**30, 4), "GiB", kind="model",
                   layers=layers, tokens=s, bytes={k: int(v) for k, v in parts.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
