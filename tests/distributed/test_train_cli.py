"""`longlive train` under torchrun: SP=2 and TP=2 on 2 gloo processes train 2 steps with the same losses
and gradient norms as the same command at SP=1 (1 process), write one metrics file and a DCP checkpoint."""
from __future__ import annotations

import os

import pytest

from .tf_harness import run_longlive_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # three torchrun launches: ~1-3 min each on 2 busy cores


def test_longlive_train_sp2_and_tp2_match_sp1(tmp_path):
    sp1 = run_longlive_train(str(tmp_path / "sp1"), 1)
    for name, overrides in (("sp2", ["parallel.sp_size=2"]), ("tp2", ["parallel.tp_size=2"])):
        metrics = run_longlive_train(str(tmp_path / name), 2, *overrides)
        assert [m["step"] for m in metrics] == [1, 2]
        for a, b in zip(metrics, sp1):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), name
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), name
        assert os.path.exists(tmp_path / name / "checkpoints" / "step_00000002" / "COMPLETE")
        assert os.path.exists(tmp_path / name / "checkpoints" / "step_00000002" / "trainer_rank0.pt")
