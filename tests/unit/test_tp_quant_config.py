"""Which precisions tensor parallelism combines with (distributed/strategy.check_tp_quant): bf16, fp8 and
nvfp4_emulated, full fine-tunes and LoRA, pass; TE's own linears and a packed NVFP4 base are refused before any
model is built, each naming the setting and the fix. (The TP FP8 arithmetic itself:
tests/distributed/test_fp8_tp.py.)"""
from __future__ import annotations

import pytest

from megatron_longlive.config import build_config
from megatron_longlive.distributed.strategy import check_tp_quant


def _cfg(tp=2, lora=0, **quant):
    return build_config({"parallel": {"tp_size": tp}, "quant": quant, "train": {"lora_rank": lora}})


@pytest.mark.parametrize("quant,lora", [({"linear": "bf16"}, 0), ({"linear": "bf16"}, 4), ({"linear": "fp8"}, 0),
                                        ({"linear": "fp8"}, 4), ({"linear": "nvfp4_emulated"}, 0),
                                        ({"linear": "nvfp4_emulated"}, 4)])
def test_supported_tp_precisions_pass(quant, lora):
    check_tp_quant(_cfg(lora=lora, **quant))


@pytest.mark.parametrize("quant,lora,why", [
    ({"linear": "te_nvfp4"}, 0, "Transformer Engine's own linears"),
    ({"linear": "nvfp4_emulated", "packed_base": True}, 4, "packs a frozen base")])
def test_unsupported_tp_precisions_are_refused_with_the_fix(quant, lora, why):
    with pytest.raises(ValueError, match=f"parallel.tp_size=2 .*{why}.*Fix: tp_size=1"):
        check_tp_quant(_cfg(lora=lora, **quant))
    check_tp_quant(_cfg(tp=1, lora=lora, **quant))                    # without TP each is fine here
