"""LoRA on TP linears (issue 5): TP=2 on 2 gloo processes equals TP=1 - the initial adapters drawn from the same
RNG state, loss and LoRA gradients over training steps, and the saved peft files (gathered) - on megatron-core's
BF16 linears; on a frozen NVFP4 base the first step (sharded NVFP4Linear: its shards quantize exactly like TP=1's
layer), the later ones and an FP8 base within the low-precision base's own effect."""
from __future__ import annotations

import pytest
import torch

from megatron_longlive.distributed.launch import spawn

from .tf_harness import CFG, H, W, assert_same, batch, make_model, noise_seed, reference_loss

pytestmark = pytest.mark.distributed

# column (q, k, v, ffn.0), row (o, ffn.2) and replicated (head.head) bases
TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o", "ffn.0",
           "ffn.2", "head.head"]
RANK, ALPHA, STEPS, LR = 4, 8.0, 3, 0.5


def _rel(actual: dict, expected: dict) -> dict[str, float]:
    """Per tensor, the relative Frobenius error."""
    assert actual.keys() == expected.keys()
    return {k: float((actual[k] - e).norm() / e.norm()) if e.norm() > 0 else float(actual[k].norm())
            for k, e in expected.items()}


def _close(actual: dict, expected: dict, what: str) -> None:
    """Elementwise to float32 summation order (assert_same)."""
    assert_same(actual, expected, what, rtol=1e-5)


def _within_its_own_effect(tp: list, ref: list, plain: list, what: str) -> list[float]:
    """TP=2 is another, equally valid low-precision run, not a bitwise copy of TP=1: an FP8 base's shards
    requantize it with their own weight scales; on an NVFP4 base, after the first update, adapters equal to float32
    summation order put some activations on the neighbouring E2M1 code. Checked against the exact (BF16-base) run:
    per step, TP=2's loss and every LoRA gradient (relative Frobenius error) are no further from it than 2x TP=1's
    distance (+ a small floor). A collective missing or doubled would move them by O(1). Measured (tiny model, 3
    SGD steps): FP8, TP=2's gradient errors are 0.79x TP=1's (median over tensors and steps), 1.31x at most; NVFP4
    (steps 2-3, AMD EPYC host) 1.00x, 1.07x at most."""
    ratios = []
    for step, ((loss, grads), (ref_loss, ref_grads), (p_loss, p_grads)) in enumerate(zip(tp, ref, plain)):
        assert abs(loss - p_loss) <= 2 * abs(ref_loss - p_loss) + 1e-4 * abs(p_loss), f"{what} step {step} loss"
        tp_err, ref_err = _rel(grads, p_grads), _rel(ref_grads, p_grads)
        for name, err in tp_err.items():
            assert err <= 2 * ref_err[name] + 1e-3, f"{what} step {step} {name}: {err:.3g} vs TP=1 {ref_err[name]:.3g}"
            ratios.append(err / max(ref_err[name], 1e-12))
    return ratios


def _seeded_lora(model) -> None:
    """Non-zero A and B (a zero B would hide wrong A gradients); the same full values on every process."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _lora_grads(model, group) -> dict[str, torch.Tensor]:
    """Gradients of the trainable (LoRA) parameters, gathered into whole tensors when TP-sharded."""
    import torch.distributed as dist

    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad.detach()
        if getattr(p, "tensor_model_parallel", False) and group is not None:
            parts = [torch.empty_like(g) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, g.contiguous(), group=group)
            g = torch.cat(parts, dim=p.partition_dim)
        out[name] = g.clone()
    return out


def _run(model, loss_of_step, group):
    """SGD on the LoRA parameters only; per step (loss, whole LoRA grads); then the peft tensors (collective)."""
    from megatron_longlive.training.lora import adapter_state_dict

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    out = []
    for step in range(STEPS):
        loss = loss_of_step(step)
        opt.zero_grad()
        loss.backward()
        out.append((loss.item(), _lora_grads(model, group)))
        opt.step()
    return out, adapter_state_dict(model)


def _tp_loss(model, groups, layout):
    from megatron_longlive.distributed.sp_teacher_forcing import frame_noise, local_tf_loss, needed_frames

    frames = needed_frames(layout, groups.sp_rank)

    def loss_of_step(step):
        latents, context, sigmas = batch(step)
        noise = frame_noise(noise_seed(step, 0), 1, CFG.in_channels, frames, H, W)
        return local_tf_loss(model, layout, groups.sp_rank, latents[:, :, frames.start:frames.stop], noise, sigmas,
                             context)
    return loss_of_step


NVFP4 = dict(linear="nvfp4_emulated", stochastic_rounding=False)   # SR draws per shard: off for an exact check
FP8 = dict(linear="fp8", fp8_recipe="channel_delayed")


def _worker(rank, world, tmp, base):
    from megatron_longlive.distributed.tensor_parallel import full_state_dict, load_full_state_dict
    from megatron_longlive.distributed.tp_lora import TPLoRALinear, apply_tp_lora
    import torch.distributed as dist

    from megatron_longlive.training.lora import adapter_state_dict, apply_lora, load_adapter, save_adapter

    from .tf_harness import setup_rank

    from megatron_longlive.config import QuantConfig
    from megatron_longlive.quant.providers import build_linear_provider

    quant = QuantConfig(**NVFP4) if base == "nvfp4" else QuantConfig(**FP8) if base == "fp8" else None
    groups, tp_model, layout = setup_rank(2, 1, quant=quant)     # TP=2 base with the reference weights
    ref = make_model(build_linear_provider(quant) if quant else None)   # TP=1, computed in this process alone
    # 1. the initial adapters: the same RNG state gives the same whole A and B at TP=1 and TP=2
    torch.manual_seed(3)
    names = apply_tp_lora(tp_model, TARGETS, RANK, ALPHA, groups.tp)
    torch.manual_seed(3)
    assert apply_lora(ref, TARGETS, RANK, ALPHA) == names
    kinds = {type(m).__name__ for n, m in tp_model.named_modules() if n in names}
    init_equal = {k: torch.equal(v, adapter_state_dict(ref)[k]) for k, v in adapter_state_dict(tp_model).items()}
    # 2. non-zero adapters, the same whole values in both; train both
    _seeded_lora(ref)
    load_full_state_dict(tp_model, ref.state_dict(), groups.tp_rank, 2)
    sharded = sorted(n for n, p in tp_model.named_parameters() if p.requires_grad
                     and getattr(p, "tensor_model_parallel", False))
    plain_steps = None
    if base in ("fp8", "nvfp4"):                     # the low-precision base's own effect, for scale: a BF16 base
        plain = make_model()
        apply_lora(plain, TARGETS, RANK, ALPHA)
        plain.load_state_dict(ref.state_dict())
        plain_steps = _run(plain, lambda step: reference_loss(plain, step), None)[0]
    ref_steps, ref_files = _run(ref, lambda step: reference_loss(ref, step), None)   # TP=1 written out directly
    tp_steps, tp_files = _run(tp_model, _tp_loss(tp_model, groups, layout), groups.tp)
    # 3. the files one rank writes (the gather is collective: every rank computes the tensors)
    if rank == 0:
        save_adapter(tp_model, f"{tmp}/tp2", TARGETS, tp_files)
        save_adapter(ref, f"{tmp}/tp1", TARGETS, ref_files)
    # 4. a TP=1 file loaded into a fresh TP=2 model (each rank keeps its shard) gives back the same tensors
    dist.barrier()
    fresh = setup_rank(2, 1, quant=quant)[1]
    apply_tp_lora(fresh, TARGETS, RANK, ALPHA, groups.tp)
    load_adapter(fresh, f"{tmp}/tp1")
    reloaded = adapter_state_dict(fresh)
    reload_equal = reloaded.keys() == ref_files.keys() and all(torch.equal(reloaded[k], ref_files[k]) for k in reloaded)
    full = full_state_dict(tp_model, groups.tp)                  # base weights stayed frozen and whole
    frozen_ok = all(torch.equal(full[k], v) for k, v in ref.state_dict().items() if ".lora_" not in k)
    return {"kinds": kinds, "init_equal": init_equal, "sharded": sharded, "ref": ref_steps, "tp": tp_steps,
            "ref_files": ref_files, "tp_files": tp_files, "plain": plain_steps, "frozen_ok": frozen_ok, "reload_equal": reload_equal,
            "is_tp_lora": isinstance(tp_model.blocks[0].self_attn.q, TPLoRALinear),
            "base_kind": type(tp_model.blocks[0].self_attn.q.base_layer).__name__}


@pytest.mark.parametrize("base", ["bf16", "nvfp4", "fp8"])
def test_tp2_lora_equals_tp1(tmp_path, base):
    from megatron_longlive.training.lora import read_adapter_files

    results = spawn(_worker, 2, str(tmp_path), base)
    ratios = []
    for rank, r in enumerate(results):
        assert r["base_kind"] == {"nvfp4": "NVFP4Linear", "fp8": "FP8Linear"}.get(base, "ColumnLinear")
        assert r["is_tp_lora"] and r["kinds"] == {"TPLoRALinear", "LoRALinear"}
        assert r["init_equal"] and all(r["init_equal"].values()), f"rank {rank}: initial adapters differ from TP=1"
        # column bases shard B, row bases shard A
        assert "blocks.0.self_attn.q.lora_B.weight" in r["sharded"] and "blocks.0.ffn.2.lora_A.weight" in r["sharded"]
        assert not any(n.startswith("head.") or n.endswith("q.lora_A.weight") for n in r["sharded"])
        assert r["frozen_ok"] and r["reload_equal"]
        if base == "fp8":
            ratios += _within_its_own_effect(r["tp"], r["ref"], r["plain"], f"rank {rank}")
            continue
        # BF16 every step, NVFP4 the first (the same adapters: its shards quantize exactly like TP=1's layer): equal to
        # float32 summation order. NVFP4 after an update: adapters equal to float32 order put some activations on the
        # neighbouring E2M1 code (measured on an AMD EPYC host: worst LoRA gradient 3.7% / 6.9% off at steps 2 / 3,
        # loss 5e-5 / 4e-4; on the earlier CI host 5 of 384 values of one gradient at step 3): another valid run
        exact_steps = 1 if base == "nvfp4" else len(r["ref"])
        for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(r["tp"][:exact_steps], r["ref"])):
            assert loss == pytest.approx(ref_loss, rel=1e-5), f"rank {rank} step {step} loss"
            _close(grads, ref_grads, f"rank {rank} step {step} LoRA grad")
        if base == "nvfp4":
            ratios += _within_its_own_effect(r["tp"][1:], r["ref"][1:], r["plain"][1:], f"rank {rank}")
        else:
            _close(r["tp_files"], r["ref_files"], f"rank {rank} adapter tensors")
    _, tp2 = read_adapter_files(str(tmp_path / "tp2"))
    _, tp1 = read_adapter_files(str(tmp_path / "tp1"))
    assert tp2.keys() == tp1.keys() and {tuple(v.shape) for v in tp2.values()} == {tuple(v.shape) for v in tp1.values()}
    if base == "bf16":
        _close(tp2, tp1, "saved adapter file")
        return
    print(f"{base}: TP=2 gradient error over TP=1's, both against the BF16 base: median",
          sorted(ratios)[len(ratios) // 2], "max", max(ratios))
    if base == "nvfp4":             # after 3 steps (measured 2.0e-3 on the AMD host): no drift, one valid run
        worst = max(_rel(tp2, tp1).values())
        assert worst < 1e-2, worst


@pytest.mark.slow  # two torchrun launches of `longlive train` (~1-3 min each on 2 busy cores)
def test_longlive_train_tp2_lora_matches_one_process(tmp_path):
    """The trainer path: TP=2 with train.lora_rank (no longer refused) == 1 process: losses, gradient norms, the
    peft adapter in the checkpoint (written by one rank from the gathered shards), and a DCP resume."""
    from megatron_longlive.training.lora import read_adapter_files

    from .tf_harness import run_longlive_train

    lora = ["train.lora_rank=4", "train.lora_alpha=8"]
    one = run_longlive_train(str(tmp_path / "tp1"), 1, *lora)
    two = run_longlive_train(str(tmp_path / "tp2"), 2, "parallel.tp_size=2", *lora)
    assert [m["step"] for m in two] == [1, 2]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    files = {name: read_adapter_files(str(tmp_path / name / "checkpoints" / "step_00000002" / "adapter"))
             for name in ("tp1", "tp2")}
    assert files["tp2"][0]["r"] == 4 and files["tp2"][1].keys() == files["tp1"][1].keys()
    assert_same(files["tp2"][1], files["tp1"][1], "adapter file")
