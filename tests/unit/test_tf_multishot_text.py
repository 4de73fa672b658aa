"""Per-chunk text in the teacher-forcing forward (multi-shot training, issue 8).

(a) float64: the TF forward with per-chunk captions equals a reference where every chunk's tokens (clean and
    noisy twin) run cross-attention separately against their own caption's plain (k, v), <= 1e-10;
    videos of one batch may switch captions at different chunks;
(b) one caption for all chunks through the per-chunk path equals the plain one-text forward;
(c) float32: equals the streaming engine switching prompts at the same chunk boundaries (set_prompt with
    new_shot True and False, a caption coming back), under a sink/shot-sink/window rule, <= 1e-5.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_longlive.config import InferConfig
from megatron_longlive.inference.engine import StreamingEngine
from megatron_longlive.inference.sinks import SinkRule
from megatron_longlive.models.wan.text_context import FrameText, frame_text_context
from megatron_longlive.training.teacher_forcing import (build_tf_inputs, noisy_prediction, tf_forward,
                                                        tf_text_context)

pytestmark = pytest.mark.usefixtures("one_thread")

H = W = 8
TPF = (H // 2) * (W // 2)


def _data(cfg, n, cf, num_texts, batch=2, seed=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, n * cf, H, W, generator=g, dtype=dtype)
    noise = torch.randn(x.shape, generator=g, dtype=dtype)
    texts = torch.randn(batch, num_texts, cfg.text_len, cfg.text_dim, generator=g, dtype=dtype)
    sigma = 0.05 + 0.9 * torch.rand(batch, n, generator=g, dtype=dtype)
    return x, noise, texts, sigma


def _per_chunk_cross_attention_reference(model, inputs, texts, chunk_text):
    """TF forward where each block's cross-attention runs chunk by chunk (clean x_i and noisy z_i separately),
    each against the plain (k, v) of its own caption - no FrameText involved."""
    n, cf = inputs.num_chunks, inputs.chunk_frames // model.cfg.patch_size[0]
    per_chunk = cf * TPF
    per_text = [model.embed_context(texts[:, j]) for j in range(texts.shape[1])]   # [text][layer] (k, v)
    originals = [blk.cross_attn.forward for blk in model.blocks]

    def chunked(layer, x, _ctx):
        outs = []
        for half in range(2):
            for i in range(n):
                lo = (half * n + i) * per_chunk
                j = int(chunk_text[0, i])
                outs.append(originals[layer](x[:, lo:lo + per_chunk], per_text[j][layer]))
        return torch.cat(outs, dim=1)

    try:
        for layer, blk in enumerate(model.blocks):
            blk.cross_attn.forward = lambda x, ctx, _l=layer: chunked(_l, x, ctx)
        dummy = model.embed_context(texts[:, 0])
        return noisy_prediction(model, tf_forward(model, inputs, dummy), inputs)
    finally:
        for blk, fwd in zip(model.blocks, originals):
            blk.cross_attn.forward = fwd


@pytest.mark.parametrize("cf", [1, 2])
def test_per_chunk_text_equals_per_chunk_cross_attention_runs(tiny_model, cf):
    model = tiny_model.double()
    n = 5
    x, noise, texts, sigma = _data(model.cfg, n, cf, num_texts=3)
    chunk_text = torch.tensor([[0, 0, 1, 2, 2], [0, 1, 1, 1, 0]])     # different switches per video
    with torch.no_grad():
        inputs = build_tf_inputs(model, x, noise, sigma, cf)
        got = noisy_prediction(model, tf_forward(model, inputs, tf_text_context(model, texts, chunk_text, cf)), inputs)
        for b in range(2):
            one = build_tf_inputs(model, x[b:b + 1], noise[b:b + 1], sigma[b:b + 1], cf)
            ref = _per_chunk_cross_attention_reference(model, one, texts[b:b + 1], chunk_text[b:b + 1])
            assert (got[b:b + 1] - ref).abs().max().item() <= 1e-10, b
        # the captions matter: one caption for all chunks gives a different prediction
        plain = noisy_prediction(model, tf_forward(model, inputs, model.embed_context(texts[:, 0])), inputs)
        assert (got - plain)[:, :, 2 * cf:].abs().max() > 1e-4
        # ... and equals it on chunks that use caption 0 and only see caption-0 chunks (video 0, chunks 0-1)
        assert (got - plain)[0, :, :2 * cf].abs().max() <= 1e-10


def test_one_caption_through_per_chunk_path_equals_plain_forward(tiny_model):
    model = tiny_model.double()
    n, cf = 4, 1
    x, noise, texts, sigma = _data(model.cfg, n, cf, num_texts=1)
    with torch.no_grad():
        inputs = build_tf_inputs(model, x, noise, sigma, cf)
        plain = tf_forward(model, inputs, tf_text_context(model, texts[:, 0], None, cf))
        per_chunk = tf_forward(model, inputs, tf_text_context(model, texts, torch.zeros(2, n, dtype=torch.long), cf))
    assert (plain - per_chunk).abs().max().item() <= 1e-10
    # the one-caption path is exactly model.embed_context (unchanged from before per-chunk text existed)
    ctx = tf_text_context(model, texts[:, 0], None, cf)
    assert all(isinstance(c, tuple) for c in ctx)


def test_frame_text_bad_indices_are_clear_errors(tiny_model):
    texts = torch.randn(1, 2, tiny_model.cfg.text_len, tiny_model.cfg.text_dim)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        frame_text_context(tiny_model, texts, torch.tensor([[0, 2]]))
    ctx = frame_text_context(tiny_model, texts, torch.tensor([[0, 1]]))
    assert isinstance(ctx[0], FrameText) and ctx[0].k.shape[:2] == (1, 2)


@pytest.mark.parametrize("cf,rule", [(1, SinkRule(1, 1, 2)), (2, SinkRule(1, 1, 1))])
def test_per_chunk_text_equals_engine_prompt_switches(tiny_model, cf, rule):
    """Prompts: A A | B (new shot) B | C (same shot) | A (new shot) ... at chunk boundaries, no recache."""
    n = 8
    x, noise, texts, sigma = _data(tiny_model.cfg, n, cf, num_texts=3, dtype=torch.float32)
    sigma = sigma[:1].expand(2, -1).contiguous()          # the engine takes one sigma per chunk
    chunk_text = torch.tensor([0, 0, 1, 1, 2, 0, 0, 1])
    new_shot = {2, 5, 7}                                  # chunk 4 switches the prompt inside shot 2
    shot_starts = (0, 2, 5, 7)
    infer = InferConfig(chunk_frames=cf, sink_frames=rule.num_sink_chunks * cf,
                        shot_sink_frames=rule.num_shot_sink_chunks * cf,
                        window_frames=(rule.num_sink_chunks + rule.num_shot_sink_chunks + rule.num_window_chunks + 1) * cf)
    engine = StreamingEngine(tiny_model, infer, (H, W), batch=2)
    assert engine.rule == rule
    preds = []
    for i in range(n):
        if i == 0 or chunk_text[i] != chunk_text[i - 1]:
            engine.set_prompt(texts[:, int(chunk_text[i])], recache=False, new_shot=i in new_shot)
        s = sigma[0, i].item()
        xi, ei = x[:, :, i * cf:(i + 1) * cf], noise[:, :, i * cf:(i + 1) * cf]
        preds.append(engine.predict((1 - s) * xi + s * ei, s))
        engine.commit(xi)
    assert engine.shot_starts == list(shot_starts)
    got = torch.cat(preds, dim=2)
    with torch.no_grad():
        inputs = build_tf_inputs(tiny_model, x, noise, sigma, cf, rule=rule, shot_starts=shot_starts)
        ctx = tf_text_context(tiny_model, texts, chunk_text[None].expand(2, -1), cf)
        ref = noisy_prediction(tiny_model, tf_forward(tiny_model, inputs, ctx), inputs)
        one = noisy_prediction(tiny_model, tf_forward(tiny_model, inputs, tiny_model.embed_context(texts[:, 0])), inputs)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert (got - one).abs().max() > 1e-3                 # the switches matter


@pytest.mark.slow
def test_synthetic_multishot_data_reaches_the_trainer(tmp_path):
    """data.source=synthetic with 2 shots: per-shot captions and the shot of every latent frame are encoded,
    batched by the loader, and used by the trainer (per_shot_text on) - off gives the first-caption run."""
    from dataloaders.latent_dataset import LatentLoader
    from dataloaders.synthetic import build_dataset, read_manifest
    from megatron_longlive.config import load_config
    from megatron_longlive.models.wan.text_encoder import TextEncoder
    from megatron_longlive.training.trainer import Trainer

    sets = [f"data.path={tmp_path / 'data'}", "data.num_videos=2", "data.height=32", "data.width=32",
            "data.num_frames=9", "data.num_shots=2", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
            "train.micro_batch=2", "train.wandb_mode=disabled", "train.save_interval=1000"]
    cfg = load_config(None, sets)
    ds = build_dataset(cfg, progress=False)
    entries = read_manifest(tmp_path / "data" / "manifest.jsonl")
    assert ds.texts.shape == (2, 2, 16, 32) and ds.frame_shot.shape == (2, 3)
    # shots start on pixel frames 1 + 4k, i.e. latent frame k + 1: shot 2 of 9 frames starts at pixel 5 -> latent 2
    assert [e["shots"][1]["start_frame"] for e in entries] == [5, 5]
    assert ds.frame_shot.tolist() == [[0, 0, 1], [0, 0, 1]]
    enc = TextEncoder.tiny(32, 16, seed=0).encode([entries[1]["shots"][1]["caption"]])
    torch.testing.assert_close(ds.texts[1, 1], enc[0], rtol=0, atol=1e-6)
    assert torch.equal(ds.texts[:, 0], ds.text)
    batch = next(LatentLoader(ds, 2, 3, shuffle=False))
    assert batch["texts"].shape == (2, 2, 16, 32) and batch["frame_shot"].tolist() == [[0, 0, 1]] * 2
    on = Trainer(cfg, progress=False).train()
    off = Trainer(load_config(None, sets + [f"train.output_dir={tmp_path / 'off'}", "train.per_shot_text=false"]),
                  progress=False).train()
    # Wan's zero-initialised head makes step 1 caption-independent; step 2 sees the captions
    assert on[0] == off[0] and on[1] != off[1] and all(math.isfinite(v) for v in on)


def test_zarr_chunk_shot_items_become_frame_shots():
    """The Zarr cache's 'chunk_shot' (data chunks) maps to latent frames; a partial (SP) item is refused."""
    from dataloaders.latent_dataset import item_frame_shot, stack_shot_texts

    item = {"latents": torch.zeros(16, 6, 4, 4), "chunk_shot": torch.tensor([0, 1, 1]), "texts": torch.ones(2, 3, 5),
            "chunk_range": (0, 3), "num_chunks": 3}
    assert item_frame_shot(item).tolist() == [0, 0, 1, 1, 1, 1]
    one = {"latents": torch.zeros(16, 6, 4, 4), "frame_shot": torch.zeros(6, dtype=torch.long),
           "texts": 2 * torch.ones(1, 3, 5)}
    texts, frame_shot = stack_shot_texts([item, one], 4)
    assert texts.shape == (2, 2, 3, 5) and texts[1, 1].abs().sum() == 0 and frame_shot.tolist() == [[0, 0, 1, 1]] * 1 + [[0] * 4]
    with pytest.raises(ValueError, match="sp_size=1"):
        item_frame_shot({**item, "latents": torch.zeros(16, 2, 4, 4), "chunk_range": (1, 2)})
