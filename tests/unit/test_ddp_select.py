"""parallel.ddp_impl: which gradient reduction a run uses (megatron-core DDP on CUDA, ours elsewhere) and its errors."""
from __future__ import annotations

import pytest

from megatron_longlive.config import build_config
from megatron_longlive.config.base import ConfigError
from megatron_longlive.distributed.mcore_ddp import resolve_ddp_impl


@pytest.mark.parametrize("impl,device,expected", [("auto", "cuda", "mcore"), ("auto", "cpu", "native"),
                                                  ("native", "cuda", "native"), ("native", "cpu", "native"),
                                                  ("mcore", "cuda", "mcore")])
def test_resolve(impl, device, expected):
    assert resolve_ddp_impl(impl, device) == expected


def test_mcore_on_cpu_and_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match=r"ddp_impl=mcore on cpu.*Fix: parallel.ddp_impl=auto or native"):
        resolve_ddp_impl("mcore", "cpu")
    with pytest.raises(ValueError, match="unknown"):
        resolve_ddp_impl("torch", "cuda")


def test_config_fields():
    cfg = build_config({"parallel": {"ddp_impl": "native", "ddp_bucket_size": 1000, "ddp_overlap_grad_reduce": False}})
    assert (cfg.parallel.ddp_impl, cfg.parallel.ddp_bucket_size, cfg.parallel.ddp_overlap_grad_reduce) == (
        "native", 1000, False)
    assert build_config({}).parallel.ddp_impl == "auto"
    with pytest.raises(ConfigError, match="parallel.ddp_bucket_size"):
        build_config({"parallel": {"ddp_bucket_size": -1}})
    with pytest.raises((ConfigError, ValueError), match="ddp_impl"):
        build_config({"parallel": {"ddp_impl": "fsdp"}})
