"""`longlive train` under torchrun: SP=2 on 2 gloo processes trains 2 steps with the same losses and
gradient norms as the same command at SP=1 (1 process), writes one metrics file and a DCP checkpoint."""
from __future__ import annotations

import os

import pytest

from .tf_harness import run_longlive_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # two torchrun launches: ~1-3 min on 2 busy cores


def test_longlive_train_sp2_matches_sp1(tmp_path):
    sp2 = run_longlive_train(str(tmp_path / "sp2"), 2, 2)
    sp1 = run_longlive_train(str(tmp_path / "sp1"), 1, 1)
    assert [m["step"] for m in sp2] == [1, 2]
    for a, b in zip(sp2, sp1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert os.path.exists(tmp_path / "sp2" / "checkpoints" / "step_00000002" / "COMPLETE")
    assert os.path.exists(tmp_path / "sp2" / "checkpoints" / "step_00000002" / "trainer_rank0.pt")
