"""Model + prompts mode of `longlive eval`: generate variants with the streaming pipeline, compare to the first."""
from __future__ import annotations

import json
import math

import pytest
import torch

pipeline = pytest.importorskip("megatron_longlive.inference.pipeline")

from megatron_longlive.cli.main import main  # noqa: E402
from megatron_longlive.eval.variants import parse_variant  # noqa: E402

BASE = ["model.preset=tiny", "infer.num_chunks=3", "infer.height=32", "infer.width=32",
        "infer.denoising_steps=[1000,500]"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Tiny DiT weights with a non-zero head (Wan's init zeroes it, which makes every sampler output the noise)."""
    from safetensors.torch import save_file

    from megatron_longlive.config import preset_config
    from megatron_longlive.models.wan import WanDiT

    torch.manual_seed(0)
    model = WanDiT(preset_config("tiny"))
    model.init_weights()
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_parse_variant():
    v = parse_variant(["steps2", "infer.denoising_steps=[1000,500]"])
    assert v.label == "steps2" and v.overrides == ("infer.denoising_steps=[1000,500]",)
    with pytest.raises(ValueError, match="first word is the run's label"):
        parse_variant(["infer.seed=1"])
    with pytest.raises(ValueError, match="not section.key=value"):
        parse_variant(["x", "infer.seed"])


def test_generate_and_compare_variants(tmp_path, checkpoint):
    out = tmp_path / "fid"
    args = ["eval", "--checkpoint", checkpoint, *(a for o in BASE for a in ("--set", o)),
            "--prompt", "a red square slides right@0", "--prompt", "a blue circle moves down@2",
            "--variant", "ref", "--variant", "same", "--variant", "steps1", "infer.denoising_steps=[1000]",
            "--metrics", "flicker,shot_consistency,latent_drift", "--out", str(out), "--no-plots"]
    assert main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["notes"]) == 1 and "variant 'same' produced exactly the reference's latents" in rep["notes"][0]
    assert "**Notes**" in (out / "report.md").read_text()
    rows = {r["run"]: r for r in rep["fidelity"]}
    assert rep["reference"] == "ref" and set(rows) == {"same", "steps1"}
    assert rows["same"]["psnr"] == "inf" and rows["same"]["latent_mse"] == 0.0
    assert rows["steps1"]["latent_mse"] > 0 and rows["steps1"]["psnr"] != "inf"
    for label in ("ref", "same", "steps1"):
        assert (out / "runs" / f"{label}.mp4").is_file() and (out / "runs" / f"{label}.pt").is_file()
    ref = rep["videos"]["ref"]
    assert ref["sources"]["frames"] == "9"  # 3 latent frames -> 1 + 4 * 2 pixel frames
    # the prompt switch at chunk 2 (latent frame 2) starts at pixel frame 5
    assert ref["metrics"]["shot_consistency"]["stats"]["num_switches"] == 1
    assert math.isnan(ref["metrics"]["flicker"]["series"][4] or math.nan)  # pair (4, 5) spans the cut
    # the saved latent dump is what the report compared
    z = torch.load(out / "runs" / "steps1.pt", weights_only=True)["latents"]
    zr = torch.load(out / "runs" / "ref.pt", weights_only=True)["latents"]
    assert rows["steps1"]["latent_mse"] == pytest.approx(float(((z.double() - zr.double()) ** 2).mean()), rel=1e-6)
