"""Append benchmark figures to bench/results.jsonl (one JSON line per figure) — shared by every bench script.

Fields: name (says the setting, e.g. "wan2.1-1.3b 480p 4-step dit fps"), device (GPU name or "cpu"),
metric, value, unit, command (how to reproduce), date (UTC ISO).
"""
from __future__ import annotations

import datetime
import json
import os
import shlex
import sys


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def record(path: str | None, name: str, metric: str, value: float, unit: str, **extra) -> dict:
    """Build one result row and append it to `path` (if given). Returns the row."""
    row = {"name": name, "device": device_name(), "metric": metric, "value": value, "unit": unit,
           "command": command_line(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    row.update(extra)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row
