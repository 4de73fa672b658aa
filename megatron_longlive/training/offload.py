"""Activation offload: keep the checkpointed blocks' hidden-state inputs in (pinned) host memory.

With activation checkpointing (`trainer.apply_activation_checkpointing`) a block keeps only its inputs
from the forward; the residual stream x [B, S, D] is the one that is unique per block (the time
projection, RoPE tables and text K/V are shared by all blocks or held outside them). For Wan2.1-1.3B at
21 latent frames 480x832 that is 30 x [1, 65520, 1536] bf16 = 5.6 GiB of GPU memory held from the
forward to the backward. `BlockInputOffload` moves exactly those tensors to host memory:

  forward:  the checkpoint saves its inputs under `saving(x)` (a `saved_tensors_hooks` context that is
            active only while `torch.utils.checkpoint` records the block's inputs; the block's own saved
            tensors go through the checkpoint's hook, not this one). x is copied device-to-host into a
            pinned buffer on a side stream, so the copy overlaps the next block's forward.
  backward: the block's recompute unpacks x: it is copied back (host-to-device on the side stream; the
            compute stream waits on an event), and the input of the block before it in forward order,
            which autograd recomputes next, is prefetched while this block's backward runs.

Values are copied bit for bit, so losses and gradients equal the run without offload exactly. On the CPU
the same path runs with plain host copies (no memory is saved; it exists so tests cover the mechanism).
"""
from __future__ import annotations

import contextlib
import weakref

import torch


class _Offloaded:
    """One block input in host memory (`host`) and, while prefetched / restored, on its device (`restored`)."""

    __slots__ = ("owner", "device", "host", "restored", "event", "__weakref__")

    def __init__(self, owner: "BlockInputOffload", t: torch.Tensor):
        self.owner, self.device, self.restored, self.event = owner, t.device, None, None
        t = t.detach()
        if t.is_cuda:
            stream = owner.stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))   # x is complete on the compute stream
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)   # (torch's save_on_cpu does the same)
            with torch.cuda.stream(stream):
                self.host.copy_(t, non_blocking=True)
            t.record_stream(stream)                                    # x's memory is reused only after the copy
        else:
            self.host = t.clone()

    def prefetch(self) -> None:
        """Start the host-to-device copy (no-op when already started)."""
        if self.restored is not None:
            return
        if self.device.type != "cuda":
            self.restored = self.host.clone()
            return
        stream = self.owner.stream(self.device)
        with torch.cuda.stream(stream):
            self.restored = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
            self.restored.copy_(self.host, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def load(self) -> torch.Tensor:
        """The tensor on its device, ready on the current stream; prefetches the previous block's input."""
        self.prefetch()
        out, self.restored = self.restored, None
        if self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.event)
            out.record_stream(current)       # allocated on the side stream, used and freed on the compute stream
        self.owner.prefetch_before(self)
        self.owner.restored_bytes += out.numel() * out.element_size()
        return out


class BlockInputOffload:
    """Offloads the hidden-state input of every checkpointed block (see the module docstring).

    Counters (host-side, for tests and benchmarks): `offloaded_bytes` / `restored_bytes` since the last
    `reset_counters()`.
    """

    def __init__(self):
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._entries: list[weakref.ReferenceType[_Offloaded]] = []  # forward order; dead ones are pruned
        self.reset_counters()

    def reset_counters(self) -> None:
        self.offloaded_bytes = 0
        self.restored_bytes = 0

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, t: torch.Tensor) -> _Offloaded:
        entry = _Offloaded(self, t)
        self._entries = [r for r in self._entries if r() is not None] + [weakref.ref(entry)]
        self.offloaded_bytes += t.numel() * t.element_size()
        return entry

    def prefetch_before(self, entry: _Offloaded) -> None:
        """Prefetch the live entry saved just before `entry` (the block autograd recomputes next)."""
        alive = [e for e in (r() for r in self._entries) if e is not None]
        i = next((k for k, e in enumerate(alive) if e is entry), 0)
        if i > 0:
            alive[i - 1].prefetch()

    @contextlib.contextmanager
    def saving(self, x: torch.Tensor):
        """Context around one `torch.utils.checkpoint.checkpoint` call whose hidden-state input is `x`: the
        saved copy of `x` goes to host memory; every other saved input (shared tables) is kept as is."""

        # Identify x by address, shape and dtype, never by reference: autograd keeps this hook alive with every
        # tensor it saved (until the backward), and a closure over x would keep x on the GPU all that time.
        key = (x.data_ptr(), x.shape, x.dtype)

        def pack(t: torch.Tensor):
            if (t.data_ptr(), t.shape, t.dtype) == key:
                with torch.no_grad():
                    return self._pack(t)
            return t

        def unpack(p):
            return p.load() if isinstance(p, _Offloaded) else p

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
