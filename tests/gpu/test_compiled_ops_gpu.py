"""train.compile_elementwise on CUDA: every elementwise chain compiled by Inductor (Triton kernels) and its eager form
at the 1.3B width (3 frames of 1560 tokens, 1536 channels, 12 heads), forward and every gradient, both against the
same chain in float64: compiled is no less accurate than eager (max and mean error within 1.25x eager's). Triton
keeps some of eager's intermediate bf16 roundings in float32 (norm_modulate's normalized value: 29% of its outputs
moved by a unit in the last place on an H100, session 17), which moves values towards the float64 result; printed:
per tensor, the share of values that differ from eager and compiled's max / mean error relative to eager's."""
from __future__ import annotations

import pytest
import torch

from tests.unit.test_compiled_ops import compare_to_float64

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", ["norm_modulate", "layer_norm_affine", "gated_residual", "rms_norm", "rope"])
def test_compiled_chain_no_less_accurate_than_eager_on_cuda(name):
    torch._dynamo.reset()
    rows = compare_to_float64(name, device="cuda", b=1, f=3, per=1560, d=1536, heads=12)
    for i, (differ, max_ratio, mean_ratio) in enumerate(rows):
        print(f"{name} tensor {i}: {differ:.2%} differ from eager; error vs float64, compiled / eager: max "
              f"{max_ratio:.3f}, mean {mean_ratio:.3f}")
