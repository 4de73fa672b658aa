"""train.long_tuning: the trainer's teacher-forcing mask is the engine's sink/window rule (infer.* sizes) with the
batch's shot starts, so long multi-shot tuning sees the context inference sees; bad settings are refused."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import load_config
from megatron_longlive.inference.sinks import SinkRule
from megatron_longlive.training.teacher_forcing import teacher_forcing_loss
from megatron_longlive.training.trainer import TeacherForcingStep, long_tuning_rule

LONG = ["train.long_tuning=true", "train.chunk_frames=1", "infer.chunk_frames=1", "infer.window_frames=4",
        "infer.sink_frames=1", "infer.shot_sink_frames=1"]


def _batch(cfg, frame_shot):
    g = torch.Generator().manual_seed(0)
    b, f = len(frame_shot), len(frame_shot[0])
    latents = torch.randn(b, cfg.model.in_channels, f, 8, 8, generator=g)
    texts = torch.randn(b, 2, cfg.model.text_len, cfg.model.text_dim, generator=g)
    return {"latents": latents, "text": texts[:, 0], "texts": texts, "frame_shot": torch.tensor(frame_shot)}


def test_rule_from_infer_sizes_and_errors():
    assert long_tuning_rule(load_config(None, LONG)) == SinkRule(1, 1, 1)
    assert long_tuning_rule(load_config()) is None
    with pytest.raises(ValueError, match="infer.chunk_frames"):
        long_tuning_rule(load_config(None, LONG + ["train.chunk_frames=2"]))


def test_step_uses_the_engine_mask_with_the_batch_shot_starts(tiny_model):
    cfg = load_config(None, LONG)
    rule = long_tuning_rule(cfg)
    batch = _batch(cfg, [[0, 0, 0, 1, 1, 1, 1]])              # 7 chunks, a second shot from chunk 3
    step = TeacherForcingStep(1, rule=rule)
    assert step.shot_starts(batch) == (0, 3)
    loss, _ = step(tiny_model, batch, torch.Generator().manual_seed(1))
    chunk_text = batch["frame_shot"]
    want, inputs = teacher_forcing_loss(tiny_model, batch["latents"], batch["texts"], 1, torch.Generator().manual_seed(1),
                                        chunk_text=chunk_text, rule=rule, shot_starts=(0, 3))
    assert torch.equal(loss, want)
    full, _ = teacher_forcing_loss(tiny_model, batch["latents"], batch["texts"], 1, torch.Generator().manual_seed(1),
                                   chunk_text=chunk_text)
    assert not torch.allclose(loss, full)                  # 7 chunks exceed the 4-frame window: the mask matters
    # noisy chunk 6 sees: global sink 0, shot sink 3, rolling window 5, itself (the engine's visible chunks + self)
    allowed = inputs.mask.allowed
    n = 7
    assert allowed[n + 6, :n].nonzero().flatten().tolist() == [0, 3, 5]


def test_different_shot_starts_in_one_batch_are_refused():
    cfg = load_config(None, LONG)
    step = TeacherForcingStep(1, rule=long_tuning_rule(cfg))
    with pytest.raises(ValueError, match="micro_batch=1"):
        step.shot_starts(_batch(cfg, [[0, 0, 1, 1], [0, 1, 1, 1]]))
