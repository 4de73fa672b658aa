"""Durable writes: fsync a file or a directory so a rename that follows survives a crash."""
from __future__ import annotations

import os


def fsync_path(path: str) -> None:
    """fsync a file or directory by path (directories too: that makes a rename inside them durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
