"""A local stand-in for Slurm's `sbatch`, `srun` and `scontrol`: runs a rendered job on this machine.

Put `slurm/fake` first on PATH and the job script from `longlive slurm` runs without a cluster, with real
processes and the environment Slurm would give them:

    PATH=$PWD/slurm/fake:$PATH sbatch runs/x/job.sbatch      # like `sbatch --wait`: runs the job here

- `sbatch` reads the script's `#SBATCH` lines (nodes, ntasks-per-node, job-name, output, signal, ...),
  sets SLURM_JOB_ID / SLURM_JOB_NODELIST / SLURM_NNODES / ..., runs the script with bash in the
  foreground (output to `--output` with %j/%x filled in) and exits with the job's status. A job that calls
  `scontrol requeue` is run again with SLURM_RESTART_COUNT + 1 once it exits, as Slurm would requeue it.
  The `--signal=[B:]SIG@secs` warning is sent when FAKE_SLURM_SIGNAL_AFTER seconds have passed or the path
  FAKE_SLURM_SIGNAL_WHEN exists (first run only), to test checkpoint-and-requeue without waiting hours.
- `srun` starts ntasks = nodes x ntasks-per-node real processes of the command, each with SLURM_PROCID,
  SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS, SLURM_STEP_NODELIST, SLURMD_NODENAME, ...; forwards
  TERM/INT/USR1/USR2 to them; with --kill-on-bad-exit a failing task stops the others; exits with the
  highest task status. Container options are ignored (the command runs on the host) with a warning.
- `scontrol show hostnames [LIST]` expands a Slurm host list; `scontrol requeue JOB` asks `sbatch` to rerun.

The fake nodes are loopback addresses (127.0.0.1, 127.0.0.2, ...; FAKE_SLURM_NODES=a,b overrides), so
a multi-node rendezvous happens over localhost. Each line this tool prints itself starts with `fake-`.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def _say(tool: str, msg: str) -> None:
    print(f"fake-{tool}: {msg}", file=sys.stderr, flush=True)


class UsageError(Exception):
    """A command line the fake does not understand (exit status 2, one line)."""


# ----- host lists -------------------------------------------------------------------------------------
def expand_hostlist(text: str) -> list[str]:
    """Slurm host list -> names: 'gpu[03-05,7],cpu1' -> gpu03 gpu04 gpu05 gpu7 cpu1 (zero padding kept)."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", text):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if not prefix and ranges is None:
            continue
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise UsageError(f"bad host range {part!r} in {text!r}")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return hosts


def fake_nodes(num_nodes: int) -> list[str]:
    given = os.environ.get("FAKE_SLURM_NODES")
    nodes = given.split(",") if given else [f"127.0.0.{i + 1}" for i in range(num_nodes)]
    if len(nodes) < num_nodes:
        raise UsageError(f"FAKE_SLURM_NODES lists {len(nodes)} node(s) but the job asks for {num_nodes}")
    return nodes[:num_nodes]


def compress_hostlist(nodes: list[str]) -> str:
    """Loopback names 127.0.0.[1-N] are written in range form (Slurm style); others comma-joined."""
    nums = [n[len("127.0.0."):] for n in nodes if n.startswith("127.0.0.")]
    if len(nodes) > 1 and len(nums) == len(nodes) and nums == [str(int(nums[0]) + i) for i in range(len(nums))]:
        return f"127.0.0.[{nums[0]}-{nums[-1]}]"
    return ",".join(nodes)


# ----- option parsing -------------------------------------------------------------------------------
def parse_options(argv: list[str], with_value: dict[str, str], flags: dict[str, str], tool: str):
    """Slurm-style options up to the first positional argument -> (options dict, rest of argv)."""
    opts: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            break
        if arg == "--":
            i += 1
            break
        name, eq, value = arg.partition("=")
        if len(name) > 2 and not name.startswith("--"):  # -n2 style
            name, value, eq = name[:2], name[2:], "="
        if name in with_value:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"option {name} needs a value")
                value = argv[i]
            opts[with_value[name]] = value
        elif name in flags:
            opts[flags[name]] = value if eq else True
        else:
            raise UsageError(f"unsupported option {arg!r} (the fake {tool} knows: "
                             f"{', '.join(sorted(set(with_value) | set(flags)))})")
        i += 1
    return opts, argv[i:]


def _int(opts: dict, key: str, default: int) -> int:
    value = opts.get(key, default)
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{key}={value!r} is not an integer") from None
    if out < 1:
        raise UsageError(f"--{key}={out} must be >= 1")
    return out


# ----- srun -----------------------------------------------------------------------------------------------
SRUN_VALUES = {"-n": "ntasks", "--ntasks": "ntasks", "-N": "nodes", "--nodes": "nodes",
               "--ntasks-per-node": "ntasks-per-node", "-c": "cpus-per-task", "--cpus-per-task": "cpus-per-task",
               "-J": "job-name", "--job-name": "job-name", "--container-image": "container-image",
               "--container-mounts": "container-mounts", "--export": "export", "--gpus-per-node": "gpus-per-node",
               "--mpi": "mpi", "-o": "output", "--output": "output"}
SRUN_FLAGS = {"--kill-on-bad-exit": "kill-on-bad-exit", "-K": "kill-on-bad-exit", "-l": "label", "--label": "label",
              "--exclusive": "exclusive", "--container-mount-home": "container-mount-home",
              "--no-container-mount-home": "container-mount-home", "-u": "unbuffered", "--unbuffered": "unbuffered"}


def srun(argv: list[str]) -> int:
    opts, command = parse_options(argv, SRUN_VALUES, SRUN_FLAGS, "srun")
    if not command:
        raise UsageError("no command to run (usage: srun [options] COMMAND [ARGS])")
    for key in ("container-image", "container-mounts"):
        if key in opts:
            _say("srun", f"--{key} ignored: the command runs on this host, not in a container")
    nodes_env = os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or "1"
    nodes = _int(opts, "nodes", int(nodes_env))
    if "ntasks-per-node" in opts:
        per_node = _int(opts, "ntasks-per-node", 1)
    elif "ntasks" in opts:
        per_node = -(-_int(opts, "ntasks", 1) // nodes)
    else:
        per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1"))
    ntasks = _int(opts, "ntasks", nodes * per_node)
    joblist = os.environ.get("SLURM_JOB_NODELIST")
    hosts = expand_hostlist(joblist) if joblist else fake_nodes(nodes)
    if len(hosts) < nodes:
        raise UsageError(f"the step asks for {nodes} node(s) but the job has {len(hosts)} ({joblist})")
    hosts = hosts[:nodes]
    job_id = os.environ.get("SLURM_JOB_ID") or str(os.getpid())
    step_id = "0"  # one step per srun call is all the rendered jobs use
    kill_on_bad_exit = opts.get("kill-on-bad-exit", False) not in (False, "0")
    base = dict(os.environ)
    base.update(SLURM_JOB_ID=job_id, SLURM_JOBID=job_id, SLURM_STEP_ID=step_id, SLURM_STEPID=step_id,
                SLURM_NTASKS=str(ntasks), SLURM_NPROCS=str(ntasks), SLURM_NNODES=str(nodes),
                SLURM_STEP_NUM_NODES=str(nodes), SLURM_STEP_NUM_TASKS=str(ntasks),
                SLURM_STEP_NODELIST=compress_hostlist(hosts), SLURM_JOB_NODELIST=joblist or compress_hostlist(hosts),
                SLURM_NODELIST=joblist or compress_hostlist(hosts),
                SLURM_TASKS_PER_NODE=f"{per_node}(x{nodes})", SLURM_STEP_TASKS_PER_NODE=f"{per_node}(x{nodes})")
    if "cpus-per-task" in opts:
        base["SLURM_CPUS_PER_TASK"] = str(opts["cpus-per-task"])
    procs: list[subprocess.Popen] = []
    for task in range(ntasks):
        node = min(task // per_node, nodes - 1)
        env = dict(base, SLURM_PROCID=str(task), SLURM_LOCALID=str(task - node * per_node), SLURM_NODEID=str(node),
                   SLURMD_NODENAME=hosts[node], SLURM_TOPOLOGY_ADDR=hosts[node])
        try:
            procs.append(subprocess.Popen(command, env=env, **_label_pipes(opts)))
        except OSError as e:
            _terminate(procs)
            raise UsageError(f"cannot start {command[0]!r}: {e.strerror}") from None
        _say("srun", f"task {task} on node {node} ({hosts[node]}) started: pid {procs[-1].pid}")
    pumps = _start_label_pumps(procs) if opts.get("label") else []

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for s in FORWARDED:
        signal.signal(s, forward)
    codes: dict[int, int] = {}
    first_failure = None
    while len(codes) < ntasks:
        for task, p in enumerate(procs):
            if task in codes or p.poll() is None:
                continue
            codes[task] = p.returncode if p.returncode >= 0 else 128 - p.returncode
            _say("srun", f"task {task} (pid {p.pid}) exited with status {codes[task]}")
            if codes[task] and first_failure is None:
                first_failure = codes[task]
                if kill_on_bad_exit:
                    _say("srun", f"task {task} failed: terminating the other tasks (--kill-on-bad-exit)")
                    _terminate(procs)
        time.sleep(0.05)
    for t in pumps:
        t.join()
    return first_failure or 0


def _label_pipes(opts: dict) -> dict:
    return {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if opts.get("label") else {}


def _start_label_pumps(procs: list[subprocess.Popen]):
    import threading

    def pump(task, stream):
        for line in iter(stream.readline, b""):
            sys.stdout.buffer.write(f"{task}: ".encode() + line)
            sys.stdout.buffer.flush()

    threads = [threading.Thread(target=pump, args=(t, p.stdout), daemon=True) for t, p in enumerate(procs)]
    for t in threads:
        t.start()
    return threads


def _terminate(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


# ----- scontrol -----------------------------------------------------------------------------------------
def scontrol(argv: list[str]) -> int:
    if argv[:2] == ["show", "hostnames"]:
        text = argv[2] if len(argv) > 2 else os.environ.get("SLURM_JOB_NODELIST", "")
        if not text:
            raise UsageError("show hostnames: no host list given and SLURM_JOB_NODELIST is not set")
        print("\n".join(expand_hostlist(text)))
        return 0
    if argv[:1] == ["requeue"] and len(argv) == 2:
        marker = os.environ.get("FAKE_SLURM_REQUEUE_FILE")
        if not marker or argv[1] != os.environ.get("SLURM_JOB_ID"):
            raise UsageError(f"requeue {argv[1]}: not a job started by the fake sbatch")
        with open(marker, "w") as f:
            f.write(argv[1])
        _say("scontrol", f"job {argv[1]} will be requeued when its script exits")
        return 0
    raise UsageError(f"unsupported command {' '.join(argv)!r} (the fake scontrol knows: show hostnames [LIST], "
                     "requeue JOBID)")


# ----- sbatch ---------------------------------------------------------------------------------------------
SBATCH_VALUES = {"-N": "nodes", "--nodes": "nodes", "--ntasks-per-node": "ntasks-per-node", "-n": "ntasks",
                 "--ntasks": "ntasks", "-J": "job-name", "--job-name": "job-name", "-o": "output", "--output": "output",
                 "-e": "error", "--error": "error", "-t": "time", "--time": "time", "--signal": "signal",
                 "--open-mode": "open-mode", "-p": "partition", "--partition": "partition", "-A": "account",
                 "--account": "account", "--gpus-per-node": "gpus-per-node", "-c": "cpus-per-task",
                 "--cpus-per-task": "cpus-per-task", "--mem": "mem", "--exclusive": "exclusive"}
SBATCH_FLAGS = {"--requeue": "requeue", "--no-requeue": "no-requeue", "--wait": "wait", "-W": "wait"}
MAX_RUNS = 50


def read_sbatch_headers(path: str) -> list[str]:
    """The options of the `#SBATCH` lines at the top of a batch script (Slurm stops at the first command)."""
    args: list[str] = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#!"):
                continue
            if not line.startswith("#"):
                break
            if line.startswith("#SBATCH"):
                args += line[len("#SBATCH"):].split("#")[0].split()
    return args


def _fill_pattern(pattern: str, job_id: str, name: str) -> str:
    return pattern.replace("%j", job_id).replace("%A", job_id).replace("%x", name).replace("%%", "%")


def _signal_spec(text: str) -> tuple[int, bool]:
    """'B:USR1@300' -> (SIGUSR1, batch_shell_only=True)."""
    m = re.fullmatch(r"(?:(B|R)?:)?([A-Z0-9]+)(?:@\d+)?", text)
    if not m:
        raise UsageError(f"--signal={text!r} is not [B:]SIG[@seconds]")
    name = m.group(2)
    sig = int(name) if name.isdigit() else getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
    if sig is None:
        raise UsageError(f"--signal={text!r}: unknown signal {name}")
    return int(sig), m.group(1) == "B"


def sbatch(argv: list[str]) -> int:
    cli_opts, rest = parse_options(argv, SBATCH_VALUES, SBATCH_FLAGS, "sbatch")
    if not rest:
        raise UsageError("no batch script given (usage: sbatch [options] SCRIPT [ARGS])")
    script, script_args = rest[0], rest[1:]
    if not os.path.isfile(script):
        raise UsageError(f"batch script {script!r} not found")
    header_opts, _ = parse_options(read_sbatch_headers(script), SBATCH_VALUES, SBATCH_FLAGS, "sbatch")
    opts = {**header_opts, **cli_opts}
    nodes = _int(opts, "nodes", 1)
    per_node = _int(opts, "ntasks-per-node", 1)
    name = str(opts.get("job-name", os.path.basename(script)))
    job_id = os.environ.get("FAKE_SLURM_JOB_ID") or str(100000 + os.getpid() % 900000)
    hosts = compress_hostlist(fake_nodes(nodes))
    print(f"Submitted batch job {job_id}", flush=True)
    env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOBID=job_id, SLURM_JOB_NAME=name, SLURM_NNODES=str(nodes),
               SLURM_JOB_NUM_NODES=str(nodes), SLURM_JOB_NODELIST=hosts, SLURM_NODELIST=hosts,
               SLURM_NTASKS_PER_NODE=str(per_node), SLURM_NTASKS=str(nodes * per_node),
               SLURM_TASKS_PER_NODE=f"{per_node}(x{nodes})", SLURM_JOB_CPUS_PER_NODE=f"{per_node}(x{nodes})",
               SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",  # the batch step is task 0 of node 0
               SLURM_SUBMIT_DIR=os.getcwd(), SLURM_SUBMIT_HOST=os.uname().nodename, SLURMD_NODENAME=hosts.split(",")[0])
    for key in ("cpus-per-task", "partition", "account"):
        if key in opts:
            env["SLURM_" + key.upper().replace("-", "_")] = str(opts[key])
    append = opts.get("open-mode") == "append"
    signal_spec = _signal_spec(str(opts["signal"])) if "signal" in opts else None
    fd, marker = tempfile.mkstemp(prefix=f"fake-sbatch-{job_id}-")
    os.close(fd)
    env["FAKE_SLURM_REQUEUE_FILE"] = marker
    status = 0
    try:
        for restart in range(MAX_RUNS):
            if restart:
                env["SLURM_RESTART_COUNT"] = str(restart)
                append = True  # a requeued job appends to its log, as Slurm does with --open-mode=append
            open(marker, "w").close()
            out_path = _fill_pattern(str(opts.get("output", "slurm-%j.out")), job_id, name)
            status = _run_batch_script(script, script_args, env, out_path, opts, job_id, name, append,
                                       signal_spec if restart == 0 else None)
            if os.path.getsize(marker) == 0:
                break
            _say("sbatch", f"job {job_id} requeued (restart {restart + 1})")
        else:
            _say("sbatch", f"job {job_id} requeued {MAX_RUNS} times; giving up")
    finally:
        os.unlink(marker)
    return status


def _run_batch_script(script, script_args, env, out_path, opts, job_id, name, append, signal_spec) -> int:
    out_dir = os.path.dirname(out_path)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    mode = "ab" if append else "wb"
    with open(out_path, mode) as out:
        err = out
        if "error" in opts:
            err = open(_fill_pattern(str(opts["error"]), job_id, name), mode)
        try:
            proc = subprocess.Popen(["bash", script, *script_args], env=env, stdout=out, stderr=err,
                                    start_new_session=True)
            _wait_and_signal(proc, signal_spec)
        finally:
            if err is not out:
                err.close()
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def _wait_and_signal(proc: subprocess.Popen, signal_spec) -> None:
    """Wait for the batch shell; send Slurm's time-limit warning once FAKE_SLURM_SIGNAL_AFTER/_WHEN says so."""
    after = os.environ.get("FAKE_SLURM_SIGNAL_AFTER")
    when = os.environ.get("FAKE_SLURM_SIGNAL_WHEN")
    start = time.time()
    sent = signal_spec is None or not (after or when)

    def stop(signum, frame):  # Ctrl-C / kill of the fake sbatch ends the whole job
        os.killpg(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while proc.poll() is None:
        if not sent and ((after and time.time() - start >= float(after)) or (when and os.path.exists(when))):
            sig, batch_only = signal_spec
            _say("sbatch", f"time limit near: sending {signal.Signals(sig).name} to the "
                           f"{'batch shell' if batch_only else 'job'}")
            proc.send_signal(sig) if batch_only else os.killpg(proc.pid, sig)
            sent = True
        time.sleep(0.1)


USAGE = {"srun": "srun [options] COMMAND [ARGS]", "sbatch": "sbatch [options] SCRIPT [ARGS]",
         "scontrol": "scontrol show hostnames [LIST] | scontrol requeue JOBID"}


def main(tool: str, argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: {USAGE[tool]}   (fake, for local dry runs)\n\n{__doc__.strip()}")
        return 0
    try:
        return {"srun": srun, "sbatch": sbatch, "scontrol": scontrol}[tool](argv)
    except UsageError as e:
        _say(tool, f"error: {e}")
        return 2
