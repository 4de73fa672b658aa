"""The FFN (fc1 -> GELU(tanh) -> fc2) with fc2 a frozen FP8Linear, its GELU fused with fc2's input quantization.

`fuse_gelu_quant(model)` swaps every such `nn.Sequential` (the Wan blocks' `ffn`) for `FP8GeluFFN`: the same
children under the same names (state dicts unchanged), and at inference (no grad, fc2 frozen, on CUDA or under
TRITON_INTERPRET=1) one kernel (fp8_gelu_quant_triton) turns fc1's output into fc2's E4M3 operand instead of
Inductor's GELU + row-amax + cast chain. In training with both linears in the channel recipe
(quant.fp8_recipe=channel_delayed) it runs fp8_channel.FP8ChannelFFNFunction: the GELU and its backward fused
into the quantizers. Every other case runs the plain Sequential.
`fuse_for_training` also runs the linears that read the same tensor as one linear (fp8_shared_input.py).
Applied from outside the model by `freeze_for_inference` and `fuse_for_training` (STYLE.md §2).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .fp8 import FP8Linear
from .fp8_gelu_quant_triton import gelu_quant_rowwise


class FP8GeluFFN(nn.Sequential):
    """nn.Sequential(fc1, nn.GELU(approximate="tanh"), fc2: FP8Linear) with the fused inference path."""

    def __init__(self, *modules: nn.Module):
        super().__init__(*modules)
        self.interpret = os.environ.get("TRITON_INTERPRET") == "1"     # read once, not inside a compiled forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self[0], self[2]
        if torch.is_grad_enabled() and _channel_recipe(fc1) and _channel_recipe(fc2):
            return self._fused_training(x)
        if (not isinstance(fc2, FP8Linear) or fc2.qweight is None or torch.is_grad_enabled()   # e.g. LoRA-wrapped
                or not (x.is_cuda or self.interpret) or fc2.tp_group):
            return super().forward(x)
        h = fc1(x)
        lead, k = h.shape[:-1], h.shape[-1]
        qh, sh = gelu_quant_rowwise(h.reshape(-1, k))
        return fc2.frozen_gemm(qh, sh).to(x.dtype).view(*lead, -1)

    def _fused_training(self, x: torch.Tensor) -> torch.Tensor:
        """Training with quant.fp8_recipe=channel_delayed: FP8ChannelFFNFunction (GELU fused into the quantizers).
        Tensor parallel (fc1 column, fc2 row: megatron's FFN split) the function runs on this rank's shards,
        between fc1's and fc2's collectives (quant/tensor_parallel.py)."""
        from .fp8_channel import FP8ChannelFFNFunction
        from .tensor_parallel import tp_forward

        fc1, fc2 = self[0], self[2]
        emulate, out_dtype = fc2.training_settings(x)

        def local(x, b2):
            with torch.autocast(x.device.type, enabled=False):
                return FP8ChannelFFNFunction.apply(x, fc1.weight, fc1.bias, fc2.weight, b2, fc1, fc2, emulate,
                                                   out_dtype, fc2.fast_accum)

        if fc1.tp_group is None and fc2.tp_group is None:
            return local(x, fc2.bias)
        if (fc1.style, fc2.style) != ("column", "row") or fc1.tp_group is not fc2.tp_group:
            raise ValueError(f"FP8GeluFFN: tensor parallel needs fc1 column- and fc2 row-parallel over one group, "
                             f"got {fc1.style} / {fc2.style}")
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        x = copy_to_tensor_model_parallel_region(x, group=fc1.tp_group)        # fc1's input is replicated
        return tp_forward(local, x, fc2.bias, "row", fc2.tp_group)


def _channel_recipe(m: nn.Module) -> bool:
    return isinstance(m, FP8Linear) and m.recipe == "channel_delayed" and m.qweight is None


def _is_gelu_fp8_ffn(m: nn.Module) -> bool:
    return (type(m) is nn.Sequential and len(m) == 3 and isinstance(m[1], nn.GELU)
            and m[1].approximate == "tanh" and isinstance(m[2], FP8Linear))


def fuse_gelu_quant(model: nn.Module) -> int:
    """Swap each fc1 -> GELU(tanh) -> FP8Linear Sequential in `model` for FP8GeluFFN; returns how many."""
    found = [(name, m) for name, m in model.named_modules() if _is_gelu_fp8_ffn(m)]
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8GeluFFN(*m))
    return len(found)


def fuse_for_training(model: nn.Module, quant_cfg) -> int:
    """With quant.linear=fp8 and quant.fp8_recipe=channel_delayed, swap the FFNs for FP8GeluFFN (its fused
    training path) and run linears that read the same tensor as one linear (fp8_shared_input.py: x quantized
    once, one GEMM per pass);
    returns how many FFNs were swapped (0 for any other config)."""
    if quant_cfg.linear != "fp8" or quant_cfg.fp8_recipe != "channel_delayed":
        return 0
    from .fp8_shared_input import share_input_quantization

    share_input_quantization(model)
    return fuse_gelu_quant(model)
