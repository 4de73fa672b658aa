"""One input quantization for the channel-recipe linears that read the same tensor (a self-attention's q, k, v).

Under quant.fp8_recipe=channel_delayed a linear's x codes depend only on x and on x's delayed channel scales. The
q, k and v projections of a self-attention read the same tensor, so with one shared scale history their codes are
the same bytes: `SharedInputCodes` quantizes x at the first of them (the owner) and hands the other members those
codes, saving two quantizer passes per attention forward (0.17 ms each at 65520 x 1536 on an H100) and two copies
of the transposed codes kept for the backward. Outputs and gradients are bitwise those of separate linears (their
separate histories would hold equal amaxes).

The cache holds the codes of one input, keyed by the tensor object (a weak reference, its version counter) so a
freed or modified tensor never matches, and drops them once every member has read them. The owner's backward
rolls the shared history (once per step, as a linear's own history rolls); a recomputed forward (activation
checkpointing) quantizes its new input again with the same scales. Modules declare which children read the same
tensor (`same_input`, a model fact: WanSelfAttention's q, k, v; WanCrossAttention's k, v);
`share_input_quantization` wires them from outside the model (STYLE.md §2).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .fp8_channel import DelayedChannelScale, quantize_operand


class SharedInputCodes:
    """The channel codes of the last input of a group of `members` linears, and the group's scale history."""

    def __init__(self, scale: DelayedChannelScale, members: int):
        self.scale, self.members = scale, members
        self._key: tuple | None = None          # (weakref to x, x._version)
        self._codes: tuple | None = None        # (s_x, qx, qx_t)
        self._reads = 0

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """(s_x, qx, qx_t, owner) for x [..., K]: the cached codes when x is the tensor the last owner quantized
        (owner False), else x's own codes (owner True: this call's backward rolls the history)."""
        key = self._key
        hit = key is not None and key[0]() is x and key[1] == x._version
        if not hit:
            self._codes = quantize_operand(x.reshape(-1, x.shape[-1]), self.scale)
            self._key, self._reads = (weakref.ref(x), x._version), 0
        codes = self._codes
        self._reads += 1
        if self._reads >= self.members:          # every member has its codes: hold nothing until the next input
            self._key = self._codes = None
        return (*codes, not hit)

    def roll(self) -> None:
        self.scale.roll()


def _channel_linear(m: nn.Module) -> bool:
    """An unsharded channel-recipe FP8Linear: a tensor-parallel one reads its input through its own
    copy-to-region (a new tensor per linear), so there is no shared tensor to key codes on."""
    from .fp8 import FP8Linear

    return isinstance(m, FP8Linear) and m.recipe == "channel_delayed" and m.tp_group is None


def share_input_quantization(model: nn.Module) -> int:
    """For every module naming children that read one tensor (`same_input`) that are all channel-recipe FP8
    linears: one scale history and one code cache for them. Returns how many groups were wired."""
    groups = 0
    for module in model.modules():
        names = getattr(module, "same_input", ())
        members = [getattr(module, n, None) for n in names]
        if len(members) < 2 or not all(_channel_linear(m) for m in members):
            continue
        shared = SharedInputCodes(members[0].x_scale, len(members))
        for m in members:
            m.x_scale, m.x_codes = shared.scale, shared
        groups += 1
    return groups
