"""The split-KV merge of cuDNN FP8 attention parts (inference/kernels/split_kv_combine_triton.py) and the split count.

- merging the attentions over P key parts by their log-sum-exps equals float64 attention over all keys (an
  independent oracle of the formula), in torch and in the Triton kernel under TRITON_INTERPRET=1;
- the kernel equals the torch reference (bf16 and E4M3 parts, P = 1 and P > 1);
- auto_splits: the 1.3B chunk (444 tiles on 132 SMs) is cut in 2, the 5B one (1320 tiles, 10 full waves) is not,
  a batch > 1 never.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_longlive.inference.kernels.cudnn_fp8_attention import auto_splits
from megatron_longlive.inference.kernels.split_kv_combine_triton import combine_torch


def _parts(p: int, b: int = 1, sq: int = 24, h: int = 3, skv: int = 60, d: int = 16, seed: int = 0):
    """float64 attention of q over each of p key parts: (parts [P, B, Sq, H, D], lse [P, B, H, Sq], full)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for n in (sq, skv, skv))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * d ** -0.5 * 3       # sharp rows: the weights matter
    full = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    parts, lse = [], []
    for sp, vp in zip(s.chunk(p, dim=-1), v.chunk(p, dim=1)):
        parts.append(torch.einsum("bhqk,bkhd->bqhd", sp.softmax(-1), vp))
        lse.append(sp.logsumexp(-1))
    return torch.stack(parts), torch.stack(lse), full


@pytest.mark.parametrize("p", [2, 3])
def test_torch_merge_equals_full_attention(p):
    parts, lse, full = _parts(p)
    vs = torch.linspace(0.5, 2.0, 3)
    out = combine_torch(parts.float(), lse.float(), vs, out_dtype=torch.float32)
    torch.testing.assert_close(out.double(), full * vs.double()[:, None], rtol=1e-5, atol=1e-6)


def test_kernel_under_interpreter_equals_reference_and_full_attention():
    """Run in a child process: TRITON_INTERPRET must be set before triton is imported."""
    code = r"""
import torch
from megatron_longlive.inference.kernels.split_kv_combine_triton import combine_split_kv, combine_torch
import tests.unit.test_split_kv_combine as t
vs = torch.linspace(0.5, 2.0, 3)
for p in (1, 2, 3):
    parts, lse, full = t._parts(p, b=1, sq=20)
    for dtype, o_scale in ((torch.bfloat16, 1.0), (torch.float8_e4m3fn, 0.5)):
        codes = (parts * o_scale).to(dtype)
        got = combine_split_kv(codes, lse.float() if p > 1 else None, vs, o_scale)
        ref = combine_torch(codes, lse.float(), vs, o_scale)
        n = (got != ref).sum().item()
        assert torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2), f"p={p} {dtype}: {n} differ"
        if dtype == torch.bfloat16:
            err = ((got.double() - full * vs.double()[:, None]).norm() / full.norm()).item()
            assert err < 1e-2, (p, err)           # bf16 parts and output: ~3e-3
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_auto_splits_wave_arithmetic():
    assert auto_splits(1, 4680, 12, 18720, 132) == 2      # 1.3B: 37 x 12 = 444 tiles, 3.4 waves -> 6.7 of 7
    assert auto_splits(1, 7040, 24, 28160, 132) == 1      # 5B: 55 x 24 = 1320 tiles, 10 full waves
    assert auto_splits(2, 4680, 12, 18720, 132) == 1      # batch > 1: no single view of the key parts
    assert auto_splits(1, 4680, 12, 18719, 132) == 1      # a prime number of keys: no equal parts
