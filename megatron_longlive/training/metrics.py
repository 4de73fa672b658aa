"""Training metrics: a plain `metrics.jsonl` (one JSON object per logged step) and optional wandb.

wandb runs offline by default (no network); `disabled` never imports wandb and writes no wandb files.
On resume, lines for steps after the restored checkpoint are dropped, so the file always reads as
one uninterrupted run.
"""
from __future__ import annotations

import json
import os


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl file (ignores a torn last line from a killed process)."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class MetricsLogger:
    """Append step metrics to `<run_dir>/metrics.jsonl` and (unless disabled) to wandb."""

    def __init__(self, run_dir: str, wandb_mode: str = "offline", config: dict | None = None,
                 resume_step: int = 0, project: str = "megatron_longlive", enabled: bool = True):
        self.enabled, self.wandb = enabled, None
        if not enabled:  # non-logging ranks of a multi-rank run
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.file = open(self.path, "a")
        if wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=project, dir=run_dir, mode=wandb_mode, config=config,
                                    resume="allow", id=_run_id(run_dir))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _run_id(run_dir: str) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    path = os.path.join(run_dir, "wandb_run_id")
    if os.path.exists(path):
        return open(path).read().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    with open(path, "w") as f:
        f.write(rid)
    return rid
