"""A DCP checkpoint written by SP=2 training (AdamW state included) resumes at SP=4 and at SP=1, and one
written at TP=2 resumes at TP=1 and SP=2, with the same next losses as the uninterrupted run; a resume into more DP ranks than saved is refused on every
rank (no hang)."""
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
