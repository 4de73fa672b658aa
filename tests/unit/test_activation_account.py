"""bench/activation_account.py: the saved-tensor account of the tiny model equals closed-form byte counts for the
parts whose layout is known (bf16 block inputs, norms keeping only their bf16 inputs, FlashAttention's
q/k/v/out/lse), and the linear model bytes = a + b * S, fitted on two lengths, predicts a third length exactly."""
from __future__ import annotations

import argparse

import pytest

from bench import activation_account as acc
from megatron_longlive.config import preset_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(**kw):
    base = dict(preset="tiny", chunk_frames=1, height=64, width=64, lora_rank=0)
    return argparse.Namespace(**{**base, **kw})


# q/k element size: the packed base is bf16 throughout; the full fine-tune's fp32 RMSNorm weights promote q and k
@pytest.mark.parametrize("variant,qk_bytes", [("nvfp4_lora", 2), ("bf16", 4)])
def test_account_matches_closed_forms_and_is_linear_in_tokens(variant, qk_bytes):
    a, m = _args(), preset_config("tiny")
    runs = [acc.measure(a, variant, frames, 16, 16) for frames in (1, 2, 3)]
    s = [r[0] for r in runs]
    assert s == [2 * f * 64 for f in (1, 2, 3)]                 # clean + noisy, 8 x 8 patches per frame
    for tokens, step, block in runs:
        assert step["block input x (per block)"] == tokens * m.dim * 2            # [1, S, D] bf16
        # the norms keep only their bf16 inputs (models/save_inputs.py), not float32 copies; norm1 and norm2 run
        # inside norm_modulate, whose saved x is counted under "block ops"
        assert block["norm3"] == block["self_attn.norm_q"] == block["self_attn.norm_k"] == tokens * m.dim * 2
        assert "norm1" not in block and "norm2" not in block
        core = 2 * m.dim * qk_bytes + 2 * m.dim * 2 + m.num_heads * 4            # q, k; v, out bf16; lse fp32
        assert block["self_attn.core"] == tokens * core
    for part in ("step", "block"):
        i = 1 if part == "step" else 2
        fitted = acc.fit((s[0], runs[0][i]), (s[1], runs[1][i]), s[2])
        assert {k: round(v[2]) for k, v in fitted.items()} == {k: v for k, v in runs[2][i].items()}


def test_main_prints_the_account(capsys, tmp_path):
    out = tmp_path / "r.jsonl"
    assert acc.main(["--preset", "tiny", "--latent-frames", "4", "--height", "64", "--width", "64",
                     "--chunk-frames", "1", "--variants", "nvfp4_lora", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "block input x (per block)" in text and "with offload_activations" in text
    assert len(out.read_text().splitlines()) == 2
