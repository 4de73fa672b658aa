"""The parallel grid: world = TP x SP x DP, built once from megatron-core and passed explicitly.

`init_grid(tp_size, sp_size, num_heads)` discovers the launch (torchrun env, Slurm `srun`, or
`mpirun` through mpi4py), initialises torch.distributed (nccl with CUDA, gloo otherwise), validates
the degrees, lets megatron-core's `parallel_state.initialize_model_parallel` build the groups (SP is
megatron-core's context-parallel axis; rank order tp-cp-dp) and returns a small `ProcessGroups`.
Only the modules that need a group keep it (STYLE.md §1); nothing reads globals afterwards.
"""
from __future__ import annotations

import dataclasses
import os
import re
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job, as told by the launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"


@dataclasses.dataclass
class ProcessGroups:
    """The groups of one rank. `None` groups mean "size 1, no communication needed"."""

    rank: int
    world_size: int
    tp_size: int
    sp_size: int
    dp_size: int
    tp_rank: int
    sp_rank: int
    dp_rank: int
    tp: dist.ProcessGroup | None
    sp: dist.ProcessGroup | None
    dp: dist.ProcessGroup | None
    dp_sp: dist.ProcessGroup | None
    """Data x sequence parallel group: every rank holding the same TP shard (gradient reduction)."""
    backend: str
    device: torch.device


def validate_degrees(world_size: int, tp_size: int, sp_size: int, num_heads: int) -> int:
    """Check the degrees against the world size and the head count; return the DP degree."""
    for name, size in (("tp_size", tp_size), ("sp_size", sp_size)):
        if size < 1:
            raise ValueError(f"parallel.{name}={size} must be >= 1. Fix: set parallel.{name} to 1 or more.")
        if num_heads % size:
            raise ValueError(f"parallel.{name}: {name}={size} must divide num_heads={num_heads}. "
                             f"Fix: choose a divisor of {num_heads}.")
    if (num_heads // tp_size) % sp_size:
        raise ValueError(f"parallel.sp_size: sp_size={sp_size} must divide the {num_heads // tp_size} heads left on "
                         f"each rank by tp_size={tp_size} (Ulysses splits heads after TP). "
                         f"Fix: make tp_size * sp_size a divisor of num_heads={num_heads}.")
    if world_size % (tp_size * sp_size):
        raise ValueError(f"world_size={world_size} is not divisible by tp_size*sp_size={tp_size * sp_size}. "
                         f"Fix: launch a multiple of {tp_size * sp_size} processes or change parallel.tp_size/sp_size.")
    return world_size // (tp_size * sp_size)


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist such as 'gpu[03-05,7],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def discover_launch(env: dict | None = None) -> LaunchInfo:
    """Read rank/world from torchrun, MPI (mpi4py, optional) or Slurm, in that order."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    slurm = "SLURM_PROCID" in env and "SLURM_NTASKS" in env
    # OpenMPI's mpirun inside a Slurm job: its ranks inherit the batch step's SLURM_PROCID=0, so it wins over Slurm;
    # PMI_SIZE / PMIX_RANK are also set by srun's MPI plugins, so they count only outside Slurm
    if "OMPI_COMM_WORLD_SIZE" in env or (not slurm and any(k in env for k in ("PMI_SIZE", "PMIX_RANK"))):
        try:
            from mpi4py import MPI
        except ImportError:
            raise ValueError("launched by mpirun but mpi4py is not installed. "
                             "Fix: pip install mpi4py (extra 'mpi'), or launch with torchrun/srun.") from None
        comm = MPI.COMM_WORLD
        addr = comm.bcast(env.get("MASTER_ADDR") or (os.uname().nodename if comm.rank == 0 else None), root=0)
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", 0)))
        return LaunchInfo(comm.rank, comm.size, local, addr, port, "mpi")
    if slurm:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_STEP_NODELIST")
                                                           or env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                          addr, port, "slurm")
    return LaunchInfo(0, 1, 0, "127.0.0.1", port, "single")


def _group_or_none(group, size: int):
    return group if size > 1 else None


def init_grid(tp_size: int = 1, sp_size: int = 1, num_heads: int | None = None, backend: str = "auto",
              timeout_minutes: int = 30) -> ProcessGroups:
    """Initialise torch.distributed (if needed) and megatron-core's groups; return this rank's groups."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        info = discover_launch()
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://{info.master_addr}:{info.master_port}",
                                rank=info.rank, world_size=info.world_size,
                                timeout=timedelta(minutes=timeout_minutes))
    backend = dist.get_backend()
    world = dist.get_world_size()
    dp_size = validate_degrees(world, tp_size, sp_size, num_heads if num_heads is not None else tp_size * sp_size)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp_size, context_parallel_size=sp_size,
                                 create_gloo_process_groups=backend != "gloo",
                                 distributed_timeout_minutes=timeout_minutes)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return ProcessGroups(
        rank=dist.get_rank(), world_size=world, tp_size=tp_size, sp_size=sp_size, dp_size=dp_size,
        tp_rank=ps.get_tensor_model_parallel_rank(), sp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp=_group_or_none(ps.get_tensor_model_parallel_group(), tp_size),
        sp=_group_or_none(ps.get_context_parallel_group(), sp_size),
        dp=_group_or_none(ps.get_data_parallel_group(), dp_size),
        dp_sp=_group_or_none(ps.get_data_parallel_group(with_context_parallel=True), dp_size * sp_size),
        backend=backend, device=device)


def destroy_grid() -> None:
    """Tear down megatron-core's groups and the default group (tests, end of a run)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
