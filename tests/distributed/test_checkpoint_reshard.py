"""A DCP checkpoint written by SP=2 training (AdamW state included) resumes at SP=4 and at SP=1, and one
written at TP=2 resumes at TP=1 and SP=2, with the same next losses as the uninterrupted run; a resume into more DP ranks than saved is refused on every
rank (no hang). FP8 training with delayed scales resumes bit-identically at SP=2 (each rank's amax histories come
back from its own local file) and restarts the histories, with a warning, under another layout."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.distributed.launch import spawn

from .tf_harness import make_model, setup_rank, train_steps

SAVE_AT, NEXT = 2, 2  # save after 2 steps, compare the 2 following losses

pytestmark = pytest.mark.distributed


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.0, 0.999))


def _save_worker(rank, world, tp, sp, run_dir):
    from megatron_longlive.distributed.checkpoint import DistCheckpointManager

    groups, model, layout = setup_rank(tp, sp)
    opt = _adamw(model)
    train_steps(model, opt, groups, layout, range(SAVE_AT))
    manager = DistCheckpointManager(run_dir, keep_last=2, groups=groups)
    path = manager.save(SAVE_AT, model, opt, None, {"step": SAVE_AT})
    return path, [loss for loss, _ in train_steps(model, opt, groups, layout, range(SAVE_AT, SAVE_AT + NEXT))]


def _resume_worker(rank, world, tp, sp, run_dir):
    from megatron_longlive.distributed.checkpoint import DistCheckpointManager

    groups, model, layout = setup_rank(tp, sp, seed_model=False)
    with torch.no_grad():  # make sure the weights really come from the checkpoint
        for p in model.parameters():
            p.fill_(0.5)
    opt = _adamw(model)
    manager = DistCheckpointManager(run_dir, keep_last=2, groups=groups)
    state = manager.load(manager.latest(), model, opt, None)
    assert state["step"] == SAVE_AT
    return [loss for loss, _ in train_steps(model, opt, groups, layout, range(SAVE_AT, SAVE_AT + NEXT))]


@pytest.mark.parametrize("saved,resumed", [((1, 2), [(1, 4), (1, 1)]), ((2, 1), [(1, 1), (1, 2)])],
                         ids=["sp2->sp4,sp1", "tp2->tp1,sp2"])
def test_checkpoint_resumes_under_another_layout(tmp_path, saved, resumed):
    """(tp, sp) of the saving run -> (tp, sp) of the resuming runs: same next losses."""
    run_dir = str(tmp_path / "run")
    out = spawn(_save_worker, saved[0] * saved[1], *saved, run_dir)
    path, expected = out[0]
    assert path.endswith(f"step_{SAVE_AT:08d}") and all(o == out[0] for o in out)
    for tp, sp in resumed:
        for losses in spawn(_resume_worker, tp * sp, tp, sp, run_dir):
            assert losses == pytest.approx(expected, rel=1e-5), f"resume at TP={tp} SP={sp}"


def _dp_worker(rank, world, run_dir):
    from megatron_longlive.distributed.checkpoint import DistCheckpointManager
    from megatron_longlive.distributed.grid import init_grid

    groups = init_grid(1, 1, 4)
    manager = DistCheckpointManager(run_dir, keep_last=2, groups=groups)
    model = make_model()
    opt = _adamw(model)
    try:
        manager.load(manager.latest(), model, opt, None)
    except ValueError as e:
        return str(e)
    return "loaded"


def test_resume_with_more_dp_ranks_is_refused(tmp_path):
    run_dir = str(tmp_path / "run")
    spawn(_save_worker, 2, 1, 2, run_dir)  # SP=2, DP=1: one trainer state (dp_rank 0)
    out = spawn(_dp_worker, 2, run_dir)  # DP=2
    assert all("no trainer state for dp_rank(s) [1]" in msg for msg in out), out


def _fp8_provider():
    from megatron_longlive.config import QuantConfig
    from megatron_longlive.quant.providers import build_linear_provider

    return build_linear_provider(QuantConfig(linear="fp8", fp8_recipe="channel_delayed", fp8_amax_history=4))


def _fp8_save_worker(rank, world, sp, run_dir):
    from megatron_longlive.distributed.checkpoint import DistCheckpointManager
    from megatron_longlive.training.checkpoint import local_state

    groups, model, layout = setup_rank(1, sp, provider=_fp8_provider())
    opt = _adamw(model)
    train_steps(model, opt, groups, layout, range(SAVE_AT))
    manager = DistCheckpointManager(run_dir, keep_last=2, groups=groups)
    manager.save(SAVE_AT, model, opt, None, {"step": SAVE_AT}, local_state=local_state(model))
    return [loss for loss, _ in train_steps(model, opt, groups, layout, range(SAVE_AT, SAVE_AT + NEXT))]


def _fp8_resume_worker(rank, world, sp, run_dir, restore):
    import warnings

    from megatron_longlive.distributed.checkpoint import DistCheckpointManager
    from megatron_longlive.training.checkpoint import restore_local_state

    groups, model, layout = setup_rank(1, sp, seed_model=False, provider=_fp8_provider())
    opt = _adamw(model)
    manager = DistCheckpointManager(run_dir, keep_last=2, groups=groups)
    path = manager.latest()
    manager.load(path, model, opt, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if restore:
            restore_local_state(model, manager, path)
    losses = [loss for loss, _ in train_steps(model, opt, groups, layout, range(SAVE_AT, SAVE_AT + NEXT))]
    return losses, [str(w.message) for w in caught]


def test_fp8_delayed_scales_resume_bit_identically(tmp_path):
    run_dir = str(tmp_path / "run")
    expected = spawn(_fp8_save_worker, 2, 2, run_dir)[0]
    for losses, warned in spawn(_fp8_resume_worker, 2, 2, run_dir, True):
        assert losses == expected and not warned           # exact: every rank's histories came back
    for losses, _ in spawn(_fp8_resume_worker, 2, 2, run_dir, False):
        assert losses != expected                          # without them the scales differ: the state matters
    for losses, warned in spawn(_fp8_resume_worker, 1, 1, run_dir, True):   # SP=1: another layout
        assert any("start afresh" in w for w in warned), warned
        assert losses == pytest.approx(expected, rel=2e-2)
