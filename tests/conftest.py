"""Shared fixtures: the tiny-config tester of STYLE.md §5 (2 layers, 2 heads, 16x16 latents, few frames)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU every Triton kernel runs in the interpreter. The variable must be set before any kernel
# module is imported (the @triton.jit decorator reads it), and tests of several modules import kernels,
# so it is set once for the whole session here. GPU-compile tests strip it in their own subprocesses.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_cfg():
    from megatron_longlive.config import preset_config

    return preset_config("tiny")


@pytest.fixture
def tiny_model(tiny_cfg):
    """A tiny WanDiT with Wan's init and a non-zero head (zero heads hide bugs)."""
    from megatron_longlive.models.wan import WanDiT

    torch.manual_seed(0)
    model = WanDiT(tiny_cfg)
    model.init_weights()
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared 2-core machine two threads run tiny steps ~6x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
