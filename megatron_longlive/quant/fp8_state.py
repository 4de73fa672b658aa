"""The delayed FP8 scales of a model as checkpointable state, so a resumed FP8 run is bit-identical.

Under quant.fp8_recipe=channel_delayed every linear quantizes x and dy with scales taken from its last
`fp8_amax_history` steps of channel amaxes (fp8_channel.DelayedChannelScale). Those histories are not parameters:
they stay out of the model's state dict (checkpoints remain interchangeable with BF16 models) and travel instead in
the checkpoint's per-rank local state (training/checkpoint.py), because each rank's amaxes come from its own
tokens and channel shards. Histories shared by several linears (fp8_shared_input.py) are saved once, under the
first linear that holds them, and restored into the same shared object.
"""
from __future__ import annotations

from torch import nn

from .fp8_channel import delayed_scales


def delayed_scale_state(model: nn.Module) -> dict | None:
    """{module.x_scale / module.dy_scale: history state} of the model; None when it has no delayed scales."""
    state = {key: scale.state_dict() for key, scale in delayed_scales(model)}
    return state or None


def load_delayed_scale_state(model: nn.Module, state: dict, where: str = "checkpoint") -> int:
    """Restore delayed_scale_state() into a model of the same structure; returns how many histories it set."""
    scales = dict(delayed_scales(model))
    missing, extra = sorted(set(scales) - set(state)), sorted(set(state) - set(scales))
    if missing or extra:
        raise ValueError(f"{where}: its FP8 amax histories do not match this model's channel-recipe linears "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unknown "
                         f"{extra[:3]}{'...' if len(extra) > 3 else ''}). Fix: resume with the quant config and "
                         f"model the checkpoint was written with.")
    device = next((p.device for p in model.parameters()), "cpu")
    for key, scale in scales.items():
        scale.load_state_dict(state[key], device)
    return len(scales)
