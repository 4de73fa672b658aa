"""First-frame (image-to-video) conditioning in teacher forcing: the conditioning frame of noisy chunk 0 is the
clean latent at t = 0 and carries no loss; p = 0 leaves training bit-identical."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.training.teacher_forcing import (build_tf_inputs, flow_matching_loss, noisy_prediction,
                                                        teacher_forcing_loss, tf_forward)

pytestmark = pytest.mark.usefixtures("one_thread")


def _video(cfg, frames=4, batch=2, seed=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, frames, 8, 8, generator=g)
    noise = torch.randn(x.shape, generator=g)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return x, noise, text


def test_conditioning_frame_is_clean_at_t0_without_loss(tiny_model):
    cfg = tiny_model.cfg
    x, noise, text = _video(cfg)
    sigma = torch.tensor([[0.7, 0.4], [0.6, 0.9]])
    cond = torch.tensor([True, False])
    plain = build_tf_inputs(tiny_model, x, noise, sigma, 2)
    inp = build_tf_inputs(tiny_model, x, noise, sigma, 2, cond_first=cond)
    s, tpf = inp.num_clean_tokens, 16
    # video 0: the noisy twin's first frame holds the clean frame's tokens, at t = 0
    assert torch.equal(inp.tokens[0, s:s + tpf], inp.tokens[0, :tpf])
    assert not torch.equal(plain.tokens[0, s:s + tpf], plain.tokens[0, :tpf])
    assert inp.t[0, 4].item() == 0 and inp.t[0, 5].item() == pytest.approx(700.0)
    # everything else is the plain sequence
    assert torch.equal(inp.tokens[0, s + tpf:], plain.tokens[0, s + tpf:]) and torch.equal(inp.tokens[1], plain.tokens[1])
    assert torch.equal(inp.t[1], plain.t[1]) and torch.equal(inp.t[0, :4], plain.t[0, :4])
    assert torch.equal(inp.target, plain.target)
    assert torch.equal(inp.loss_weight, torch.tensor([[0.0, 1, 1, 1], [1, 1, 1, 1]]))
    # no loss on the conditioning frame: zero gradient there, the mean over the other frames otherwise
    out = tf_forward(tiny_model, inp, tiny_model.embed_context(text)).detach().requires_grad_(True)
    pred = noisy_prediction(tiny_model, out, inp)
    loss = flow_matching_loss(pred, inp.target, inp.loss_weight)
    loss.backward()
    assert torch.count_nonzero(out.grad[0, s:s + tpf]) == 0
    assert torch.count_nonzero(out.grad[0, s + tpf:]) == out.grad[0, s + tpf:].numel()
    err = (pred.detach() - inp.target).pow(2)
    by_hand = torch.cat([err[0, :, 1:].flatten(), err[1].flatten()]).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=0)


def test_no_conditioned_video_is_the_plain_sequence(tiny_model):
    x, noise, _ = _video(tiny_model.cfg)
    sigma = torch.tensor([[0.7, 0.4], [0.6, 0.9]])
    plain = build_tf_inputs(tiny_model, x, noise, sigma, 2)
    none = build_tf_inputs(tiny_model, x, noise, sigma, 2, cond_first=torch.tensor([False, False]))
    assert none.loss_weight is None
    assert torch.equal(none.tokens, plain.tokens) and torch.equal(none.t, plain.t)


def test_probability_draws_and_p0_bit_identical(tiny_model):
    x, _, text = _video(tiny_model.cfg)
    with torch.no_grad():
        l0, i0 = teacher_forcing_loss(tiny_model, x, text, 2, torch.Generator().manual_seed(3))
        lp, ip = teacher_forcing_loss(tiny_model, x, text, 2, torch.Generator().manual_seed(3), first_frame_prob=0.0)
        l1, i1 = teacher_forcing_loss(tiny_model, x, text, 2, torch.Generator().manual_seed(3), first_frame_prob=1.0)
    assert torch.equal(l0, lp) and torch.equal(i0.tokens, ip.tokens) and ip.loss_weight is None
    # p = 1: every video conditioned; sigmas and noise are the same draws (the coin comes after them)
    assert torch.equal(i1.target, i0.target) and torch.equal(i1.tokens[:, :64], i0.tokens[:, :64])
    assert (i1.t[:, 4] == 0).all() and (i1.loss_weight[:, 0] == 0).all() and (i1.loss_weight[:, 1:] == 1).all()
    assert not torch.equal(l1, l0)


def test_trainer_first_frame_prob(tmp_path):
    from dataloaders.latent_dataset import random_latent_dataset
    from megatron_longlive.config import build_config
    from megatron_longlive.training.trainer import Trainer

    def run(p):
        cfg = build_config({"train": {"output_dir": str(tmp_path / str(p)), "max_steps": 2, "save_interval": 1000,
                                      "wandb_mode": "disabled", "micro_batch": 2, "first_frame_prob": p},
                            "data": {"source": "zarr", "path": "x.pt", "height": 64, "width": 64, "num_frames": 13}})
        tr = Trainer(cfg, dataset=random_latent_dataset(cfg, 4), progress=False)
        return tr.train()

    base, cond = run(0.0), run(1.0)
    assert base[0] != cond[0] and all(torch.isfinite(torch.tensor(cond)))
    with pytest.raises(ValueError, match="train.first_frame_prob"):
        build_config({"train": {"first_frame_prob": 1.5}})
