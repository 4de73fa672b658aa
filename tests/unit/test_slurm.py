"""`longlive slurm`: rendered sbatch files match golden files; the run dir gets config + code snapshots."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from megatron_longlive.config import ConfigError, load_config
from megatron_longlive.launch.slurm import prepare_run_dir, render_sbatch

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden")
CASES = {
    "srun_2node_sp2.sbatch": ["launch.nodes=2", "launch.gpus_per_node=8", "parallel.sp_size=2",
                              "launch.partition=batch", "launch.account=video", "launch.time=1-00:00:00",
                              "launch.container_image=nvcr.io/nvidia/pytorch:25.10-py3",
                              "launch.container_mounts=/data:/data", "launch.env={WANDB_MODE: offline}",
                              "launch.setup=['source /opt/venv/bin/activate']"],
    "mpirun_1node_tp2.sbatch": ["launch.launcher=mpirun", "launch.gpus_per_node=4", "parallel.tp_size=2",
                                "launch.max_restarts=0"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_sbatch_matches_golden(name):
    cfg = load_config(None, CASES[name])
    text = render_sbatch(cfg, "/runs/golden")
    path = os.path.join(GOLDEN, name)
    if os.environ.get("UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read(), f"re-render with UPDATE_GOLDEN=1 if the change to {name} is intended"


def test_rendered_script_is_valid_bash():
    cfg = load_config(None, CASES["srun_2node_sp2.sbatch"])
    subprocess.run(["bash", "-n"], input=render_sbatch(cfg, "/runs/x"), text=True, check=True)


def test_layout_that_does_not_divide_world_fails_clearly():
    cfg = load_config(None, ["launch.gpus_per_node=3", "parallel.sp_size=2"])
    with pytest.raises(ConfigError, match="not divisible by tp_size x sp_size = 2"):
        render_sbatch(cfg, "/runs/x")


def test_bad_time_is_rejected():
    with pytest.raises(ConfigError, match="launch.time"):
        load_config(None, ["launch.time=4h"])


def test_run_dir_snapshots_resolved_config_and_code_version(tmp_path):
    cfg = load_config(None, ["launch.nodes=2", "train.lr=3e-4"])
    path = prepare_run_dir(cfg, str(tmp_path / "run"))
    snap = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert snap["train"]["lr"] == 3e-4 and snap["launch"]["nodes"] == 2
    assert snap["train"]["output_dir"] == str(tmp_path / "run")
    assert load_config(tmp_path / "run" / "config.yaml").train.lr == 3e-4  # the snapshot reloads
    version = (tmp_path / "run" / "code_version.txt").read_text()
    assert version.startswith("commit: ") or "not a git checkout" in version
    assert os.access(path, os.X_OK)


def test_cli_renders_and_refuses_submit_without_sbatch(tmp_path):
    env = dict(os.environ, PATH="/usr/bin:/bin")
    out = subprocess.run([sys.executable, "-m", "megatron_longlive.cli.main", "slurm", "--run-dir",
                          str(tmp_path / "r"), "--set", "launch.nodes=1", "--submit"],
                         capture_output=True, text=True, env=env)
    assert (tmp_path / "r" / "job.sbatch").exists()
    assert out.returncode == 2 and "sbatch" in out.stderr and "not on PATH" in out.stderr
