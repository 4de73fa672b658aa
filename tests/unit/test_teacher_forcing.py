"""Teacher forcing: mask table, schedule, and the TF forward against per-chunk reference runs."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.training.schedule import sample_sigmas, shift_sigma
from megatron_longlive.training.teacher_forcing import (build_tf_inputs, flow_matching_loss, noisy_prediction,
                                                        per_chunk_loss, teacher_forcing_loss, teacher_forcing_mask,
                                                        tf_block_table, tf_forward)


def _video(cfg, frames=6, batch=2, seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, frames, 8, 8, generator=g, dtype=dtype)
    noise = torch.randn(x.shape, generator=g, dtype=dtype)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g, dtype=dtype)
    return x, noise, text


def test_block_table_matches_rule():
    n = 4
    table = tf_block_table(n)
    for qi in range(2 * n):
        for ki in range(2 * n):
            q_noisy, q = qi >= n, qi % n
            k_noisy, k = ki >= n, ki % n
            if not q_noisy:
                expect = (not k_noisy) and k <= q
            else:
                expect = (k_noisy and k == q) or ((not k_noisy) and k < q)
            assert bool(table[qi, ki]) == expect, (qi, ki)


def test_shift_schedule_formula_and_range():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    ref = torch.tensor([5 * v / (1 + 4 * v) for v in s.tolist()], dtype=torch.float64)
    assert torch.allclose(shift_sigma(s, 5.0), ref, rtol=0, atol=1e-15)
    assert torch.equal(shift_sigma(s, 1.0), s)
    sig = sample_sigmas((4096,), 5.0, 1000, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sig.min() > 0 and sig.max() <= 1
    # shift 5 puts the median sigma at shift(0.5) = 5/6
    assert abs(sig.median().item() - 5 / 6) < 0.03


def test_inputs_layout(tiny_model):
    cfg = tiny_model.cfg
    x, noise, _ = _video(cfg, frames=4, batch=1, dtype=torch.float32)
    sigma = torch.tensor([[0.1, 0.4]])
    inp = build_tf_inputs(tiny_model, x, noise, sigma, chunk_frames=2)
    s = inp.num_clean_tokens
    assert inp.tokens.shape == (1, 2 * s, cfg.dim) and s == 4 * 16
    # twins share positions
    assert torch.equal(inp.positions[:s], inp.positions[s:])
    # clean frames at t=0; noisy frames at sigma * 1000, constant within a chunk (chunk_frames=2)
    assert torch.equal(inp.t[0, :4], torch.zeros(4))
    assert torch.allclose(inp.t[0, 4:], torch.tensor([100.0, 100.0, 400.0, 400.0]))
    assert torch.equal(inp.target, noise - x)


@pytest.mark.parametrize("chunk_frames", [1, 2])
def test_tf_forward_equals_per_chunk_runs(tiny_model, chunk_frames):
    """Noisy chunk i of the TF forward == the plain model on [x_0..x_{i-1}, z_i] with a hand-built mask."""
    model = tiny_model.double()
    cfg = model.cfg
    frames = 6
    x, noise, text = _video(cfg, frames=frames)
    n = frames // chunk_frames
    sigma = torch.rand(2, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        inp = build_tf_inputs(model, x, noise, sigma, chunk_frames)
        pred = noisy_prediction(model, tf_forward(model, inp, model.embed_context(text)), inp)
        tpf = 16  # 8x8 latents, 2x2 patches
        for i in range(n):
            lo, hi_ = i * chunk_frames, (i + 1) * chunk_frames
            s_i = sigma[:, i].view(2, 1, 1, 1, 1)
            z_i = (1 - s_i) * x[:, :, lo:hi_] + s_i * noise[:, :, lo:hi_]
            seq = torch.cat([x[:, :, :lo], z_i], dim=2)                  # [B, C, (i+1)*cf, H, W]
            t = torch.cat([torch.zeros(2, lo, dtype=torch.float64),
                           (sigma[:, i:i + 1] * 1000).expand(2, chunk_frames)], dim=1)
            # independent mask: token a attends token b iff chunk(b) <= chunk(a)
            chunk_of = torch.arange(hi_).repeat_interleave(tpf) // chunk_frames
            dense = chunk_of[None, :] <= chunk_of[:, None]
            ref = model(seq, t, text, mask=dense)
            got = pred[:, :, lo:hi_]
            assert (got - ref[:, :, lo:]).abs().max().item() <= 1e-10, i


def test_loss_ignores_clean_half(tiny_model):
    """The loss's gradient w.r.t. the head output is exactly zero on clean tokens and non-zero on noisy ones."""
    cfg = tiny_model.cfg
    x, noise, text = _video(cfg, frames=4, dtype=torch.float32)
    sigma = torch.full((2, 4), 0.5)
    inp = build_tf_inputs(tiny_model, x, noise, sigma, chunk_frames=1)
    out = tf_forward(tiny_model, inp, tiny_model.embed_context(text)).detach().requires_grad_(True)
    loss = flow_matching_loss(noisy_prediction(tiny_model, out, inp), inp.target)
    loss.backward()
    s = inp.num_clean_tokens
    assert torch.count_nonzero(out.grad[:, :s]) == 0
    assert torch.count_nonzero(out.grad[:, s:]) == out.grad[:, s:].numel()
    # and the loss value is the plain MSE of the noisy half against eps - x
    pred = tiny_model.unpatchify(out[:, s:], inp.grid)
    assert torch.allclose(loss, ((pred - (noise - x)) ** 2).mean())


def test_later_chunk_never_changes_earlier_loss(tiny_model):
    cfg = tiny_model.cfg
    x, noise, text = _video(cfg, frames=4, dtype=torch.float32)
    sigma = torch.tensor([[0.3, 0.5, 0.8, 0.9], [0.9, 0.2, 0.6, 0.4]])

    def chunk_losses(x, noise, sigma):
        with torch.no_grad():
            inp = build_tf_inputs(tiny_model, x, noise, sigma, chunk_frames=1)
            pred = noisy_prediction(tiny_model, tf_forward(tiny_model, inp, tiny_model.embed_context(text)), inp)
        return per_chunk_loss(pred, inp.target, 1)

    base = chunk_losses(x, noise, sigma)
    for k in range(1, 4):
        x2, n2, s2 = x.clone(), noise.clone(), sigma.clone()
        x2[:, :, k:] += torch.randn_like(x2[:, :, k:])
        n2[:, :, k:] = torch.randn_like(n2[:, :, k:])
        s2[:, k:] = 0.05
        got = chunk_losses(x2, n2, s2)
        assert torch.allclose(got[:, :k], base[:, :k], rtol=0, atol=1e-6), k
        assert not torch.allclose(got[:, k], base[:, k])


def test_teacher_forcing_loss_is_reproducible_and_backpropagates(tiny_model):
    cfg = tiny_model.cfg
    x, _, text = _video(cfg, frames=4, dtype=torch.float32)
    l1, _ = teacher_forcing_loss(tiny_model, x, text, 2, torch.Generator().manual_seed(5))
    l2, _ = teacher_forcing_loss(tiny_model, x, text, 2, torch.Generator().manual_seed(5))
    assert torch.equal(l1, l2)
    l1.backward()
    grads = [p.grad for p in tiny_model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert tiny_model.head.head.weight.grad.abs().sum() > 0


def test_mask_is_chunkmask_not_dense(tiny_model):
    x, noise, _ = _video(tiny_model.cfg, frames=4, batch=1, dtype=torch.float32)
    inp = build_tf_inputs(tiny_model, x, noise, torch.full((1, 2), 0.5), chunk_frames=2)
    ref = teacher_forcing_mask(2, 2, 16)
    assert torch.equal(inp.mask.allowed, ref.allowed) and inp.mask.allowed.shape == (4, 4)
