"""How a run is launched on a cluster (`longlive slurm`): nodes, GPUs, time, partition, container."""
from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Literal

from .base import ConfigBase


@dataclasses.dataclass
class LaunchConfig(ConfigBase):
    """Cluster launch settings; the TP/SP/DP degrees come from the `parallel` section."""

    _section: ClassVar[str] = "launch"

    launcher: Literal["srun", "mpirun"] = "srun"
    """`srun`: one torchrun per node with c10d rendezvous; `mpirun`: one process per GPU, ranks from MPI."""
    job_name: str = "longlive"
    """Slurm job name."""
    nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 8
    """GPUs (= processes) per node."""
    cpus_per_task: int = 16
    """CPU cores per node-level task."""
    time: str = "04:00:00"
    """Wall-clock limit per job (HH:MM:SS or D-HH:MM:SS); the job requeues itself before it ends."""
    partition: str = ""
    """Slurm partition (empty: the cluster default)."""
    account: str = ""
    """Slurm account (empty: none)."""
    container_image: str = ""
    """Container image for pyxis/enroot `srun --container-image` (empty: run on the host)."""
    container_mounts: str = ""
    """`--container-mounts` value (e.g. /data:/data)."""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Extra environment variables exported in the job."""
    setup: list[str] = dataclasses.field(default_factory=list)
    """Shell lines run before the launch (module load, source venv/bin/activate, ...)."""
    max_restarts: int = 10
    """How many times the job may requeue itself on timeout (each restart resumes from the latest checkpoint)."""
    signal_seconds: int = 300
    """Seconds before the time limit at which Slurm signals the job to checkpoint and requeue."""
    rdzv_port: int = 29500
    """Rendezvous port on the first node."""

    def validate(self) -> None:
        for name in ("nodes", "gpus_per_node", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise self.error(name, f"must be >= 1, got {getattr(self, name)}", f"set launch.{name} >= 1")
        if not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}:\d{2}", self.time):
            raise self.error("time", f"{self.time!r} is not HH:MM:SS or D-HH:MM:SS", "write e.g. 04:00:00")
        if self.max_restarts < 0:
            raise self.error("max_restarts", f"must be >= 0, got {self.max_restarts}", "use 0 to never requeue")
