"""Spawn helper for distributed tests and CPU demos: real processes on gloo, a free TCP port.

`spawn(fn, world_size, *args)` starts `world_size` processes, each running
`fn(rank, world_size, *args)` with the torch.distributed env (MASTER_ADDR/PORT, RANK, WORLD_SIZE,
LOCAL_RANK) set, and returns the list of their return values (rank order). A failing rank raises
`RuntimeError` in the caller with that rank's traceback. Processes are forked when the platform
allows it (the parent's imports, megatron-core included, are inherited, so start-up is fast);
the workers must not touch CUDA.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable

import torch


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    try:
        torch.set_num_threads(1)
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(result, buf)  # bytes, not shared-memory handles that die with this process
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # report every failure to the parent, then exit non-zero
        queue.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, *args, timeout: float = 300.0) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` processes; return their results by rank."""
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, queue), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors[rank] = value
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise RuntimeError(f"ranks {missing} exited without a result")
    return [results[r] for r in range(world_size)]
