"""``swarm slurm``: servers as Slurm batch jobs. Writes an sbatch script (kept next to you, to read,
edit and resubmit) and submits it.

The script asks for one node and one task per server (``--array=0-(N-1)`` for N servers, each placing
itself in the swarm), the partition, GPUs/DCUs/NPUs as ``--gres``, the walltime, and Slurm's warning
``--signal=B:USR1@S`` at ``--leave-before``; loads modules, sources an env file, then ``exec``s
``swarm serve`` (so the warning reaches it) with its output in the job's ``--output`` file,
where ``squeue``/``sacct`` users look (``scontrol show job N`` prints its path as ``StdOut``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys

from swarm.command_config import SlurmConfig
from swarm.config import ServerConfig
from swarm.errors import ConfigError


WARNING_EARLY_S = 60  # "the signal may be sent up to 60 seconds earlier than specified" (sbatch --signal)


def walltime_seconds(text: str) -> int:
    """Slurm's ``--time`` formats -> seconds: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ConfigError(f"--time {text!r} is not a Slurm time (MINUTES, HH:MM:SS or DAYS-HH:MM:SS)")
    days, a, b, c = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # M or M:S


def serve_config(serve_args: tuple[str, ...]) -> ServerConfig:
    """The ``swarm serve`` flags after ``--``, checked here, before anything is submitted."""
    from swarm.cli import _build_config, make_parser

    if not serve_args:
        raise ConfigError("swarm slurm needs the `swarm serve` flags after --, e.g. swarm slurm --array 4 -- "
                          "--model Qwen/Qwen2.5-7B-Instruct --initial-peers /ip4/...")
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            args = make_parser().parse_args(["serve", *serve_args])
    except SystemExit:
        why = complaint.getvalue().strip().splitlines()[-1:] or ["?"]
        raise ConfigError(f"the swarm serve flags after -- are not valid: {why[0]}") from None
    return _build_config(ServerConfig, args)


def render_script(config: SlurmConfig, serve_args: tuple[str, ...]) -> str:
    """The sbatch script for ``config``; ``serve_args`` go to ``swarm serve`` as they are."""
    leave_before = serve_config(serve_args).leave_before
    if walltime_seconds(config.time) < leave_before + WARNING_EARLY_S + 60:
        raise ConfigError(f"--time {config.time} leaves no time to serve: the server leaves the swarm "
                          f"{leave_before:.0f}s (--leave-before) before the limit, and Slurm may warn it "
                          f"{WARNING_EARLY_S}s earlier still; ask for more time")
    output = config.output or (f"{config.job_name}-%A_%a.out" if config.array > 1 else f"{config.job_name}-%j.out")
    # the warning goes to the batch shell, which `exec` made the server (server/walltime.py)
    directives = [f"--job-name={config.job_name}", f"--output={output}", f"--time={config.time}",
                  f"--signal=B:USR1@{max(1, int(leave_before))}", "--nodes=1", "--ntasks=1"]
    if config.array > 1:
        directives.append(f"--array=0-{config.array - 1}")
    for flag, value in (("partition", config.partition), ("gres", config.gres), ("cpus-per-task", config.cpus_per_task),
                        ("mem", config.mem)):
        if value:
            directives.append(f"--{flag}={value}")
    directives += list(config.sbatch_args)
    swarm = config.swarm or f"{shlex.quote(sys.executable)} -m swarm.cli"
    lines = ["#!/bin/bash", "# Written by `swarm slurm` (docs/hpc.md). Submit again with: sbatch THIS_FILE"]
    lines += [f"#SBATCH {directive}" for directive in directives]
    lines += ["set -e"]
    lines += [f"module load {shlex.quote(module)}" for module in config.modules]
    if config.env_file:
        lines += ["set -a", f"source {shlex.quote(os.path.abspath(config.env_file))}", "set +a"]
    lines += ["export PYTHONUNBUFFERED=1",
              'echo "swarm: Slurm job ${SLURM_JOB_ID} (array task ${SLURM_ARRAY_TASK_ID:-none}) on $(hostname), '
              'GPUs: ${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-none}}"',
              f"exec {swarm} serve --leave-before {leave_before:g} {shlex.join(serve_args)}".rstrip()]
    return "\n".join(lines) + "\n"


def run_slurm(config: SlurmConfig, serve_args: tuple[str, ...]) -> int:
    """Writes the script to ``config.script`` and, unless ``--no-submit``, submits it with sbatch."""
    script = render_script(config, serve_args)
    with open(config.script, "w") as f:
        f.write(script)
    os.chmod(config.script, 0o755)
    print(f"Wrote {config.script}", flush=True)
    if not config.submit:
        print(f"Submit it with: sbatch {config.script}", flush=True)
        return 0
    try:
        done = subprocess.run(["sbatch", "--parsable", config.script], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError("sbatch is not on PATH: run `swarm slurm` on a Slurm login node (or pass --no-submit "
                          "and copy the script there)") from None
    if done.returncode != 0:
        raise ConfigError(f"sbatch refused {config.script}: {done.stderr.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    jobs = ", ".join(f"{job_id}_{i}" for i in range(config.array)) if config.array > 1 else job_id
    print(f"Submitted batch job {job_id}: {config.array} server(s) ({jobs})", flush=True)
    print(f"  watch: squeue -j {job_id}   logs: scontrol show job {job_id} | grep StdOut   stop: scancel {job_id}",
          flush=True)
    return 0


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("serve_args", nargs=argparse.REMAINDER,
                        help="-- then the `swarm serve` flags for every server (e.g. -- --model M --num-blocks 8)")


def split_serve_args(values: list[str]) -> tuple[str, ...]:
    return tuple(values[1:] if values[:1] == ["--"] else values)
