"""Top device kernels of one call, from the PyTorch profiler (shared by the bench scripts' --profile)."""
from __future__ import annotations

from typing import Callable

import torch


def top_kernels(fn: Callable[[], object], device: torch.device, n: int | None = 15) -> list[tuple[str, float, int]]:
    """(kernel name, ms, calls) of the n (None: all) most expensive device kernels of one `fn()` (CPU ops on a
    CPU: self time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for e in prof.key_averages():
        if cuda and e.device_type.name != "CUDA":
            continue
        rows.append((e.key, (e.device_time_total if cuda else e.self_cpu_time_total) / 1e3, e.count))
    return sorted(rows, key=lambda r: -r[1])[:n]


def matching_ms(rows: list[tuple[str, float, int]], pattern: str) -> float:
    """Total ms of the `top_kernels(..., n=None)` rows whose name matches the regex `pattern` (case-insensitive)."""
    import re

    return sum(ms for name, ms, _ in rows if re.search(pattern, name, re.IGNORECASE))


def print_kernels(title: str, rows: list[tuple[str, float, int]], total_ms: float | None = None) -> None:
    print(f"  top kernels, {title}" + (f" ({total_ms:.1f} ms in all)" if total_ms is not None else ""))
    for key, ms, calls in rows:
        print(f"    {ms:9.2f} ms {calls:6d}x  {key[:110]}")
