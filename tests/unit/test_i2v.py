"""Image-to-video and video continuation (issue 15): seeded clean latents start the stream.

(a) a partial seeded chunk runs its seeded frame at timestep 0 and keeps it clean == the model's forward with
    per-frame timesteps [0, t] written out here;
(b) the image latent stays in the global sink for the whole stream: slot contents (latents exactly, K/V ==
    chunk 0 recomputed alone under the prompt of the time) across window eviction and a prompt switch with
    new shot and recache, with and without classifier-free guidance;
(c) end to end through the VAE: the first generated frame is the image's VAE round trip (exactly), so it
    reproduces the image as well as the VAE does (PSNR measured with a tiny VAE fitted to the image, slow
    lane, vs text-only generation);
    `longlive generate --image` / `--continue-from`; bad input (missing, unreadable, wrong size).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_longlive.config import InferConfig, load_config
from megatron_longlive.inference.conditioning import encode_seed, load_clip, load_image, load_seed, resize_center_crop
from megatron_longlive.inference.engine import StreamingEngine
from megatron_longlive.inference.pipeline import generate_video
from megatron_longlive.inference.prompts import parse_cli_prompts
from megatron_longlive.inference.video_writer import read_mp4, write_mp4
from megatron_longlive.models.wan.rope import grid_positions
from megatron_longlive.models.wan.text_encoder import TextEncoder
from megatron_longlive.models.wan.vae import WanVAE

H = W = 8
TOL = dict(rtol=0, atol=1e-5)
pytestmark = pytest.mark.usefixtures("one_thread")
FIT_STEPS = 200
# The tiny Wan2.1 VAE fitted FIT_STEPS steps to the 32x32 test image and 3 variants; the first generated frame of
# image-to-video is its round trip. Measured 2026-11-25 with 120 steps: 20.75 dB vs the image (text-only first
# frame 12.49 dB); on 2026-12-06 (torch 2.13 CPU) the same 120 steps gave only 17.70 dB (7.79), so 200 steps:
# 25.49 dB (text-only 9.54 dB). Thresholds keep margins.
MIN_I2V_PSNR = 18.0
MAX_T2V_PSNR = 15.5


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB for pixels in [-1, 1] (peak-to-peak 2)."""
    return float(10 * torch.log10(4.0 / (a.float() - b.float()).pow(2).mean()))


class _CaptureKV:
    """A kv_cache stand-in for `forward_tokens` that records every layer's K/V (no cache involved)."""

    def __init__(self):
        self.k, self.v = {}, {}

    def hook(self, layer):
        def record(k, v, mask):
            self.k[layer], self.v[layer] = k, v
            return k, v, mask
        return record


def _chunk0_kv(model, latents0, text):
    """K/V [L, B, T, H, D] of chunk 0 computed alone at t = 0 under `text` (what the global sink must hold)."""
    tokens, grid = model.patchify(latents0)
    cap = _CaptureKV()
    with torch.no_grad():
        model.forward_tokens(tokens, torch.zeros(latents0.shape[0], grid[0]), model.embed_context(text),
                             grid_positions(*grid), kv_cache=cap)
    return (torch.stack([cap.k[i] for i in range(len(cap.k))]), torch.stack([cap.v[i] for i in range(len(cap.v))]))


def test_partial_seeded_chunk_frame_at_timestep_zero(tiny_model):
    """chunk_frames=2, a 1-frame seed: the pass sees [seed, x_1] at per-frame timesteps [0, t(sigma)]."""
    cfg = tiny_model.cfg
    g = torch.Generator().manual_seed(0)
    seed, x = torch.randn(1, 16, 1, H, W, generator=g), torch.randn(1, 16, 2, H, W, generator=g)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    engine = StreamingEngine(tiny_model, InferConfig(chunk_frames=2, sink_frames=2, window_frames=6), (H, W))
    engine.set_prompt(text)
    engine.start_from_latents(seed)
    sigma = 0.8
    got = engine.predict(x, sigma)
    held = torch.cat([seed, x[:, :, 1:]], dim=2)
    with torch.no_grad():
        ref = tiny_model(held, torch.tensor([[0.0, sigma * 1000]]), text)
    torch.testing.assert_close(got, ref, **TOL)
    with torch.no_grad():      # not vacuous: a plain timestep for the seeded frame gives another velocity
        other = tiny_model(held, torch.tensor([[sigma * 1000, sigma * 1000]]), text)
    assert (other - ref).abs().max() > 1e-4
    out = engine.generate_chunk(x)
    assert torch.equal(out[:, :, :1], seed) and not torch.equal(out[:, :, 1:], x[:, :, 1:])


@pytest.mark.parametrize("cf,guidance", [(1, False), (2, True)])
def test_image_latent_stays_in_global_sink(tiny_model, cf, guidance):
    cfg = tiny_model.cfg
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 16, 1, H, W, generator=g)                     # batch 2: two images
    text_a, text_b, neg = (torch.randn(2, cfg.text_len, cfg.text_dim, generator=g) for _ in range(3))
    # global sink 1 chunk, shot sink 1, rolling window 2: chunks leave the window from chunk 5 on
    infer = InferConfig(chunk_frames=cf, sink_frames=cf, shot_sink_frames=cf, window_frames=5 * cf,
                        denoising_steps=[1000, 500], guidance_scale=4.0 if guidance else 1.0)
    engine = StreamingEngine(tiny_model, infer, (H, W), batch=2)
    engine.set_prompt(text_a, negative=neg if guidance else None)
    engine.start_from_latents(image)
    n, switch, rows = 8, 5, engine.rows
    slot = engine.layout.sink_slots("global")[0]
    tok = engine.layout.tokens(slot)
    for c in range(n):
        if c == switch:
            engine.set_prompt(text_b, recache=True, new_shot=True)
        out = engine.generate_chunk(torch.randn(2, 16, cf, H, W, generator=g))
        if c == 0:
            assert torch.equal(out[:, :, :1], image)                    # the stream starts with the image
            chunk0 = out
        assert engine.cache.slot_chunk[slot] == 0, f"after chunk {c}"
        assert torch.equal(engine.cache.latents[slot], torch.cat([chunk0] * (rows // 2)))
        text = text_a if c < switch else text_b
        k_ref, v_ref = _chunk0_kv(tiny_model, chunk0, text)
        if guidance:
            k_neg, v_neg = _chunk0_kv(tiny_model, chunk0, neg)
            k_ref, v_ref = torch.cat([k_ref, k_neg], dim=1), torch.cat([v_ref, v_neg], dim=1)
        torch.testing.assert_close(engine.cache.k[:, :, tok], k_ref, **TOL, msg=f"K after chunk {c}")
        torch.testing.assert_close(engine.cache.v[:, :, tok], v_ref, **TOL, msg=f"V after chunk {c}")
    # the window rolled (chunk 2, the first window chunk, is gone) and the shot sink moved to the switch
    assert 2 not in engine.cache.slot_chunk and switch in engine.cache.slot_chunk
    assert engine.shot_starts == [0, switch]


def test_seed_bad_input(tiny_model):
    engine = StreamingEngine(tiny_model, InferConfig(chunk_frames=1, sink_frames=0, window_frames=3), (H, W))
    with pytest.raises(ValueError, match="infer.sink_frames=0: the seed"):
        engine.start_from_latents(torch.zeros(1, 16, 1, H, W))
    engine = StreamingEngine(tiny_model, InferConfig(), (H, W))
    with pytest.raises(ValueError, match=r"seed latents \(1, 16, 1, 4, 4\) do not match"):
        engine.start_from_latents(torch.zeros(1, 16, 1, 4, 4))


# ----- through the VAE ------------------------------------------------------------------------------------------
def _test_image(path, height=48, width=40):
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx * 6, yy * 5, 255 - xx * 3], -1).clip(0, 255).astype(np.uint8)
    img[10:30, 8:24] = [220, 40, 40]
    Image.fromarray(img).save(path)
    return img


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A 48x40 test image and the tiny (random) Wan2.1 VAE, saved as a diffusers directory for the CLI."""
    root = tmp_path_factory.mktemp("i2v")
    image = root / "image.png"
    _test_image(image)
    vae = WanVAE.tiny("wan2.1", seed=0)
    vae.model.save_pretrained(root / "vae")
    return dict(image=str(image), pixels=load_image(image, 32, 32), vae=WanVAE.from_pretrained(str(root / "vae")),
                vae_dir=str(root / "vae"), root=root)


def _cfg(fitted, *sets):
    return load_config(None, ["infer.num_chunks=3", "infer.chunk_frames=1", "infer.window_frames=3",
                              "infer.sink_frames=1", "infer.height=32", "infer.width=32",
                              "infer.denoising_steps=[1000,500]", f"infer.vae_path={fitted['vae_dir']}", *sets])


def _i2v_vs_t2v(cfg, model, vae, image_path, pixels):
    """(I2V first frame, text-only first frame, the image's VAE round trip), pixels [1, 3, 1, H, W]."""
    text = TextEncoder.tiny(text_dim=cfg.model.text_dim, text_len=cfg.model.text_len)
    seed = load_seed(vae, cfg.infer.height, cfg.infer.width, image=image_path)
    segs = parse_cli_prompts(["a red square"])
    i2v = generate_video(cfg, model, segs, None, vae, text, progress=False, seed_latents=seed)
    t2v = generate_video(cfg, model, segs, None, vae, text, progress=False)
    torch.testing.assert_close(i2v.latents[:, :, :1], seed, rtol=0, atol=0)
    assert (i2v.latents[:, :, 1:] - t2v.latents[:, :, 1:]).abs().max() > 1e-3   # later chunks see the image
    i2v_video, t2v_video = (vae.decode(r.latents).clamp(-1, 1) for r in (i2v, t2v))
    assert i2v_video.shape == t2v_video.shape == (1, 3, 9, 32, 32)
    return i2v_video[:, :, :1], t2v_video[:, :, :1], vae.decode(encode_seed(vae, pixels)).clamp(-1, 1)


def test_first_frame_is_the_image_vae_round_trip(fitted, tiny_cfg):
    """The first generated frame IS the image's VAE round trip (causal VAE: pixel frame 0 depends on latent frame 0
    only), so it reproduces the image exactly as well as the VAE does. With the random tiny VAE (measured
    2026-11-25): round trip 10.2 dB vs the image; first frame vs the round trip: identical within 1e-5 (> 80 dB);
    the text-only first frame vs the round trip: far lower."""
    from generate_helpers import tiny_dit

    first, t2v_first, roundtrip = _i2v_vs_t2v(_cfg(fitted), tiny_dit(tiny_cfg).eval(), fitted["vae"],
                                              fitted["image"], fitted["pixels"])
    torch.testing.assert_close(first, roundtrip, **TOL)
    print(f"round trip {psnr(roundtrip, fitted['pixels']):.2f} dB vs image; I2V first frame vs round trip "
          f"{psnr(first, roundtrip):.1f} dB; text-only first frame vs round trip {psnr(t2v_first, roundtrip):.1f} dB")
    assert psnr(first, roundtrip) > 80 and psnr(t2v_first, roundtrip) < 40
    assert abs(psnr(first, fitted["pixels"]) - psnr(roundtrip, fitted["pixels"])) < 0.01


@pytest.mark.slow
def test_first_frame_psnr_with_a_fitted_tiny_vae(fitted, tiny_cfg):
    """With a tiny VAE fitted to the image and 3 variants (flips, channel swap; so it must read its latent):
    the I2V first frame's PSNR vs the image, against the text-only first frame (numbers in MIN_I2V_PSNR)."""
    from generate_helpers import tiny_dit

    pixels = fitted["pixels"]
    vae = WanVAE.tiny("wan2.1", seed=0)
    batch = torch.cat([pixels, pixels.flip(-1), pixels.flip(-2), pixels[:, [2, 0, 1]]])
    opt = torch.optim.Adam(vae.parameters(), lr=5e-3)
    with torch.enable_grad():
        for _ in range(FIT_STEPS):
            rec = vae.model.decode(vae.model.encode(batch).latent_dist.mode()).sample
            loss = (rec - batch).abs().mean() + (rec - batch).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    vae.eval()
    first, t2v_first, roundtrip = _i2v_vs_t2v(_cfg(fitted), tiny_dit(tiny_cfg).eval(), vae, fitted["image"], pixels)
    torch.testing.assert_close(first, roundtrip, **TOL)
    got, base = psnr(first, pixels), psnr(t2v_first, pixels)
    print(f"fitted tiny VAE: I2V first frame {got:.2f} dB (round trip {psnr(roundtrip, pixels):.2f} dB), "
          f"text-only first frame {base:.2f} dB")
    assert got >= MIN_I2V_PSNR and base <= MAX_T2V_PSNR


def test_generate_cli_image_and_continuation(fitted, tiny_cfg, tmp_path):
    from generate_helpers import tiny_dit

    from megatron_longlive.cli.main import main
    from megatron_longlive.inference.pipeline import load_dit
    from megatron_longlive.models.wan.convert import save_wan_weights

    weights = tmp_path / "w.safetensors"
    save_wan_weights(tiny_dit(tiny_cfg), weights)
    common = ["--checkpoint", str(weights), "--prompt", "a red square@0", "--no-progress",
              "--set", f"infer.vae_path={fitted['vae_dir']}", "--set", "infer.chunk_frames=1",
              "--set", "infer.window_frames=3", "--set", "infer.sink_frames=1", "--set", "infer.height=32",
              "--set", "infer.width=32", "--set", "infer.denoising_steps=[1000,500]"]
    vae = fitted["vae"]
    # image-to-video: the latents start with the image's latent, the mp4 with (a codec's copy of) the image
    out, lat = tmp_path / "i2v.mp4", tmp_path / "i2v.pt"
    assert main(["generate", "--image", fitted["image"], "--out", str(out), "--latents-out", str(lat),
                 "--set", "infer.num_chunks=3", *common]) == 0
    latents = torch.load(lat)["latents"]
    torch.testing.assert_close(latents[:, :, :1], encode_seed(vae, fitted["pixels"]), rtol=0, atol=0)
    frames = read_mp4(out)
    assert frames.shape == (9, 32, 32, 3)
    first = torch.from_numpy(frames[:1].astype(np.float32)).permute(3, 0, 1, 2)[None] / 127.5 - 1
    roundtrip = vae.decode(encode_seed(vae, fitted["pixels"])).clamp(-1, 1)
    assert psnr(first, roundtrip) > 25          # measured 29.1 dB: yuv420 + crf 12 of a noisy random-VAE frame
    # continuation: the 9-frame mp4 above (3 latent frames = 3 chunks) seeds a 5-chunk video
    out2, lat2 = tmp_path / "cont.mp4", tmp_path / "cont.pt"
    assert main(["generate", "--continue-from", str(out), "--out", str(out2), "--latents-out", str(lat2),
                 "--set", "infer.num_chunks=5", *common]) == 0
    cont = torch.load(lat2)["latents"]
    clip = encode_seed(vae, load_clip(out, 32, 32))
    assert cont.shape[2] == 5 and clip.shape[2] == 3
    torch.testing.assert_close(cont[:, :, :3], clip, rtol=0, atol=0)
    # reference: commit the clip's chunks by hand (the tested commit path), then generate with the same noise
    cfg = _cfg(fitted, "infer.num_chunks=5")
    engine = StreamingEngine(load_dit(cfg, str(weights)), cfg.infer, (4, 4))
    text = TextEncoder.tiny(text_dim=cfg.model.text_dim, text_len=cfg.model.text_len, seed=0)
    engine.set_prompt(text.encode(["a red square"]))
    gen = torch.Generator().manual_seed(cfg.infer.seed)
    for c in range(3):
        torch.randn(1, 16, 1, 4, 4, generator=gen)                    # the seeded chunks' unused noise
        engine.commit(clip[:, :, c:c + 1])
    ref = torch.cat([engine.generate_chunk(torch.randn(1, 16, 1, 4, 4, generator=gen)) for _ in range(2)], dim=2)
    torch.testing.assert_close(cont[:, :, 3:], ref, **TOL)


def test_image_bad_input(fitted, tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match=r"--image .*nope.png: file not found"):
        load_image(tmp_path / "nope.png", 32, 32)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(ValueError, match=r"--image .*broken.png: cannot read it as an image"):
        load_image(broken, 32, 32)
    with pytest.raises(FileNotFoundError, match=r"--continue-from .*nope.mp4: file not found"):
        load_clip(tmp_path / "nope.mp4", 32, 32)
    with pytest.raises(ValueError, match=r"--continue-from .*broken.png: cannot decode it as a video"):
        load_clip(broken, 32, 32)
    with pytest.raises(ValueError, match="exactly one of --image PATH and --continue-from CLIP"):
        load_seed(fitted["vae"], 32, 32, image=fitted["image"], clip=fitted["image"])
    # a seed that fills the whole video leaves nothing to generate
    cfg = _cfg(fitted, "infer.num_chunks=1")
    with pytest.raises(ValueError, match=r"fill all infer.num_chunks=1 chunks"):
        generate_video(cfg, tiny_model, parse_cli_prompts(["a"]), None, fitted["vae"],
                       TextEncoder.tiny(text_dim=cfg.model.text_dim, text_len=cfg.model.text_len),
                       seed_latents=torch.zeros(1, 16, 1, 4, 4))


def test_wrong_size_image_is_resized_and_center_cropped(tmp_path):
    """48x40 -> scale 0.8 to cover 32x32 (38x32), crop rows 3..35: compared with PIL's bicubic resize + crop."""
    path = tmp_path / "img.png"
    img = _test_image(path)
    got = load_image(path, 32, 32)[0, :, 0]                               # [3, 32, 32]
    peer = np.asarray(Image.fromarray(img).resize((32, 38), Image.BICUBIC), dtype=np.float32)[3:35]
    peer = torch.from_numpy(peer).permute(2, 0, 1) / 127.5 - 1
    assert got.shape == (3, 32, 32)
    assert (got - peer).abs().mean() < 0.02, (got - peer).abs().mean()
    # the wrong crop (top-left) is clearly worse: the test sees the center crop
    wrong = torch.from_numpy(np.asarray(Image.fromarray(img).resize((32, 38), Image.BICUBIC),
                                        dtype=np.float32)[:32]).permute(2, 0, 1) / 127.5 - 1
    assert (got - wrong).abs().mean() > 2 * (got - peer).abs().mean()
    # right size: untouched; a wide clip frame is cropped left/right
    same = torch.rand(1, 3, 32, 32)
    assert torch.equal(resize_center_crop(same, 32, 32), same)
    assert resize_center_crop(torch.rand(2, 3, 32, 64), 32, 32).shape == (2, 3, 32, 32)
    clip = tmp_path / "clip.mp4"
    write_mp4(clip, torch.rand(3, 11, 24, 48) * 2 - 1, 8.0)               # 11 frames -> the first 9 are kept
    with pytest.warns(UserWarning, match="using the first 9 of 11 frames"):
        assert load_clip(clip, 32, 32).shape == (1, 3, 9, 32, 32)


def test_live_stream_starts_from_the_image_with_guidance(fitted, tiny_cfg):
    """The viewer's LiveStream (serve --image, guidance on) == the engine driven by hand with the same seed latents."""
    from generate_helpers import tiny_dit

    from megatron_longlive.serve.stream import LiveStream

    cfg = _cfg(fitted, "infer.guidance_scale=3", "infer.negative_prompt=static")
    vae, model = fitted["vae"], tiny_dit(tiny_cfg).eval()
    text = TextEncoder.tiny(text_dim=cfg.model.text_dim, text_len=cfg.model.text_len)
    seed = load_seed(vae, 32, 32, image=fitted["image"])
    stream = LiveStream(cfg, model, vae, text, "a red square", seed_latents=seed)
    first_frames = stream.next_chunk()[2]
    for _ in range(2):
        stream.next_chunk()
    engine = StreamingEngine(model, cfg.infer, (4, 4))
    engine.set_negative_prompt(text.encode(["static"]))
    engine.set_prompt(text.encode(["a red square"]))
    engine.start_from_latents(seed)
    gen = torch.Generator().manual_seed(cfg.infer.seed)
    ref = [engine.generate_chunk(torch.randn(1, 16, 1, 4, 4, generator=gen)) for _ in range(3)]
    torch.testing.assert_close(torch.cat(stream.latents, 2), torch.cat(ref, 2), **TOL)
    assert torch.equal(stream.latents[0], seed) and stream.engine.guidance
    roundtrip = vae.decode(seed).clamp(-1, 1)[0].permute(1, 2, 3, 0)                  # [1, H, W, 3]
    assert np.abs(first_frames.astype(np.float32) - ((roundtrip.numpy() + 1) * 127.5)).max() <= 1.0
