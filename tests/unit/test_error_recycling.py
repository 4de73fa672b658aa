"""Error recycling: the buffer (noise-level buckets, recorded x0 errors), injection into the clean history only
(noisy twins and loss targets unchanged), the kept-clean fraction, checkpoint state, and - with every new
option off - training bit-identical to the plain teacher-forcing step written from the pure functions."""
from __future__ import annotations

import pytest
import torch

from dataloaders.latent_dataset import InMemoryLatentDataset, random_latent_dataset
from megatron_longlive.config import build_config
from megatron_longlive.training.error_recycling import ErrorRecycler, RecyclingOptions
from megatron_longlive.training.schedule import sample_sigmas
from megatron_longlive.training.teacher_forcing import (build_tf_inputs, flow_matching_loss, noisy_prediction,
                                                        teacher_forcing_loss, tf_forward)
from megatron_longlive.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _video(cfg, frames=4, batch=2, seed=21):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, frames, 8, 8, generator=g)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return x, text


def _filled(cfg, chunk_frames=1, **opts):
    rec = ErrorRecycler(RecyclingOptions(**{"clean_prob": 0.0, "chunk_prob": 1.0, **opts}), seed=1)
    g = torch.Generator().manual_seed(9)
    for s in (0.05, 0.5, 0.95):
        rec.add(torch.randn(cfg.in_channels, chunk_frames, 8, 8, generator=g), s)
    return rec


def test_record_stores_minus_sigma_velocity_error_per_chunk_and_bucket():
    rec = ErrorRecycler(RecyclingOptions(num_buckets=10, bucket_size=2), seed=0)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(1, 3, 4, 2, 2, generator=g), torch.randn(1, 3, 4, 2, 2, generator=g)
    sigma = torch.tensor([[0.15, 0.97]])
    rec.record(pred, target, sigma, chunk_frames=2)
    b1, b9 = rec.buckets[(3, 2, 2, 2)][1], rec.buckets[(3, 2, 2, 2)][9]
    assert rec.bucket_of(0.15) == 1 and rec.bucket_of(0.97) == 9 and rec.bucket_of(1.0) == 9
    torch.testing.assert_close(b1[0], -0.15 * (pred - target)[0, :, :2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b9[0], -0.97 * (pred - target)[0, :, 2:], rtol=1e-6, atol=1e-7)
    # x0_hat - x identity: z - sigma * v_hat - x == -sigma * (v_hat - v)
    x, eps = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    s, v_hat = 0.15, torch.randn(3, 2, 2, 2, generator=g)
    z = (1 - s) * x + s * eps
    torch.testing.assert_close(z - s * v_hat - x, -s * (v_hat - (eps - x)), rtol=1e-5, atol=1e-6)
    # bounded buckets: a full bucket replaces an entry
    for _ in range(5):
        rec.record(pred, target, sigma, chunk_frames=2)
    assert len(rec.buckets[(3, 2, 2, 2)][1]) == 2 and rec.stats()["total_added"] == 12


def test_injection_changes_only_the_clean_history(tiny_model):
    cfg = tiny_model.cfg
    x, text = _video(cfg)
    rec = _filled(cfg)
    before = {k: [list(b) for b in v] for k, v in rec.buckets.items()}
    with torch.no_grad():
        l_plain, plain = teacher_forcing_loss(tiny_model, x, text, 1, torch.Generator().manual_seed(4))
        l_er, er = teacher_forcing_loss(tiny_model, x, text, 1, torch.Generator().manual_seed(4), recycler=rec)
    s = plain.num_clean_tokens
    assert torch.equal(er.target, plain.target)                 # loss targets: untouched
    assert torch.equal(er.tokens[:, s:], plain.tokens[:, s:])   # noisy twins: untouched
    assert torch.equal(er.t, plain.t) and torch.equal(er.positions, plain.positions)
    assert not torch.equal(er.tokens[:, :s], plain.tokens[:, :s])  # the clean history is degraded
    assert l_er != l_plain
    # the degraded history is the data plus stored errors, chunk by chunk (scaled within +-modulate)
    hist, clean = ErrorRecycler(rec.opt, seed=1), None
    hist.buckets = before
    h, clean = hist.degrade(x, 1)
    assert not clean.any()
    for b in range(2):
        for j in range(4):
            d = (h - x)[b, :, j]
            ratios = [(d * e[:, 0]).sum() / (e[:, 0] * e[:, 0]).sum() for e in hist.entries((16, 1, 8, 8))]
            assert any(abs(r - 1) <= 0.3 + 1e-5 and torch.allclose(d, r * e[:, 0], atol=1e-5)
                       for r, e in zip(ratios, hist.entries((16, 1, 8, 8))))
    # the step recorded its own errors
    assert rec.stats()["total_added"] == 3 + 8


def test_clean_fraction_and_empty_buffer_leave_history_untouched(tiny_model):
    cfg = tiny_model.cfg
    x, _ = _video(cfg)
    empty = ErrorRecycler(RecyclingOptions(clean_prob=0.0, chunk_prob=1.0))
    assert empty.degrade(x, 1)[0] is None
    h, clean = _filled(cfg, clean_prob=1.0).degrade(x, 1)
    assert h is None and clean.all()
    assert _filled(cfg, chunk_prob=0.0).degrade(x, 1)[0] is None
    # kept-clean videos add their errors only with clean_update_prob
    rec = _filled(cfg, clean_update_prob=0.0)
    rec.record(torch.ones(2, 16, 4, 8, 8), torch.zeros(2, 16, 4, 8, 8), torch.full((2, 4), 0.5), 1,
               clean=torch.tensor([True, False]))
    assert rec.stats()["total_added"] == 3 + 4
    # conditioning frames stay exact
    h, _ = _filled(cfg, chunk_frames=2).degrade(x, 2, keep_first=1, keep_mask=torch.tensor([True, False]))
    assert torch.equal(h[0, :, :1], x[0, :, :1]) and not torch.equal(h[1, :, :1], x[1, :, :1])


def test_state_dict_round_trip(tiny_model):
    cfg = tiny_model.cfg
    x, _ = _video(cfg)
    a = _filled(cfg)
    b = ErrorRecycler(a.opt, seed=123)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.degrade(x, 1)[0], b.degrade(x, 1)[0])
    with pytest.raises(ValueError, match="error_recycling_num_buckets"):
        ErrorRecycler(RecyclingOptions(num_buckets=3)).load_state_dict(a.state_dict())


class LegacyStep:
    """The plain teacher-forcing step written from the pure functions (what TeacherForcingStep did before)."""

    def __call__(self, model, batch, generator):
        latents, text = batch["latents"], batch["text"]
        b, f = latents.shape[0], latents.shape[2]
        sigma = sample_sigmas((b, f), 5.0, 1000, generator)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        inputs = build_tf_inputs(model, latents, noise, sigma, 1, 1000)
        out = tf_forward(model, inputs, model.embed_context(text))
        loss = flow_matching_loss(noisy_prediction(model, out, inputs), inputs.target)
        return loss, inputs.tokens.shape[0] * inputs.tokens.shape[1]


def _cfg(run_dir, **train):
    base = {"output_dir": str(run_dir), "max_steps": 4, "save_interval": 1000, "wandb_mode": "disabled",
            "warmup_steps": 2, "micro_batch": 2, "chunk_frames": 1, "seed": 0}
    return build_config({"train": {**base, **train},
                         "data": {"source": "zarr", "path": "x.pt", "height": 64, "width": 64, "num_frames": 13}})


def _run(cfg, dataset, strategy=None):
    tr = Trainer(cfg, dataset=dataset, strategy=strategy, progress=False)
    return tr.train(), tr.model.state_dict(), tr


def test_options_off_are_bit_identical_to_the_plain_step(tmp_path):
    cfg = _cfg(tmp_path / "ref")
    ref_losses, ref_params, _ = _run(cfg, random_latent_dataset(cfg, 4), LegacyStep())
    cfg = _cfg(tmp_path / "new", error_recycling=False, first_frame_prob=0.0, per_shot_text=True)
    losses, params, tr = _run(cfg, random_latent_dataset(cfg, 4))
    assert tr.recycler is None and losses == ref_losses
    assert all(torch.equal(params[k], ref_params[k]) for k in ref_params)
    # per_shot_text=False ignores per-shot captions: the same run on data that has them
    data = random_latent_dataset(cfg, 4)
    shots = InMemoryLatentDataset(data.latents, data.text, data.captions, texts=torch.randn(4, 2, *data.text.shape[1:]),
                                  frame_shot=torch.zeros(4, 4, dtype=torch.long))
    off, off_params, _ = _run(_cfg(tmp_path / "off", per_shot_text=False), shots)
    assert off == ref_losses and all(torch.equal(off_params[k], ref_params[k]) for k in ref_params)
    on, _, _ = _run(_cfg(tmp_path / "on"), shots)
    assert on != ref_losses                                   # per-shot captions are used when available


def test_trainer_with_error_recycling_fills_buffer_and_resumes(tmp_path):
    cfg = _cfg(tmp_path / "er", error_recycling=True, save_interval=2, max_steps=4)
    losses, _, tr = _run(cfg, random_latent_dataset(cfg, 4))
    assert tr.recycler.stats()["entries"] > 0 and all(torch.isfinite(torch.tensor(losses)))
    ref_losses, _, _ = _run(_cfg(tmp_path / "ref"), random_latent_dataset(cfg, 4))
    assert losses[0] == ref_losses[0] and losses[1:] != ref_losses[1:]   # step 1: empty buffer, nothing injected
    # exact resume: a run stopped at step 2 and resumed reproduces steps 3-4 (buffer + its generator restored)
    cfg2 = _cfg(tmp_path / "er2", error_recycling=True, save_interval=2, max_steps=2)
    first, _, _ = _run(cfg2, random_latent_dataset(cfg, 4))
    cfg2 = _cfg(tmp_path / "er2", error_recycling=True, save_interval=2, max_steps=4)
    resumed = Trainer(cfg2, dataset=random_latent_dataset(cfg, 4), progress=False, resume=True)
    assert first + resumed.train() == losses
