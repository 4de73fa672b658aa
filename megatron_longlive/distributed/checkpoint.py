"""Multi-rank DCP checkpoints that reload under a different SP / DP layout.

`training/checkpoint.py`'s `CheckpointManager` writes one DCP checkpoint atomically from one process.
`DistCheckpointManager` keeps its layout and loader, and makes the save collective: global rank 0
names the temp dir (broadcast), every rank joins `dcp.save` (DCP de-duplicates the replicated model and
optimizer tensors, so the files do not depend on the SP/DP degree), the first SP/TP rank of every DP
rank writes `trainer_rank{dp_rank}.pt`, every rank its `local_rank{rank}.pt` (FP8 amax histories, reloaded only
under the same layout), and rank 0 alone finalises (COMPLETE, rename, `latest`,
pruning) between barriers. Every rank loads (DCP reads collectively), so a checkpoint written at SP=2
resumes at SP=4 or SP=1 unchanged.

Under TP, every TP-sharded parameter (megatron's `partition_dim` attribute) and its optimizer moments
enter DCP as DTensors sharded over the TP group, so the files hold full tensors and a checkpoint written
at TP=2 loads at TP=1 or TP=2 x SP=2 (DCP reshards DTensors on read).
"""
from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from ..training.checkpoint import COMPLETE, CheckpointManager, _dcp_quiet, _fsync_tree
from ..utils.durable import fsync_path
from .grid import ProcessGroups


class DistCheckpointManager(CheckpointManager):
    """A `CheckpointManager` whose save is collective over all ranks of the grid."""

    def __init__(self, run_dir: str, keep_last: int, groups: ProcessGroups):
        self.groups = groups
        self.is_root = dist.get_rank() == 0
        if self.is_root:
            super().__init__(run_dir, keep_last, rank=groups.dp_rank)
        dist.barrier()
        if not self.is_root:
            super().__init__(run_dir, keep_last, rank=groups.dp_rank)

    def layout(self) -> dict:
        g = self.groups
        return {"world_size": dist.get_world_size(), "rank": dist.get_rank(), "dp": g.dp_rank, "sp": g.sp_rank,
                "tp": g.tp_rank, "sizes": (g.dp_size, g.sp_size, g.tp_size)}

    def local_file(self, directory: str) -> str:
        return os.path.join(directory, f"local_rank{dist.get_rank()}.pt")

    def save(self, step: int, model, optimizer, ema_state: dict | None, trainer_state: dict, save_extra=None,
             local_state: dict | None = None) -> str:
        final = self.path(step)
        names = [None]
        if self.is_root:
            for name in os.listdir(self.root):  # leftovers of crashed writes
                if name.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            names[0] = os.path.join(self.root, f".tmp-step_{step:08d}-{os.getpid()}")
            os.makedirs(names[0])
        dist.broadcast_object_list(names, src=0)
        tmp = names[0]
        _dcp_quiet(dcp.save, self._dcp_state(model, optimizer, ema_state)[0], checkpoint_id=tmp)
        if self.groups.sp_rank == 0 and self.groups.tp_rank == 0:
            torch.save(trainer_state, os.path.join(tmp, f"trainer_rank{self.groups.dp_rank}.pt"))
            if save_extra is not None and self.groups.dp_rank == 0:
                save_extra(tmp)
        self.write_local(tmp, local_state)                 # every rank: its own FP8 amax histories
        dist.barrier()
        if self.is_root:
            with open(os.path.join(tmp, COMPLETE), "w") as f:
                f.write(f"{step}\n")
            _fsync_tree(tmp)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_path(self.root)
            self._write_latest(os.path.basename(final))
            self._prune()
        dist.barrier()
        return final

    def load(self, path: str, model, optimizer, ema_state: dict | None) -> dict:
        # Decide collectively: a rank that raised alone would leave the others hanging inside dcp.load.
        have = os.path.exists(os.path.join(path, f"trainer_rank{self.groups.dp_rank}.pt"))
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, (self.groups.dp_rank, have))
        missing = sorted({dp for dp, ok in flags if not ok})
        if missing and os.path.exists(os.path.join(path, COMPLETE)):
            raise ValueError(f"{path}: no trainer state for dp_rank(s) {missing} (the checkpoint was written with "
                             f"fewer data-parallel ranks). Fix: resume with a DP degree <= the saved one.")
        self._check_complete(path)
        state, plain = self._dcp_state(model, optimizer, ema_state)
        return self._load_into(path, state, plain, model, optimizer)  # in place: DTensors share the local shards

    def _dcp_state(self, model, optimizer, ema_state: dict | None) -> tuple[dict, dict]:
        """(state for DCP with TP shards as DTensors, the same state with plain local tensors)."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        plain = {"model": model_sd, "optim": optim_sd}
        if ema_state is not None:
            plain["ema"] = ema_state
        if self.groups.tp is None:
            return plain, plain
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = DeviceMesh.from_group(self.groups.tp, self.groups.device.type)
        dims = {name: p.partition_dim for name, p in model.named_parameters()
                if getattr(p, "tensor_model_parallel", False)}

        def shard(name, t):
            if name not in dims or not isinstance(t, torch.Tensor) or t.ndim == 0:
                return t
            return DTensor.from_local(t, mesh, [Shard(dims[name])], run_check=False)

        state = {"model": {k: shard(k, v) for k, v in model_sd.items()},
                 "optim": {"state": {k: {n: shard(k, t) for n, t in v.items()} for k, v in optim_sd["state"].items()},
                           "param_groups": optim_sd["param_groups"]}}
        if ema_state is not None:
            state["ema"] = {k: shard(k, v) for k, v in ema_state.items()}
        return state, plain
