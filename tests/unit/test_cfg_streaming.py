"""Classifier-free guidance in the streaming engine (issue 15): one batched 2B forward per pass equals two
separate engines (conditional, unconditional) run side by side and combined, v = v_u + s (v_c - v_u),
across window eviction and a prompt switch with new shot and recache; both halves of the cache equal the
separate engines' caches; the per-call scale; cache memory doubles; bad input."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import InferConfig
from megatron_longlive.inference.engine import StreamingEngine

H = W = 8
TOL = dict(rtol=0, atol=1e-5)


def _infer(**kw):
    # chunks of 1 latent frame: global sink 1, shot sink 1, rolling window 2, current 1; 2 denoising steps
    base = dict(chunk_frames=1, sink_frames=1, shot_sink_frames=1, window_frames=5, denoising_steps=[1000, 500],
                guidance_scale=3.0)
    base.update(kw)
    return InferConfig(**base)


def _texts(cfg, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g) for _ in range(3)]


def _run_pair(model, infer, noises, texts, switch, scales):
    """The reference: two guidance-free engines stepped together, velocities combined by hand."""
    text_a, text_b, neg = texts
    cond = StreamingEngine(model, infer, (H, W), batch=neg.shape[0], guidance=False)
    uncond = StreamingEngine(model, infer, (H, W), batch=neg.shape[0], guidance=False)
    cond.set_prompt(text_a)
    uncond.set_prompt(neg)
    out = []
    for c, noise in enumerate(noises):
        if c == switch:
            cond.set_prompt(text_b, recache=True, new_shot=True)
            uncond.set_prompt(neg, recache=True, new_shot=True)
        s = infer.guidance_scale if scales.get(c) is None else scales[c]
        x = noise
        for sigma, sigma_next in zip(cond.sigmas[:-1], cond.sigmas[1:]):
            v_c, v_u = cond.predict(x, sigma), uncond.predict(x, sigma)
            x = x + (sigma_next - sigma) * (v_u + s * (v_c - v_u))
        cond.commit(x)
        uncond.commit(x)
        out.append(x)
    return out, cond, uncond


def test_cfg_streaming_equals_two_engines_combined(tiny_model):
    infer = _infer()
    batch, n, switch = 2, 8, 4
    scales = {2: 5.0, 6: 1.5}                      # per-call overrides of infer.guidance_scale = 3
    texts = _texts(tiny_model.cfg, batch)
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(batch, 16, 1, H, W, generator=g) for _ in range(n)]
    ref, cond, uncond = _run_pair(tiny_model, infer, noises, texts, switch, scales)

    engine = StreamingEngine(tiny_model, infer, (H, W), batch=batch)
    assert engine.guidance and engine.rows == 2 * batch
    calls = []
    handle = tiny_model.patch_embedding.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        engine.set_prompt(texts[0], negative=texts[2])
        got = []
        for c, noise in enumerate(noises):
            if c == switch:
                engine.set_prompt(texts[1], recache=True, new_shot=True)     # the negative prompt is kept
            got.append(engine.generate_chunk(noise, guidance_scale=scales.get(c)))
    finally:
        handle.remove()
    # one batched forward per pass: 2 denoising passes + 1 commit per chunk, plus one recache, all batch 2B
    assert calls == [2 * batch] * (3 * n + 1)
    for c in range(n):
        torch.testing.assert_close(got[c], ref[c], **TOL, msg=f"chunk {c}")
    # the cache's halves are the separate engines' caches (same slots, same chunks: evicted and recached alike)
    assert engine.cache.slot_chunk == cond.cache.slot_chunk == uncond.cache.slot_chunk
    assert engine.shot_starts == cond.shot_starts == [0, switch]
    for slot, chunk in enumerate(engine.cache.slot_chunk):
        if chunk is None:
            continue
        tok = engine.layout.tokens(slot)
        torch.testing.assert_close(engine.cache.k[:, :batch, tok], cond.cache.k[:, :, tok], **TOL)
        torch.testing.assert_close(engine.cache.k[:, batch:, tok], uncond.cache.k[:, :, tok], **TOL)
        torch.testing.assert_close(engine.cache.v[:, :batch, tok], cond.cache.v[:, :, tok], **TOL)
        torch.testing.assert_close(engine.cache.v[:, batch:, tok], uncond.cache.v[:, :, tok], **TOL)
    # the window rolled: chunk 1 (the first window chunk) was evicted long ago
    assert 1 not in engine.cache.slot_chunk and 0 in engine.cache.slot_chunk
    # guidance changes the result (the test is not vacuous): scale 1 everywhere gives other chunks
    plain = StreamingEngine(tiny_model, infer, (H, W), batch=batch, guidance=False)
    plain.set_prompt(texts[0])
    assert (plain.generate_chunk(noises[0]) - got[0]).abs().max() > 1e-3


def test_scale_one_equals_the_conditional_engine(tiny_model):
    """guidance_scale=1 per call on a guidance engine == the engine without the unconditional stream."""
    infer = _infer()
    texts = _texts(tiny_model.cfg, batch=1)
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(1, 16, 1, H, W, generator=g) for _ in range(4)]
    engine = StreamingEngine(tiny_model, infer, (H, W))
    engine.set_prompt(texts[0], negative=texts[2])
    plain = StreamingEngine(tiny_model, infer, (H, W), guidance=False)
    plain.set_prompt(texts[0])
    for noise in noises:
        torch.testing.assert_close(engine.generate_chunk(noise, guidance_scale=1.0), plain.generate_chunk(noise), **TOL)


def test_cache_memory_doubles_and_negative_broadcast(tiny_model):
    infer = _infer()
    with_cfg = StreamingEngine(tiny_model, infer, (H, W), batch=2)
    without = StreamingEngine(tiny_model, infer, (H, W), batch=2, guidance=False)
    assert with_cfg.cache.memory_bytes() == 2 * without.cache.memory_bytes()
    assert with_cfg.cache.k.shape[1] == 4 and without.cache.k.shape[1] == 2
    # InferConfig.guidance_scale == 1 means no guidance stream by default
    assert not StreamingEngine(tiny_model, _infer(guidance_scale=1.0), (H, W)).guidance
    # one negative prompt row serves every video of the batch
    text, _, neg = _texts(tiny_model.cfg, batch=2)
    with_cfg.set_prompt(text, negative=neg[:1])
    k_neg = with_cfg.context_kv[0][0][2:]
    torch.testing.assert_close(k_neg[0], k_neg[1], rtol=0, atol=0)


def test_cfg_bad_input(tiny_model):
    infer = _infer()
    text, _, neg = _texts(tiny_model.cfg, batch=1)
    engine = StreamingEngine(tiny_model, infer, (H, W))
    with pytest.raises(ValueError, match="needs a negative prompt"):
        engine.set_prompt(text)
    plain = StreamingEngine(tiny_model, infer, (H, W), guidance=False)
    with pytest.raises(ValueError, match="no guidance stream"):
        plain.set_prompt(text, negative=neg)
    with pytest.raises(ValueError, match="do not match the prompt's"):
        engine.set_prompt(text, negative=neg[:, :5])


def test_generate_cli_negative_prompt_reaches_the_guidance_stream(tmp_path, tiny_cfg):
    """`longlive generate --negative-prompt TEXT` with guidance == the engine driven by hand with TEXT's embedding."""
    from generate_helpers import GEN, tiny_dit

    from megatron_longlive.cli.main import main
    from megatron_longlive.config import load_config
    from megatron_longlive.inference.engine import stream_latents
    from megatron_longlive.inference.pipeline import load_dit, load_encoders
    from megatron_longlive.models.wan.convert import save_wan_weights

    weights = tmp_path / "w.safetensors"
    save_wan_weights(tiny_dit(tiny_cfg), weights)

    def cli(name, *extra):
        out = tmp_path / f"{name}.pt"
        assert main(["generate", "--checkpoint", str(weights), "--out", str(tmp_path / f"{name}.mp4"),
                     "--latents-out", str(out), *GEN, "--set", "infer.guidance_scale=4", *extra]) == 0
        return torch.load(out)["latents"]

    static, empty = cli("static", "--negative-prompt", "a static gray image"), cli("empty")
    assert (static - empty).abs().max() > 1e-3             # the negative prompt matters
    sets = [GEN[i + 1] for i, a in enumerate(GEN) if a == "--set"] + ["infer.guidance_scale=4"]
    cfg = load_config(None, sets)
    vae, text = load_encoders(cfg)
    engine = StreamingEngine(load_dit(cfg, str(weights)), cfg.infer, (cfg.infer.height // vae.spatial_stride,
                                                                     cfg.infer.width // vae.spatial_stride))
    engine.set_negative_prompt(text.encode(["a static gray image"]))
    prompt = text.encode(["a red square slides right"])
    chunks = list(stream_latents(engine, cfg.infer.num_chunks, lambda c: prompt if c == 0 else None,
                                 seed=cfg.infer.seed, progress=False))
    torch.testing.assert_close(torch.cat(chunks, dim=2), static, rtol=0, atol=1e-5)
