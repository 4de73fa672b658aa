"""bench/bench_distill_step.py at the tiny scale on CPU, and device placement of the DMD step on a stand-in device.

The GPU failure of issue 11 (a CPU tensor meeting CUDA tensors inside the DMD step) is reproduced without a GPU
on the `meta` device: like CUDA, meta refuses to mix with non-scalar CPU tensors, but it computes nothing, so
`.item()` / `bool()` (the loss logging and the packer's finiteness check) are answered with placeholders there.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import bench_distill_step as bench
from megatron_longlive.training import dmd

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "tiny", "--height", "32", "--width", "32", "--chunk-frames", "2", "--rollout-frames", "4",
        "--critic-ratio", "1", "--rank", "4", "--steps", "1", "--warmup", "0"]


def test_bench_runs_both_bases_on_cpu_and_records_them(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert bench.main([*TINY, "--device", "cpu", "--base", "bf16", "nvfp4", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "bf16" in table and "nvfp4" in table
    rows = [json.loads(line) for line in open(out)]
    assert [(r["name"].split()[-4], r["metric"]) for r in rows] == [
        ("bf16", "step_time"), ("bf16", "peak_memory"), ("nvfp4", "step_time"), ("nvfp4", "peak_memory")]
    assert all(r["value"] > 0 for r in rows if r["metric"] == "step_time")
    weights = {r["name"].split()[-4]: r["base_weights_gib"] for r in rows if r["metric"] == "peak_memory"}
    assert weights["nvfp4"] < 0.6 * weights["bf16"]     # packed linears (fp32 on CPU -> 4.5 bits/value)


def test_bench_cli_keeps_the_old_spelling():
    assert bench.parse_args(["--bases", "nvfp4"]).bases == ["nvfp4"]
    assert bench.parse_args(["--base", "bf16", "nvfp4"]).bases == ["bf16", "nvfp4"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--base", "fp8"])
    with pytest.raises(SystemExit):       # offload needs checkpointing, as train.offload_activations does
        bench.parse_args(["--offload-activations"])


@pytest.mark.parametrize("base,init,ac", [("nvfp4", "direct", True), ("bf16", "standalone", False),
                                         ("bf16", "direct", "offload")])
def test_dmd_step_keeps_every_tensor_on_the_model_device(monkeypatch, base, init, ac):
    """A CPU tensor meeting a device tensor anywhere in a critic + generator step raises on `meta` as on CUDA."""
    item, to_bool = torch.Tensor.item, torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "item", lambda t: 0.5 if t.device.type == "meta" else item(t))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: True if t.device.type == "meta" else to_bool(t))
    ac_flag = ["--activation-checkpointing"] if ac else []
    ac_flag += ["--offload-activations"] if ac == "offload" else []
    args = bench.parse_args([*TINY, "--device", "meta", "--init", init, *ac_flag])
    d = bench.build_distiller(args, base)
    m = d.train_step()
    assert math.isfinite(m["generator_loss"])
    assert all(p.device.type == "meta" for p in d.gen_params + d.critic_params)
    assert all(b.forward.__name__ == "ckpt_forward" for b in d.model.blocks) == bool(ac)   # via train.* in the cfg
    assert (d.offload is not None) == (ac == "offload")
    assert all(t.device.type == "meta" for t in d.model.state_dict().values())
    x = dmd.sample(d.model, d.prompts, [0], [1000, 500], 2, 4, (4, 4), adapter="generator")  # CPU seeds + prompts
    assert x.device.type == "meta"


def test_bench_step_moves_the_generator():
    """The bench's random model must give a non-zero DMD gradient (Wan's init zeroes the head, which made every
    score 0 and the generator never move): one step changes the generator adapters."""
    d = bench.build_distiller(bench.parse_args([*TINY, "--device", "cpu"]), "bf16")
    before = [p.detach().clone() for p in d.gen_params]
    m = d.train_step()
    assert m["dmd_grad_norm"] > 0 and m["gen_grad_norm"] > 0
    assert any(not torch.equal(p, q) for p, q in zip(d.gen_params, before))
