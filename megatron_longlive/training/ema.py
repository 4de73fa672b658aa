"""Exponential moving average of the trainable weights (LongLive-2.0 uses decay 0.99).

The shadow copy is float32 and keyed by parameter name, so it checkpoints as a plain tensor dict
(DCP-friendly) and can be swapped into the model for evaluation with `copy_to`.
"""
from __future__ import annotations

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param, for every parameter with requires_grad."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable weights with the EMA weights."""
        params = dict(model.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        assert not missing, f"EMA keys differ from the model's trainable parameters: {sorted(missing)[:5]}"
        for name, value in state.items():
            self.shadow[name].copy_(value)
