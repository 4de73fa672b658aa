"""The QAT row of the fidelity report: `qat.*` variants fine-tune the checkpoint with the variant's quantized
linears (the Trainer, the NVFP4 forward) before generating; one command gives BF16 vs NVFP4 PTQ vs NVFP4 QAT."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dataloaders.latent_dataset import save_latent_file
from megatron_longlive.cli.main import main
from megatron_longlive.config import load_config
from megatron_longlive.eval.qat import QATSettings, qat_finetune
from megatron_longlive.eval.variants import DEFAULT_QAT_STEPS, parse_variant
from megatron_longlive.inference.pipeline import load_dit
from megatron_longlive.quant.nvfp4.linear import NVFP4Linear
from megatron_longlive.training.teacher_forcing import teacher_forcing_loss

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["model.preset=tiny", "infer.num_chunks=2", "infer.height=32", "infer.width=32", "infer.chunk_frames=1",
        "infer.window_frames=2", "infer.denoising_steps=[1000,500]", "data.height=32", "data.width=32",
        "data.num_frames=5", "train.chunk_frames=1", "train.lr=1e-3", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny weights with a non-zero head (.safetensors) and one 2-latent-frame training clip (.pt)."""
    from safetensors.torch import save_file

    from tests.unit.generate_helpers import tiny_dit

    root = tmp_path_factory.mktemp("qat")
    cfg = load_config(None, BASE)
    model = tiny_dit(cfg.model, head_std=0.05)
    ckpt = root / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, cfg.model.in_channels, 2, 4, 4, generator=g)
    text = torch.randn(1, cfg.model.text_len, cfg.model.text_dim, generator=g)
    data = root / "clip.pt"
    save_latent_file(data, latents, text)
    return {"ckpt": str(ckpt), "overrides": [*BASE, "data.source=zarr", f"data.path={data}"], "latents": latents,
            "text": text, "root": root}


def _first_loss(run_dir) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return json.loads(f.readline())["loss"]


def test_parse_qat_variant():
    v = parse_variant(["nvfp4_qat", "quant.linear=nvfp4_emulated", "qat.steps=7", "qat.loss=distill"])
    assert v.overrides == ("quant.linear=nvfp4_emulated",) and v.qat == QATSettings(7, "distill")
    assert parse_variant(["q", "qat.loss=task"]).qat == QATSettings(DEFAULT_QAT_STEPS, "task")
    assert parse_variant(["ptq", "quant.linear=nvfp4_emulated"]).qat is None
    with pytest.raises(ValueError, match=r"unknown \['qat.step'\]"):
        parse_variant(["q", "qat.step=3"])
    with pytest.raises(ValueError, match="qat.steps='x'"):
        parse_variant(["q", "qat.steps=x"])
    with pytest.raises(ValueError, match="qat.loss='mse'"):
        parse_variant(["q", "qat.loss=mse"])
    with pytest.raises(ValueError, match="qat.steps=0"):
        parse_variant(["q", "qat.steps=0"])


def test_qat_trains_through_the_quantized_forward(setup, tmp_path):
    """Step 1's loss is the teacher-forcing loss of the NVFP4-converted checkpoint (computed here independently
    with the Trainer's seed), not the high-precision one's; the weights change."""
    cfg = load_config(None, [*setup["overrides"], "quant.linear=nvfp4_emulated"])
    run = qat_finetune(cfg, setup["ckpt"], QATSettings(2), str(tmp_path / "qat"), progress=False)
    loss1 = _first_loss(run)

    def tf_loss(quant_cfg):
        model = load_dit(quant_cfg, setup["ckpt"]).train()
        gen = torch.Generator().manual_seed(cfg.train.seed + 1)           # the Trainer's noise / sigma generator
        with torch.no_grad():
            loss, _ = teacher_forcing_loss(model, setup["latents"], setup["text"], 1, gen, cfg.train.timestep_shift,
                                           cfg.train.num_train_timesteps)
        return loss.item(), model

    quantized, qmodel = tf_loss(cfg)
    high, _ = tf_loss(load_config(None, setup["overrides"]))
    assert sum(isinstance(m, NVFP4Linear) for m in qmodel.modules()) == 20
    assert loss1 == pytest.approx(quantized, rel=1e-5)
    assert abs(quantized - high) > 1e-4 * abs(high)                          # the two are distinguishable
    assert abs(loss1 - high) > 10 * abs(loss1 - quantized)
    before = load_dit(load_config(None, setup["overrides"]), setup["ckpt"]).state_dict()
    after = load_dit(load_config(None, setup["overrides"]), run).state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.endswith("ffn.0.weight") for k in changed)


def test_distill_objective_is_zero_without_quantization(setup, tmp_path):
    """distill regresses on the high-precision checkpoint's own predictions: with bf16 linears the student is
    the teacher (loss exactly 0); with NVFP4 linears the loss is the quantization error (> 0)."""
    hp = load_config(None, setup["overrides"])
    q = load_config(None, [*setup["overrides"], "quant.linear=nvfp4_emulated"])
    assert _first_loss(qat_finetune(hp, setup["ckpt"], QATSettings(1, "distill"), str(tmp_path / "a"),
                                    progress=False)) == 0.0
    assert _first_loss(qat_finetune(q, setup["ckpt"], QATSettings(1, "distill"), str(tmp_path / "b"),
                                    progress=False)) > 0.0


def test_one_command_gives_bf16_ptq_and_qat_rows(setup, tmp_path):
    out = tmp_path / "fid"
    args = ["eval", "--checkpoint", setup["ckpt"], *(a for o in setup["overrides"] for a in ("--set", o)),
            "--prompt", "a red square slides right", "--variant", "bf16",
            "--variant", "nvfp4_ptq", "quant.linear=nvfp4_emulated",
            "--variant", "nvfp4_qat", "quant.linear=nvfp4_emulated", "qat.steps=2",
            "--metrics", "flicker", "--out", str(out), "--no-plots"]
    assert main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["reference"] == "bf16" and [r["run"] for r in rep["fidelity"]] == ["nvfp4_ptq", "nvfp4_qat"]
    ptq, qat = rep["fidelity"]
    assert 0 < ptq["latent_mse"] and 0 < qat["latent_mse"] and ptq["latent_mse"] != qat["latent_mse"]
    md = (out / "report.md").read_text()
    for row in ("| bf16 (reference) |", "| nvfp4_ptq |", "| nvfp4_qat |"):
        assert row in md
    assert any("'nvfp4_qat': QAT with quant.linear=nvfp4_emulated, task loss, 2 steps" in n for n in rep["notes"])
    assert (out / "qat" / "nvfp4_qat" / "checkpoints" / "latest").is_file()


def test_bad_inputs(setup, tmp_path, capsys):
    base = ["eval", *(a for o in setup["overrides"] for a in ("--set", o)), "--prompt", "a red square",
            "--variant", "bf16", "--variant", "nvfp4_qat", "quant.linear=nvfp4_emulated", "qat.steps=1",
            "--out", str(tmp_path / "o")]
    missing = str(tmp_path / "nope.safetensors")
    assert main([*base, "--checkpoint", missing]) != 0
    assert "nope.safetensors: not found. Fix:" in capsys.readouterr().err
    assert not (tmp_path / "o" / "runs").exists()                          # failed before generating anything
    assert main(base) != 0
    assert "QAT variant fine-tunes the report's checkpoint; give --checkpoint" in capsys.readouterr().err
    cfg = load_config(None, [*setup["overrides"], "train.lora_rank=4"])
    with pytest.raises(ValueError, match="train.lora_rank=4"):
        qat_finetune(cfg, setup["ckpt"], QATSettings(1), str(tmp_path / "l"), progress=False)


def test_qat_run_does_not_depend_on_the_global_rng(setup, tmp_path):
    """Stochastic rounding draws from the global RNG; the fine-tune seeds it from train.seed and restores it."""
    cfg = load_config(None, [*setup["overrides"], "quant.linear=nvfp4_emulated"])
    states = []
    for i, seed in enumerate((1, 2)):
        torch.manual_seed(seed)
        expected_next = torch.rand(1)
        torch.manual_seed(seed)
        run = qat_finetune(cfg, setup["ckpt"], QATSettings(2), str(tmp_path / f"r{i}"), progress=False)
        assert torch.equal(torch.rand(1), expected_next)            # the caller's stream is untouched
        states.append(load_dit(load_config(None, setup["overrides"]), run).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
