"""Shared by tests that drive other processes: SIGKILL a training process at its first checkpoint (kill -9
resume tests); run a Triton sm90 compile script outside the interpreter (compile-report tests)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def kill_after_first_checkpoint(proc: subprocess.Popen, latest: os.PathLike, timeout: float) -> None:
    """Wait until `latest` (the checkpoint pointer) exists, then SIGKILL `proc`; fails if it finished first."""
    deadline = time.time() + timeout
    while not os.path.exists(latest) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def compile_report(script: str, timeout: float) -> dict:
    """Run `script` (Triton compiles for a GPU target, no GPU needed) in a fresh interpreter without
    TRITON_INTERPRET and return the JSON object it prints last; fails with its stderr if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
