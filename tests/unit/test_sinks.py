"""The shared sink/window/shot rule (inference/sinks.py): hand-written cases, training mask == engine pattern,
and the engine over several shot switches == one teacher-forcing forward with the rule's mask (float32)."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import InferConfig
from megatron_longlive.inference.engine import StreamingEngine
from megatron_longlive.inference.sinks import (SinkRule, chunk_role, normalize_shot_starts, shot_starts_from_chunk_shot,
                                              visible_chunks)
from megatron_longlive.training.teacher_forcing import build_tf_inputs, noisy_prediction, tf_block_table, tf_forward

H = W = 8
TOL = dict(rtol=0, atol=1e-5)


def test_rule_by_hand_two_shot_switches():
    """global sink 1, shot sink 1, window 2, shots start at chunks 0, 3, 6 (written out by hand)."""
    rule, starts = SinkRule(1, 1, 2), (0, 3, 6)
    roles = [chunk_role(j, normalize_shot_starts(starts), rule) for j in range(9)]
    assert roles == ["global", "shot", "window", "shot", "window", "window", "shot", "window", "window"]
    expected = [[], [0], [0, 1], [0, 2], [0, 2, 3], [0, 2, 3, 4], [0, 4, 5], [0, 4, 5, 6], [0, 5, 6, 7],
                [0, 6, 7, 8]]
    assert [visible_chunks(i, starts, rule) for i in range(10)] == expected
    # two-chunk shot sink, a shot shorter than its sink, global sink 2
    rule2 = SinkRule(2, 2, 1)
    assert [chunk_role(j, [0, 5, 6], rule2) for j in range(9)] == \
        ["global", "global", "shot", "shot", "window", "shot", "shot", "shot", "window"]
    assert visible_chunks(8, (0, 5, 6), rule2) == [0, 1, 4, 6, 7]   # 4 stays in the window
    assert visible_chunks(5, (0, 5, 6), rule2) == [0, 1, 4]
    # no window limit, no shot sink: full causal history
    assert visible_chunks(5, (0, 2), SinkRule(1, 0, None)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="shot starts"):
        visible_chunks(3, (-1,), rule)


def test_shot_starts_from_chunk_shot():
    assert shot_starts_from_chunk_shot(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])) == (0, 3, 5)
    assert shot_starts_from_chunk_shot([4, 4]) == (0,)
    with pytest.raises(ValueError, match="non-decreasing"):
        shot_starts_from_chunk_shot([0, 1, 0])


def test_tf_table_full_causal_default_unchanged():
    n = 5
    t = tf_block_table(n)
    idx = torch.arange(n)
    assert torch.equal(t[:n, :n], idx[None] <= idx[:, None])
    assert torch.equal(t[n:, :n], idx[None] < idx[:, None])
    assert torch.equal(t[n:, n:], torch.eye(n, dtype=torch.bool)) and not t[:n, n:].any()
    # an unbounded rule without shot sink is the same table
    assert torch.equal(tf_block_table(n, rule=SinkRule(1, 0, None), shot_starts=(0, 3)), t)


def _data(cfg, n, cf, seed=3, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, n * cf, H, W, generator=g)
    noise = torch.randn(batch, cfg.in_channels, n * cf, H, W, generator=g)
    sigma = (0.05 + 0.9 * torch.rand(n, generator=g))[None].expand(batch, -1).contiguous()
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return latents, noise, sigma, text


@pytest.mark.parametrize("cf,sink,shot,window,starts", [(1, 1, 1, 2, (0, 3, 6)), (1, 1, 2, 1, (0, 4, 5, 8)),
                                                         (2, 1, 1, 1, (0, 2, 5))])
def test_engine_over_shot_switches_equals_tf_with_rule_mask(tiny_model, cf, sink, shot, window, starts):
    n = 9
    latents, noise, sigma, text = _data(tiny_model.cfg, n, cf)
    infer = InferConfig(chunk_frames=cf, sink_frames=sink * cf, shot_sink_frames=shot * cf,
                        window_frames=(sink + shot + window + 1) * cf)
    engine = StreamingEngine(tiny_model, infer, (H, W), batch=2)
    rule = SinkRule(sink, shot, window)
    assert engine.rule == rule
    table = tf_block_table(n, rule=rule, shot_starts=starts)
    preds = []
    for i in range(n):
        engine.set_prompt(text, new_shot=i in starts)
        # the training mask row of chunk i == what the engine's cache holds when it computes chunk i
        held = torch.zeros(n, dtype=torch.bool)
        held[[c for c, _ in engine.cache.stored_chunks()]] = True
        assert torch.equal(table[n + i, :n], held) and torch.equal(table[i, :n], held | (torch.arange(n) == i))
        s = sigma[0, i].item()
        x = latents[:, :, i * cf:(i + 1) * cf]
        preds.append(engine.predict((1 - s) * x + s * noise[:, :, i * cf:(i + 1) * cf], s))
        engine.commit(x)
    got = torch.cat(preds, dim=2)
    assert [c for c, _ in engine.cache.stored_chunks()] == visible_chunks(n, starts, rule)
    with torch.no_grad():
        ctx = tiny_model.embed_context(text)
        inputs = build_tf_inputs(tiny_model, latents, noise, sigma, cf, rule=rule, shot_starts=starts)
        ref = noisy_prediction(tiny_model, tf_forward(tiny_model, inputs, ctx), inputs)
        # shot switches matter: the same rule with one shot gives different chunks
        one = build_tf_inputs(tiny_model, latents, noise, sigma, cf, rule=rule)
        one_shot = noisy_prediction(tiny_model, tf_forward(tiny_model, one, ctx), one)
    torch.testing.assert_close(got, ref, **TOL)
    assert (got - one_shot).abs().max() > 1e-3
