"""Atomic, resumable training checkpoints in torch.distributed.checkpoint (DCP) format.

Layout under `<run_dir>/checkpoints/`:
  step_00000100/            a complete checkpoint
    .metadata, *.distcp     DCP: model, optimizer, EMA (tensors; sharded the same way by later SP/TP/DP runs)
    trainer_rank0.pt        step, scheduler, data-loader position, RNG states (torch, numpy, python, CUDA, noise)
    local_rank0.pt          state each process keeps of its own (the FP8 amax histories: quant/fp8_state.py),
                            stamped with the parallel layout it holds for (one file per global rank)
    adapter/                peft LoRA files (LoRA runs only)
    COMPLETE                written and fsynced last
  latest                    name of the newest complete checkpoint, replaced atomically after the rename
  .tmp-step_00000100-<pid>  a write in progress; never loaded, removed by the next save

A save writes everything into the temp dir, fsyncs files and the dir, renames it to its final name,
fsyncs the parent, then updates `latest`. A checkpoint counts only with its COMPLETE marker, so a
crash at any point leaves the previous checkpoint as the one resumed from. DCP runs in a single
process without `init_process_group`.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..utils.durable import fsync_path

COMPLETE = "COMPLETE"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")




def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG the training loop may touch."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        generator.set_state(state["generator"])


def local_state(model) -> dict | None:
    """What a process keeps of its own for a bit-identical resume: the model's FP8 amax histories, if any."""
    from ..quant.fp8_state import delayed_scale_state

    scales = delayed_scale_state(model)
    return None if scales is None else {"fp8_amax_histories": scales}


def restore_local_state(model, manager: "CheckpointManager", path: str) -> None:
    """Put local_state() back from checkpoint `path` (nothing to do when it has none: the histories then start
    from the first step's amaxes, as in a fresh run)."""
    from ..quant.fp8_state import load_delayed_scale_state

    state = manager.load_local(path) or {}
    if "fp8_amax_histories" in state:
        load_delayed_scale_state(model, state["fp8_amax_histories"], where=path)


def _dcp_quiet(fn, *args, **kwargs):
    # Single-process DCP warns that no process group exists; that is the intended mode here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, **kwargs)


class CheckpointManager:
    """Save / find / load checkpoints of one run directory (single process now; rank-aware file names)."""

    def __init__(self, run_dir: str, keep_last: int = 3, rank: int = 0, trainable_only: bool = False):
        """trainable_only: the model part holds only parameters that require grad (e.g. LoRA adapters on a frozen
        base, which is not written; buffers neither) and is loaded non-strictly; `optimizer` may be a list."""
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep_last, self.rank, self.trainable_only = keep_last, rank, trainable_only
        os.makedirs(self.root, exist_ok=True)

    def _model_optim_state(self, model, optimizer) -> tuple[dict, dict]:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        if self.trainable_only:
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            model_sd = {k: v for k, v in model_sd.items() if k in trainable}
        return model_sd, optim_sd

    # ----- discovery ------------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        steps = []
        for name in os.listdir(self.root):
            m = _STEP_DIR.match(name)
            if m and os.path.exists(os.path.join(self.root, name, COMPLETE)):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:08d}")

    def latest(self) -> str | None:
        """The newest complete checkpoint: the `latest` pointer if it names a complete one, else a scan."""
        pointer = os.path.join(self.root, LATEST)
        if os.path.exists(pointer):
            name = open(pointer).read().strip()
            if _STEP_DIR.match(name) and os.path.exists(os.path.join(self.root, name, COMPLETE)):
                return os.path.join(self.root, name)
        steps = self.complete_steps()
        return self.path(steps[-1]) if steps else None

    # ----- save -----------------------------------------------------------------------------------
    # ----- per-process state ----------------------------------------------------------------------
    def layout(self) -> dict:
        """The parallel layout a local state belongs to (one process here)."""
        return {"world_size": 1}

    def local_file(self, directory: str) -> str:
        return os.path.join(directory, "local_rank0.pt")

    def write_local(self, directory: str, local_state: dict | None) -> None:
        if local_state is not None:
            torch.save({"layout": self.layout(), "state": local_state}, self.local_file(directory))

    def load_local(self, path: str) -> dict | None:
        """This process's local state from checkpoint `path`; None when there is none or it was written under
        another parallel layout (each rank's FP8 amaxes describe its own tokens and shards: they start afresh)."""
        f = self.local_file(path)
        if not os.path.exists(f):
            return None
        blob = torch.load(f, weights_only=False)
        if blob["layout"] != self.layout():
            warnings.warn(f"{path}: local state written under layout {blob['layout']}, this run is "
                          f"{self.layout()}: FP8 amax histories start afresh (the resume is not bit-identical)")
            return None
        return blob["state"]

    def save(self, step: int, model, optimizer, ema_state: dict | None, trainer_state: dict,
             save_extra=None, local_state: dict | None = None) -> str:
        """Write checkpoint `step` atomically. save_extra(dir) may add files (e.g. LoRA adapters);
        local_state: this process's own state (local_rank0.pt)."""
        final = self.path(step)
        for name in os.listdir(self.root):  # leftovers of crashed writes
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        tmp = os.path.join(self.root, f".tmp-step_{step:08d}-{os.getpid()}")
        os.makedirs(tmp)
        model_sd, optim_sd = self._model_optim_state(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if ema_state is not None:
            state["ema"] = ema_state
        _dcp_quiet(dcp.save, state, checkpoint_id=tmp)
        torch.save(trainer_state, os.path.join(tmp, f"trainer_rank{self.rank}.pt"))
        self.write_local(tmp, local_state)
        if save_extra is not None:
            save_extra(tmp)
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(f"{step}\n")
        _fsync_tree(tmp)
        if os.path.exists(final):  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(self.root)
        self._write_latest(os.path.basename(final))
        self._prune()
        return final

    def _write_latest(self, name: str) -> None:
        tmp = os.path.join(self.root, f".latest-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.root, LATEST))
        fsync_path(self.root)

    def _prune(self) -> None:
        for step in self.complete_steps()[:-self.keep_last]:
            shutil.rmtree(self.path(step), ignore_errors=True)

    # ----- load -----------------------------------------------------------------------------------
    def load(self, path: str, model, optimizer, ema_state: dict | None) -> dict:
        """Restore model / optimizer / EMA in place from `path`; return the trainer state dict."""
        self._check_complete(path)
        model_sd, optim_sd = self._model_optim_state(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if ema_state is not None:
            state["ema"] = ema_state
        return self._load_into(path, state, state, model, optimizer)

    @staticmethod
    def _check_complete(path: str) -> None:
        if not os.path.exists(os.path.join(path, COMPLETE)):
            raise ValueError(f"{path}: checkpoint has no {COMPLETE} marker (an interrupted write). "
                             f"Fix: resume from another checkpoint or delete this directory.")

    def _load_into(self, path: str, state: dict, plain: dict, model, optimizer) -> dict:
        """DCP-load `state` in place, push `plain` (the same tensors as local ones) into model and optimizer,
        return this rank's trainer state."""
        try:
            _dcp_quiet(dcp.load, state, checkpoint_id=path)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - re-raised with the path and a fix
            raise ValueError(f"{path}: cannot load into this model/optimizer ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}). Fix: resume with the config the "
                             f"checkpoint was written with (model, train.lora_rank, train.ema_decay, distill.rank).") from e
        set_state_dict(model, optimizer, model_state_dict=plain["model"], optim_state_dict=plain["optim"],
                       options=StateDictOptions(strict=not self.trainable_only))
        return torch.load(os.path.join(path, f"trainer_rank{self.rank}.pt"), weights_only=False)
