"""Render a Slurm batch script for `longlive train` from a resolved run config.

The run directory receives: `config.yaml` (the resolved config, so the job never depends on the file it
was made from), `code_version.txt` (git commit, branch and dirty state) plus `code.diff` when the tree has
uncommitted changes, and `job.sbatch`. Rendering is deterministic (no timestamps), so golden-file tests
pin the output.
"""
from __future__ import annotations

import os
import shlex
import string
import subprocess
from importlib import resources

from ..config import RunConfig
from ..config.base import ConfigError


def _template() -> string.Template:
    text = resources.files("megatron_longlive.launch").joinpath("templates/srun.sbatch").read_text()
    return string.Template(text)


def train_module_args(run_dir: str) -> str:
    """Arguments after `python` / `torchrun` for one training process (resumes when a checkpoint exists)."""
    return f"-m megatron_longlive.cli.main train --config {shlex.quote(run_dir + '/config.yaml')} --resume"


def launch_command(cfg: RunConfig, run_dir: str) -> str:
    lc = cfg.launch
    container = ""
    if lc.container_image:
        container = f" --container-image={shlex.quote(lc.container_image)}"
        if lc.container_mounts:
            container += f" --container-mounts={shlex.quote(lc.container_mounts)}"
    if lc.launcher == "mpirun":
        world = lc.nodes * lc.gpus_per_node
        return (f"mpirun -np {world} --map-by ppr:{lc.gpus_per_node}:node -x MASTER_ADDR -x MASTER_PORT "
                f"python {train_module_args(run_dir)}")
    torchrun = (f"python -m torch.distributed.run --nnodes=\"$SLURM_NNODES\" --nproc-per-node={lc.gpus_per_node} "
                f"--rdzv-backend=c10d --rdzv-endpoint=\"$MASTER_ADDR:$MASTER_PORT\" --rdzv-id=\"$SLURM_JOB_ID\" "
                f"{train_module_args(run_dir)}")
    return f"srun --kill-on-bad-exit=1 --ntasks-per-node=1{container} {torchrun}"


def check_layout(cfg: RunConfig) -> tuple[int, int]:
    """(world, dp) for the launch, or a ConfigError naming the fix."""
    world = cfg.launch.nodes * cfg.launch.gpus_per_node
    model_parallel = cfg.parallel.tp_size * cfg.parallel.sp_size
    if world % model_parallel:
        raise ConfigError(f"launch: world size {world} (nodes={cfg.launch.nodes} x gpus_per_node="
                          f"{cfg.launch.gpus_per_node}) is not divisible by tp_size x sp_size = {model_parallel}. "
                          f"Fix: change launch.nodes/gpus_per_node or parallel.tp_size/sp_size.")
    return world, world // model_parallel


def render_sbatch(cfg: RunConfig, run_dir: str) -> str:
    """The sbatch script text for `cfg`, with all paths under `run_dir` (absolute or as given)."""
    lc = cfg.launch
    world, dp = check_layout(cfg)
    headers = ""
    if lc.partition:
        headers += f"#SBATCH --partition={lc.partition}\n"
    if lc.account:
        headers += f"#SBATCH --account={lc.account}\n"
    # NVLink multicast stays off (it can take shared hosts down); user env comes after and may add more.
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONUNBUFFERED": "1", **lc.env}
    env_lines = "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in env.items())
    setup_lines = "".join(line.rstrip() + "\n" for line in lc.setup)
    return _template().substitute(
        job_name=lc.job_name, nodes=lc.nodes, gpus_per_node=lc.gpus_per_node, cpus_per_task=lc.cpus_per_task,
        ntasks_per_node=1 if lc.launcher == "srun" else lc.gpus_per_node, time=lc.time,
        optional_headers=headers, signal_seconds=lc.signal_seconds, run_dir=run_dir, world=world,
        tp=cfg.parallel.tp_size, sp=cfg.parallel.sp_size, dp=dp, max_restarts=lc.max_restarts,
        env_lines=env_lines, setup_lines=setup_lines, rdzv_port=lc.rdzv_port,
        launch_command=launch_command(cfg, run_dir))


def code_version(repo_dir: str | None = None) -> tuple[str, str]:
    """(summary text, diff text) of the code the job will run; works outside git too."""
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", repo_dir, *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        from .. import __version__

        return f"megatron_longlive {__version__} (not a git checkout: {repo_dir})\n", ""
    dirty = git("status", "--porcelain")
    summary = (f"commit: {commit}\nbranch: {git('rev-parse', '--abbrev-ref', 'HEAD')}\n"
               f"dirty: {'yes' if dirty else 'no'}\n")
    return summary, git("diff", "HEAD") if dirty else ""


def prepare_run_dir(cfg: RunConfig, run_dir: str) -> str:
    """Write config.yaml, code_version.txt (+ code.diff) and job.sbatch into `run_dir`; return the sbatch path."""
    import dataclasses

    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    # The job trains into its own run directory.
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=run_dir))
    script = render_sbatch(cfg, run_dir)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(cfg.to_yaml())
    summary, diff = code_version()
    with open(os.path.join(run_dir, "code_version.txt"), "w") as f:
        f.write(summary)
    if diff:
        with open(os.path.join(run_dir, "code.diff"), "w") as f:
            f.write(diff + "\n")
    path = os.path.join(run_dir, "job.sbatch")
    with open(path, "w") as f:
        f.write(script)
    os.chmod(path, 0o755)
    return path
