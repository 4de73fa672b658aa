"""Streaming engine vs full-sequence references built from the model's pieces (no cache code involved).

(a) with a window holding all history, streaming with the KV cache equals the teacher-forcing forward
    over the same clean history (velocities, and whole sampled chunks), float32 <= 1e-5;
(b) with sinks and a rolling window, it equals one forward over [clean | noisy] whose mask is written
    here from the sink/window rule (each chunk attends its sink chunks, its last window chunks, itself);
(c) a prompt switch with recache equals recomputing the stored chunks under the new prompt from scratch.
"""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import InferConfig
from megatron_longlive.inference.engine import StreamingEngine, sampling_sigmas, stream_latents
from megatron_longlive.models.wan.attention import ChunkMask
from megatron_longlive.models.wan.rope import grid_positions
from megatron_longlive.training.teacher_forcing import (build_tf_inputs, noisy_prediction, teacher_forcing_mask,
                                                        tf_forward)

H = W = 8           # latent size -> 4x4 = 16 tokens per frame
TPF = (H // 2) * (W // 2)
TOL = dict(rtol=0, atol=1e-5)


def _data(cfg, num_chunks, chunk_frames, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = num_chunks * chunk_frames
    latents = torch.randn(batch, cfg.in_channels, f, H, W, generator=g)
    noise = torch.randn(batch, cfg.in_channels, f, H, W, generator=g)
    sigma = (0.05 + 0.9 * torch.rand(num_chunks, generator=g))[None].expand(batch, -1).contiguous()
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return latents, noise, sigma, text


def _chunk(x, i, cf):
    return x[:, :, i * cf:(i + 1) * cf]


def _stream_predictions(model, infer, latents, noise, sigma, text):
    """Engine velocity of every noisy chunk z_i given the clean history x_0..x_{i-1} (committed via the cache)."""
    cf = infer.chunk_frames
    engine = StreamingEngine(model, infer, (H, W), batch=latents.shape[0])
    engine.set_prompt(text)
    preds = []
    for i in range(sigma.shape[1]):
        s = sigma[0, i].item()
        z = (1 - s) * _chunk(latents, i, cf) + s * _chunk(noise, i, cf)
        preds.append(engine.predict(z, s))
        engine.commit(_chunk(latents, i, cf))
    return torch.cat(preds, dim=2), engine


@pytest.mark.parametrize("chunk_frames", [1, 2])
def test_streaming_equals_teacher_forcing_forward(tiny_model, chunk_frames):
    n, cf = 4, chunk_frames
    latents, noise, sigma, text = _data(tiny_model.cfg, n, cf)
    with torch.no_grad():
        inputs = build_tf_inputs(tiny_model, latents, noise, sigma, cf)
        ref = noisy_prediction(tiny_model, tf_forward(tiny_model, inputs, tiny_model.embed_context(text)), inputs)
    # window holding every chunk: sink 1 chunk + rolling n-2 + current
    infer = InferConfig(chunk_frames=cf, sink_frames=cf, window_frames=n * cf)
    got, _ = _stream_predictions(tiny_model, infer, latents, noise, sigma, text)
    torch.testing.assert_close(got, ref, **TOL)


def test_sampled_chunks_equal_teacher_forcing_sampler(tiny_model):
    """Whole generated chunks: re-sample each chunk with the full TF forward over the engine's clean history."""
    cfg, n, cf, b = tiny_model.cfg, 4, 1, 2
    infer = InferConfig(chunk_frames=cf, sink_frames=cf, window_frames=n * cf, denoising_steps=[1000, 700, 300])
    _, _, _, text = _data(cfg, n, cf, batch=b)
    engine = StreamingEngine(tiny_model, infer, (H, W), batch=b)
    got = list(stream_latents(engine, n, lambda c: text if c == 0 else None, seed=5, progress=False))

    sig = [5 * s / (1 + 4 * s) for s in (1.0, 0.7, 0.3)] + [0.0]     # Wan's shift 5, written out
    gen = torch.Generator().manual_seed(5)
    ctx = tiny_model.embed_context(text)
    for i in range(n):
        x = torch.randn(b, cfg.in_channels, cf, H, W, generator=gen)
        history = torch.cat(got[:i] + [torch.zeros_like(x)], dim=2)          # clean x_0..x_{i-1}, placeholder
        for s, s_next in zip(sig[:-1], sig[1:]):
            noisy = torch.cat([torch.zeros_like(history[:, :, :-cf]), x], dim=2)
            clean_tok, grid = tiny_model.patchify(history)
            noisy_tok, _ = tiny_model.patchify(noisy)
            t = torch.cat([torch.zeros(b, (i + 1) * cf), torch.full((b, (i + 1) * cf), s * 1000.0)], dim=1)
            pos = grid_positions(*grid)
            with torch.no_grad():
                out = tiny_model.forward_tokens(torch.cat([clean_tok, noisy_tok], 1), t, ctx, torch.cat([pos, pos]),
                                                teacher_forcing_mask(i + 1, cf, TPF))
            v = tiny_model.unpatchify(out[:, clean_tok.shape[1]:], grid)[:, :, -cf:]
            x = x + (s_next - s) * v
        torch.testing.assert_close(got[i], x, **TOL)


def _context_rule(i, sink, window):
    """Chunks that chunk i attends (besides itself): the first `sink` chunks, then the `window` most recent."""
    return sorted({j for j in range(i) if j < sink} | {j for j in range(max(sink, i - window), i)})


def _sink_window_reference(model, latents, noise, sigma, text, cf, sink, window):
    """One forward over [clean | noisy] with the sink/window rule as the mask (clean x_i's K/V then carry
    exactly the context x_i was cached with)."""
    n = sigma.shape[1]
    table = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for i in range(n):
        for j in _context_rule(i, sink, window):
            table[i, j] = table[n + i, j] = True
        table[i, i] = table[n + i, n + i] = True
    with torch.no_grad():
        inputs = build_tf_inputs(model, latents, noise, sigma, cf)
        ids = torch.arange(2 * n).repeat_interleave(cf * TPF)
        inputs.mask = ChunkMask(ids, ids, table)
        return noisy_prediction(model, tf_forward(model, inputs, model.embed_context(text)), inputs)


@pytest.mark.parametrize("cf,sink,window", [(1, 1, 2), (1, 2, 3), (2, 1, 1), (1, 0, 2), (1, 1, 0)])
def test_sink_and_window_eviction_equal_reference(tiny_model, cf, sink, window):
    n = 7
    latents, noise, sigma, text = _data(tiny_model.cfg, n, cf, seed=1)
    infer = InferConfig(chunk_frames=cf, sink_frames=sink * cf, window_frames=(sink + window + 1) * cf)
    got, engine = _stream_predictions(tiny_model, infer, latents, noise, sigma, text)
    ref = _sink_window_reference(tiny_model, latents, noise, sigma, text, cf, sink, window)
    torch.testing.assert_close(got, ref, **TOL)
    # the cache really is bounded: it holds the sink chunks and the last `window` chunks
    assert [c for c, _ in engine.cache.stored_chunks()] == _context_rule(n, sink, window)
    # ... and eviction matters: the full-history TF forward gives different late chunks
    with torch.no_grad():
        inputs = build_tf_inputs(tiny_model, latents, noise, sigma, cf)
        full = noisy_prediction(tiny_model, tf_forward(tiny_model, inputs, tiny_model.embed_context(text)), inputs)
    late = slice((sink + window + 1) * cf, None)
    assert (got[:, :, late] - full[:, :, late]).abs().max() > 1e-3


def test_recache_after_prompt_switch_equals_recompute(tiny_model):
    """Switch prompt with recache: stored chunks' K/V are recomputed under the new prompt (block-causal among
    the stored chunks, original positions); the next chunk then equals a from-scratch forward."""
    cfg, cf, sink, window, n = tiny_model.cfg, 1, 1, 2, 5
    latents, noise, sigma, text_a = _data(cfg, n + 1, cf, seed=2)
    text_b = torch.randn_like(text_a)
    infer = InferConfig(chunk_frames=cf, sink_frames=sink, window_frames=sink + window + 1)
    engine = StreamingEngine(tiny_model, infer, (H, W), batch=2)
    engine.set_prompt(text_a)
    for i in range(n):
        engine.commit(_chunk(latents, i, cf))
    engine.set_prompt(text_b, recache=True)
    s = sigma[0, n].item()
    z = (1 - s) * _chunk(latents, n, cf) + s * _chunk(noise, n, cf)
    got = engine.predict(z, s)

    stored = _context_rule(n, sink, window)                       # [0, 3, 4]
    k = len(stored)
    clean = torch.cat([_chunk(latents, j, cf) for j in stored] + [z], dim=2)
    tokens, _ = tiny_model.patchify(clean)
    pos = torch.cat([grid_positions(cf, H // 2, W // 2, frame_offset=j * cf) for j in stored + [n]])
    table = torch.tril(torch.ones(k + 1, k + 1, dtype=torch.bool))  # causal over stored chunks, then the noisy one
    ids = torch.arange(k + 1).repeat_interleave(cf * TPF)
    t = torch.cat([torch.zeros(2, k * cf), torch.full((2, cf), s * 1000.0)], dim=1)
    with torch.no_grad():
        out = tiny_model.forward_tokens(tokens, t, tiny_model.embed_context(text_b), pos, ChunkMask(ids, ids, table))
    ref = tiny_model.unpatchify(out[:, k * cf * TPF:], (cf, H // 2, W // 2))
    torch.testing.assert_close(got, ref, **TOL)
    # without recache the old prompt's K/V stay, and the result differs
    engine2 = StreamingEngine(tiny_model, infer, (H, W), batch=2)
    engine2.set_prompt(text_a)
    for i in range(n):
        engine2.commit(_chunk(latents, i, cf))
    engine2.set_prompt(text_b, recache=False)
    assert (engine2.predict(z, s) - ref).abs().max() > 1e-4


def test_sampling_sigmas_and_bad_settings(tiny_model):
    assert sampling_sigmas([1000, 750, 500, 250], 5.0) == pytest.approx([1.0, 0.9375, 2.5 / 3, 0.625, 0.0])
    assert sampling_sigmas([1000, 500], 1.0) == pytest.approx([1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        sampling_sigmas([500, 1000], 5.0)
    with pytest.raises(ValueError, match="guidance_scale=3.0 on an engine without a negative-prompt stream"):
        StreamingEngine(tiny_model, InferConfig(), (H, W)).predict(torch.zeros(1, 16, 1, H, W), 1.0, guidance_scale=3.0)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        StreamingEngine(tiny_model, InferConfig(), (7, 8))
