"""Shared by the kill -9 resume tests: SIGKILL a training process as soon as its first checkpoint exists."""
from __future__ import annotations

import os
import signal
import subprocess
import time


def kill_after_first_checkpoint(proc: subprocess.Popen, latest: os.PathLike, timeout: float) -> None:
    """Wait until `latest` (the checkpoint pointer) exists, then SIGKILL `proc`; fails if it finished first."""
    deadline = time.time() + timeout
    while not os.path.exists(latest) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
