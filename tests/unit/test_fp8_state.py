"""The FP8 amax histories as checkpoint state (quant/fp8_state.py, the checkpoint's local_rank*.pt).

A save/restore round trip into a fresh model makes its next steps bitwise those of the uninterrupted model; a
history shared by q, k and v is saved once and restored into the shared object; a model of another structure, a
different fp8_amax_history or a local file of another parallel layout is refused (errors name the fix) or, for
the layout, warned about and skipped. The trainer-level resume is tests/unit/test_checkpoint.py (fp8-channel)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from megatron_longlive.quant.fp8 import FP8Linear
from megatron_longlive.quant.fp8_shared_input import share_input_quantization
from megatron_longlive.quant.fp8_state import delayed_scale_state, load_delayed_scale_state
from megatron_longlive.training.checkpoint import CheckpointManager


class QKVO(nn.Module):
    same_input = ("q", "k", "v")

    def __init__(self, dim: int = 32, history: int = 3):
        super().__init__()
        make = lambda: FP8Linear.from_linear(nn.Linear(dim, dim), emulate=True, recipe="channel_delayed",  # noqa: E731
                                             amax_history=history)
        self.q, self.k, self.v, self.o = make(), make(), make(), make()

    def forward(self, x):
        return self.o(self.q(x) * self.k(x).sigmoid() + self.v(x))


def _steps(model, steps, seed):
    g = torch.Generator().manual_seed(seed)
    outs = []
    for i in range(steps):
        x = torch.randn(2, 7, 32, generator=g) * (1 + i)
        y = model(x.requires_grad_())
        y.backward(torch.randn(y.shape, generator=g))
        outs += [y.detach(), x.grad]
    return outs


def _model():
    torch.manual_seed(0)
    m = QKVO()
    assert share_input_quantization(m) == 1
    return m


def test_round_trip_continues_bit_for_bit_and_saves_shared_history_once():
    ref = _model()
    _steps(ref, 3, seed=1)
    state = delayed_scale_state(ref)
    # q/k/v share one x history (under q's name), each has its own dy history; o has both
    assert sorted(state) == ["k.dy_scale", "o.dy_scale", "o.x_scale", "q.dy_scale", "q.x_scale", "v.dy_scale"]
    fresh = _model()
    fresh.load_state_dict(ref.state_dict())
    assert load_delayed_scale_state(fresh, copy.deepcopy(state)) == 6
    assert fresh.k.x_scale is fresh.q.x_scale                        # still one shared object
    without = _model()
    without.load_state_dict(ref.state_dict())
    a, b, c = _steps(ref, 2, seed=2), _steps(fresh, 2, seed=2), _steps(without, 2, seed=2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))         # the histories are what made them equal
    for key, value in delayed_scale_state(ref).items():
        got = delayed_scale_state(fresh)[key]
        assert got["cursor"] == value["cursor"] and torch.equal(got["history"], value["history"]), key


def test_before_the_first_step_the_state_is_empty_and_restores_as_such():
    m = _model()
    state = delayed_scale_state(m)
    assert all(not s["ready"] for s in state.values())
    other = _model()
    _steps(other, 1, seed=0)
    load_delayed_scale_state(other, state)
    assert not other.q.x_scale.ready and not other.o.dy_scale.ready
    assert delayed_scale_state(nn.Linear(3, 3)) is None              # no delayed scales: nothing to save


def test_mismatches_are_clear_errors():
    ref = _model()
    _steps(ref, 1, seed=0)
    state = delayed_scale_state(ref)
    other = QKVO(history=5)
    share_input_quantization(other)
    with pytest.raises(ValueError, match="fp8_amax_history=3.*Fix: resume with the saved values"):
        load_delayed_scale_state(other, state)
    unshared = QKVO()                                                # k and v keep x histories of their own
    with pytest.raises(ValueError, match="ckpt/step_3: its FP8 amax histories do not match.*missing \\['k.x_scale'"):
        load_delayed_scale_state(unshared, state, where="ckpt/step_3")


def test_local_state_of_another_layout_is_skipped_with_a_warning(tmp_path):
    manager = CheckpointManager(str(tmp_path))
    manager.write_local(str(tmp_path), {"fp8_amax_histories": {}})
    assert manager.load_local(str(tmp_path)) == {"fp8_amax_histories": {}}
    torch.save({"layout": {"world_size": 2}, "state": {"x": 1}}, manager.local_file(str(tmp_path)))
    with pytest.warns(UserWarning, match="start afresh"):
        assert manager.load_local(str(tmp_path)) is None
    assert CheckpointManager(str(tmp_path / "other")).load_local(str(tmp_path / "none")) is None
