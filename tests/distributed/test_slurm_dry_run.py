"""The sbatch script rendered by `longlive slurm` runs on this machine through the fake Slurm in slurm/fake/.

`sbatch`/`srun`/`scontrol` from slurm/fake are put first on PATH; they start real processes with Slurm's
environment. Fast tests pin the shims themselves (task env, kill-on-bad-exit, host lists, requeue and the
time-limit signal); slow tests run the real rendered job: 2 "nodes" x 1 process train the tiny model 2 steps
over gloo (c10d rendezvous as on a cluster), and a job warned of its time limit checkpoints, requeues and
resumes to the end.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from megatron_longlive.distributed.grid import _first_slurm_host
from megatron_longlive.distributed.launch import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = os.path.join(ROOT, "slurm", "fake")
TINY = os.path.join(ROOT, "examples", "configs", "tiny.yaml")

pytestmark = pytest.mark.distributed



def _need_mpi():
    """Skip unless mpi4py loads an MPI library (a pip-installed mpi4py without MPI fails on `from mpi4py import MPI`)."""
    try:
        from mpi4py import MPI
        MPI.Get_version()
    except Exception as e:  # ImportError without mpi4py, RuntimeError without libmpi
        pytest.skip(f"mpi4py with an MPI library is needed ({type(e).__name__}: {e}); pip install mpi4py + OpenMPI")

def _env(**extra: str) -> dict:
    path = os.pathsep.join([FAKE, os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, PATH=path, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **extra)
    for key in [k for k in env if k.startswith("SLURM_") or k.startswith("FAKE_SLURM_")]:
        if key not in extra:
            del env[key]
    return env


def _run(args: list[str], cwd: str = ROOT, timeout: float = 60, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(**extra), capture_output=True, text=True, timeout=timeout)


# ----- the shims ------------------------------------------------------------------------------------
def test_fake_srun_starts_one_real_process_per_task_with_slurm_env():
    probe = ("import json, os; print(json.dumps({k: os.environ[k] for k in ('SLURM_PROCID', 'SLURM_LOCALID', "
             "'SLURM_NODEID', 'SLURM_NTASKS', 'SLURM_NNODES', 'SLURMD_NODENAME', 'SLURM_STEP_NODELIST', "
             "'SLURM_JOB_ID')} | {'pid': os.getpid()}))")
    r = _run(["srun", "-N", "2", "--ntasks-per-node=2", "--label", sys.executable, "-c", probe], SLURM_JOB_ID="4242")
    assert r.returncode == 0, r.stderr
    labelled = [line.split(": ", 1) for line in r.stdout.splitlines()]  # --label: "TASK: output line"
    assert all(json.loads(text)["SLURM_PROCID"] == label for label, text in labelled)
    tasks = sorted((json.loads(text) for _, text in labelled), key=lambda t: int(t["SLURM_PROCID"]))
    assert [t["SLURM_PROCID"] for t in tasks] == ["0", "1", "2", "3"]
    assert [t["SLURM_LOCALID"] for t in tasks] == ["0", "1", "0", "1"]
    assert [t["SLURM_NODEID"] for t in tasks] == ["0", "0", "1", "1"]
    assert [t["SLURMD_NODENAME"] for t in tasks] == ["127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.2"]
    assert {t["SLURM_NTASKS"] for t in tasks} == {"4"} and {t["SLURM_NNODES"] for t in tasks} == {"2"}
    assert {t["SLURM_JOB_ID"] for t in tasks} == {"4242"}
    assert len({t["pid"] for t in tasks}) == 4  # four real processes
    # what the project's launch discovery makes of it: master = first node of the step
    assert _first_slurm_host(tasks[0]["SLURM_STEP_NODELIST"]) == "127.0.0.1"


def test_fake_srun_kill_on_bad_exit_stops_the_other_tasks():
    script = "if [ $SLURM_PROCID = 1 ]; then exit 3; fi; sleep 60"
    r = _run(["srun", "-n", "2", "--kill-on-bad-exit=1", "bash", "-c", script], timeout=30)
    assert r.returncode == 3, r.stderr
    assert "task 1 (pid" in r.stderr and "exited with status 3" in r.stderr
    assert "task 0" in r.stderr and "exited with status 143" in r.stderr  # SIGTERM, not the 60 s sleep


@pytest.mark.parametrize("tool", ["srun", "sbatch", "scontrol"])
def test_fake_tools_help(tool):
    r = _run([tool, "--help"])
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {tool} ") and "SLURM_PROCID" in r.stdout


def test_fake_tools_reject_unknown_options_with_one_line():
    for tool, args in (("srun", ["--no-such-option", "true"]), ("sbatch", ["--no-such-option", "x.sh"]),
                       ("scontrol", ["show", "partitions"])):
        r = _run([tool, *args])
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"fake-{tool}: error:"), r


def test_fake_scontrol_expands_slurm_host_lists():
    r = _run(["scontrol", "show", "hostnames", "gpu[03-05,7],cpu1,dgx[9-10]"])
    assert r.stdout.split() == ["gpu03", "gpu04", "gpu05", "gpu7", "cpu1", "dgx9", "dgx10"]
    assert _first_slurm_host("gpu[03-05,7],cpu1") == r.stdout.split()[0]


def test_fake_sbatch_sets_job_env_signals_and_requeues(tmp_path):
    """A job warned of its time limit requeues itself once; the second run sees SLURM_RESTART_COUNT=1."""
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --job-name=probe\n#SBATCH --signal=B:USR1@60\n"
        f"#SBATCH --output={tmp_path}/log-%x-%j.out\n#SBATCH --open-mode=append\n"
        'echo "run ${SLURM_RESTART_COUNT:-0} job $SLURM_JOB_ID nodes $SLURM_NNODES list $SLURM_JOB_NODELIST"\n'
        'on_usr1() { echo "got USR1"; scontrol requeue "$SLURM_JOB_ID"; exit 0; }\n'
        "trap on_usr1 USR1\n"
        'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then touch ' + str(tmp_path / "ready") + "; sleep 30 & wait; fi\n"
        "srun hostname > /dev/null && echo done\n")
    r = _run(["sbatch", str(script)], FAKE_SLURM_JOB_ID="777", FAKE_SLURM_SIGNAL_WHEN=str(tmp_path / "ready"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Submitted batch job 777"
    log = (tmp_path / "log-probe-777.out").read_text().splitlines()
    assert log[0] == "run 0 job 777 nodes 2 list 127.0.0.[1-2]"
    assert "got USR1" in log
    assert "run 1 job 777 nodes 2 list 127.0.0.[1-2]" in log and log[-1] == "done"
    assert "requeued (restart 1)" in r.stderr


def test_launch_discovery_inside_a_slurm_job():
    """mpirun's ranks inherit the batch step's SLURM_PROCID=0: OpenMPI's variables win; srun's PMIx ones do not."""
    from megatron_longlive.distributed.grid import discover_launch

    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[1-2]", "MASTER_PORT": "1234"}
    srun_pmix = discover_launch(dict(batch, SLURM_PROCID="1", PMIX_RANK="1"))
    assert (srun_pmix.launcher, srun_pmix.rank, srun_pmix.world_size, srun_pmix.master_addr) == ("slurm", 1, 2, "gpu1")
    _need_mpi()
    info = discover_launch(dict(batch, OMPI_COMM_WORLD_SIZE="1", OMPI_COMM_WORLD_RANK="0"))
    assert info.launcher == "mpi"  # this process is an MPI singleton: rank 0 of 1, not Slurm's task 0 of 2
    assert (info.rank, info.world_size) == (0, 1)


# ----- the example renders in slurm/examples ----------------------------------------------------------------
RENDERS = {  # file -> (example config, overrides); run dirs are /shared/runs/<name>
    "wan2.1-ar-balanced-sp.sbatch": ("examples/wan2.1-ar-balanced-sp/config.yaml", []),
    "wan2.2-5b-nvfp4.sbatch": ("examples/wan2.2-5b-nvfp4/config.yaml",
                               ["launch.partition=gpu", "launch.container_image=nvcr.io/nvidia/pytorch:25.10-py3",
                                "launch.container_mounts=/lustre:/lustre"]),
    "wan2.2-5b-nvfp4-mpirun.sbatch": ("examples/wan2.2-5b-nvfp4/config.yaml",
                                      ["launch.launcher=mpirun", "launch.setup=['source /opt/venv/bin/activate']"]),
}


@pytest.mark.parametrize("name", sorted(RENDERS))
def test_slurm_examples_are_current_renders(name):
    from megatron_longlive.config import load_config
    from megatron_longlive.launch.slurm import render_sbatch

    config, overrides = RENDERS[name]
    text = render_sbatch(load_config(os.path.join(ROOT, config), overrides), "/shared/runs/" + name[:-len(".sbatch")])
    path = os.path.join(ROOT, "slurm", "examples", name)
    if os.environ.get("UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read(), f"re-render with UPDATE_GOLDEN=1 if the change to slurm/examples/{name} is intended"


# ----- the rendered job ---------------------------------------------------------------------------
def _render(run_dir: str, *overrides: str) -> str:
    sets = ["launch.cpus_per_task=1", f"launch.rdzv_port={free_port()}", "launch.env={OMP_NUM_THREADS: '1'}",
            "train.wandb_mode=disabled", "data.num_videos=4", *overrides]
    args = [sys.executable, "-m", "megatron_longlive.cli.main", "slurm", "-c", TINY, "--run-dir", run_dir]
    for s in sets:
        args += ["--set", s]
    r = _run(args)
    assert r.returncode == 0, r.stderr
    return os.path.join(run_dir, "job.sbatch")


def _metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow  # 1-3 min on 2 busy cores: the job (2 torchrun agents, c10d rendezvous) + the same run by torchrun
def test_rendered_sbatch_trains_two_steps_on_two_processes(tmp_path):
    run = str(tmp_path / "run")
    job = _render(run, "launch.nodes=2", "launch.gpus_per_node=1", "train.max_steps=2", "train.save_interval=2")
    r = _run(["sbatch", job], cwd=str(tmp_path), timeout=600, FAKE_SLURM_JOB_ID="31")
    log = open(os.path.join(run, "slurm-31.out")).read()
    assert r.returncode == 0, log[-4000:]
    # snapshot: the resolved config (training into the run dir) and the code version next to the job
    snap = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    assert snap["train"]["output_dir"] == run and snap["launch"]["nodes"] == 2
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert open(os.path.join(run, "code_version.txt")).read().startswith(f"commit: {head}\n")
    # both ranks ran: two srun tasks on two fake nodes, each rank wrote its part of the checkpoint
    assert "[longlive] job 31 restart 0 on 2 node(s), master 127.0.0.1:" in log
    for task in (0, 1):
        assert f"task {task} on node {task} (127.0.0.{task + 1}) started" in log
        assert f"task {task} (pid" in log and log.count("exited with status 0") == 2
    step = os.path.join(run, "checkpoints", "step_00000002")
    for name in ("COMPLETE", "trainer_rank0.pt", "trainer_rank1.pt", "__0_0.distcp", "__1_0.distcp"):
        assert os.path.exists(os.path.join(step, name)), name
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert log.count("trained to step 2") == 1  # rank 0 reports once
    # the same 2 ranks launched by plain torchrun on one node train identically: the Slurm path changes nothing
    from .tf_harness import run_longlive_train

    direct = run_longlive_train(str(tmp_path / "direct"), 2)
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in direct], rel=1e-6)
    assert [m["grad_norm"] for m in metrics] == pytest.approx([m["grad_norm"] for m in direct], rel=1e-6)


@pytest.mark.slow  # two launches of one process: the warned job checkpoints, requeues, resumes
def test_time_limit_warning_checkpoints_requeues_and_resumes(tmp_path):
    run = str(tmp_path / "run")
    job = _render(run, "launch.nodes=1", "launch.gpus_per_node=1", "train.max_steps=40", "train.save_interval=100",
                  "train.log_interval=1", "launch.max_restarts=1")
    r = _run(["sbatch", job], cwd=str(tmp_path), timeout=600, FAKE_SLURM_JOB_ID="32",
             FAKE_SLURM_SIGNAL_WHEN=os.path.join(run, "metrics.jsonl"))
    log = open(os.path.join(run, "slurm-32.out")).read()
    assert r.returncode == 0, log[-4000:]
    assert "time limit near: checkpointing, then requeue (restart 0 of 1)" in log
    assert "SIGTERM: saved" in log and "resumed from" in log
    assert "[longlive] job 32 restart 1 on 1 node(s)" in log
    saved = int(log.split("SIGTERM: saved")[1].split("at step ")[1].split(";")[0])
    assert 1 <= saved < 40
    assert f"at step {saved}" in log.split("resumed from")[1].splitlines()[0]
    # one uninterrupted metrics file, and the final checkpoint
    assert [m["step"] for m in _metrics(run)] == list(range(1, 41))
    assert os.path.exists(os.path.join(run, "checkpoints", "step_00000040", "COMPLETE"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun is not installed (the mpirun variant needs "
                    "Open MPI or MPICH plus mpi4py)")
def test_rendered_mpirun_sbatch_trains_two_steps(tmp_path):
    _need_mpi()
    run = str(tmp_path / "run")
    job = _render(run, "launch.launcher=mpirun", "launch.nodes=1", "launch.gpus_per_node=2", "train.max_steps=2",
                  "train.save_interval=2")
    root = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"} if os.geteuid() == 0 else {}
    r = _run(["sbatch", job], cwd=str(tmp_path), timeout=600, FAKE_SLURM_JOB_ID="33", **root)
    log = open(os.path.join(run, "slurm-33.out")).read()
    assert r.returncode == 0, log[-4000:]
    step = os.path.join(run, "checkpoints", "step_00000002")
    for name in ("COMPLETE", "trainer_rank0.pt", "trainer_rank1.pt"):  # DP=2: both MPI ranks wrote their state
        assert os.path.exists(os.path.join(step, name)), name
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]
    from .tf_harness import run_longlive_train

    direct = run_longlive_train(str(tmp_path / "direct"), 2)  # the same 2 ranks under torchrun
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in direct], rel=1e-6)
