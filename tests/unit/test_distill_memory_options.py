"""`longlive distill` honours the trainer's memory options: train.activation_checkpointing and
train.offload_activations are applied by the Distiller itself (trainer.apply_memory_options, the trainer's path)
to the one shared model, so the generator rollout's and the critic's forwards with gradient go through it. Losses,
LoRA gradients and updates equal the run without them bit for bit over 2 steps (CPU, tiny preset)."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.config import ConfigError, build_config
from megatron_longlive.models.wan import WanDiT
from megatron_longlive.training import dmd

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, **train):
    return build_config({"train": {"chunk_frames": 2, "output_dir": str(tmp_path / "run"), "wandb_mode": "disabled",
                                   **train},
                         "distill": {"rollout_frames": 4, "critic_ratio": 1, "real_guidance": 3.0, "rank": 4,
                                     "critic_rank": 4, "output_dir": str(tmp_path / "distill"), "lr": 1e-2,
                                     "critic_lr": 1e-2}})


def _run(tmp_path, **train):
    """Two distill steps; per step the losses, both LoRAs' gradients (of their last update) and their values."""
    cfg = _cfg(tmp_path, **train)
    torch.manual_seed(0)
    model = WanDiT(cfg.model)
    model.init_weights()
    torch.nn.init.normal_(model.head.head.weight, std=0.05)   # Wan's zero head would make every score 0
    prompts = torch.randn(3, cfg.model.text_len, cfg.model.text_dim, generator=torch.Generator().manual_seed(4))
    d = dmd.Distiller(cfg, model, prompts, "causal", (4, 4))
    steps = []
    for _ in range(2):
        m = d.train_step()
        params = d.gen_params + d.critic_params
        steps.append(([m["critic_loss"], m["generator_loss"]], [p.grad.clone() for p in params],
                      [p.detach().clone() for p in params]))
    return d, steps


def test_checkpointing_and_offload_give_bitwise_equal_distill_steps(tmp_path):
    _, ref = _run(tmp_path / "plain")
    ac, with_ac = _run(tmp_path / "ac", activation_checkpointing=True)
    with pytest.warns(UserWarning, match="saves no memory on cpu"):
        off, with_off = _run(tmp_path / "off", activation_checkpointing=True, offload_activations=True)
    assert ac.offload is None and all(b.forward.__name__ == "ckpt_forward" for b in ac.model.blocks)
    # the block inputs went to host copies and came back: every checkpointed forward with grad (the rollout's last
    # denoising step per chunk, the critic's loss) was recomputed through the offload
    assert off.offload.offloaded_bytes > 0 and off.offload.restored_bytes == off.offload.offloaded_bytes
    for other in (with_ac, with_off):
        for (loss_a, grads_a, params_a), (loss_b, grads_b, params_b) in zip(ref, other):
            assert loss_a == loss_b
            assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
            assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    gen_grads = ref[-1][1][:len(ac.gen_params)]
    assert any(g.abs().sum() > 0 for g in gen_grads) and any(g.abs().sum() > 0 for g in ref[-1][1][len(gen_grads):])
    assert any(not torch.equal(a, b) for a, b in zip(ref[0][2], ref[1][2]))     # the LoRAs move between steps


def test_distill_offload_without_checkpointing_is_the_trainer_config_error(tmp_path):
    with pytest.raises(ConfigError, match="offload_activations") as e:
        _cfg(tmp_path, offload_activations=True)
    assert "train.activation_checkpointing=true" in str(e.value)
