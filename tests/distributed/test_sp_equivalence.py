"""SP=2/4 (balanced and naive), TP=2, TP=2 x SP=2 and SP=2 x DP=2 on gloo reproduce single-process
teacher-forcing training: loss and gradients at every step and the parameters after it (float32)."""
from __future__ import annotations

import pytest

from megatron_longlive.distributed.launch import spawn

from .tf_harness import assert_same, parallel_worker, reference_run

STEPS = 3

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reference():
    return {dp: reference_run(STEPS, dp) for dp in (1, 2)}


@pytest.mark.parametrize("tp,sp,dp,kind", [
    (1, 2, 1, "balanced"), (1, 4, 1, "balanced"), (1, 2, 1, "naive"), (1, 4, 1, "naive"),
    (2, 1, 1, "balanced"), (2, 2, 1, "balanced"), (1, 2, 2, "balanced"),
], ids=lambda v: str(v))
def test_parallel_training_matches_single_process(reference, tp, sp, dp, kind):
    ref_steps, ref_params = reference[dp]
    results = spawn(parallel_worker, tp * sp * dp, tp, sp, kind, STEPS)
    for rank, (steps, params) in enumerate(results):
        for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(steps, ref_steps)):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"rank {rank} step {step} loss"
            assert_same(grads, ref_grads, f"rank {rank} step {step} grad")
        assert_same(params, ref_params, f"rank {rank} final param")
