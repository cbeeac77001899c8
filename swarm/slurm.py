"""The Slurm job a process runs in: what ``SLURM_*`` says, and when the job's time runs out.

Read by ``swarm serve`` (to leave before walltime) and ``swarm doctor``. The end time can move while a
job runs (``scontrol update JobId=N TimeLimit=...``), so :func:`end_time` asks Slurm each time:
``squeue`` (epoch seconds through ``SLURM_TIME_FORMAT=%s``), else ``scontrol show job``, else
``SLURM_JOB_END_TIME`` (set once when the job starts, by newer Slurm versions).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import subprocess
from collections.abc import Callable, Mapping

QUERY_TIMEOUT = 10.0
# what Slurm and the device runtimes say about the accelerators a job got
GRES_ENV = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GRES", "CUDA_VISIBLE_DEVICES",
            "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES")


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    job_id: str
    name: str = ""
    node: str = ""
    partition: str = ""
    array_job_id: str = ""
    array_task_id: str = ""
    gres: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "SlurmJob | None":
        """The job of this process, or None outside Slurm (``SLURM_JOB_ID`` unset)."""
        env = os.environ if env is None else env
        job_id = env.get("SLURM_JOB_ID", "").strip()
        if not job_id:
            return None
        return cls(job_id=job_id, name=env.get("SLURM_JOB_NAME", ""), node=env.get("SLURMD_NODENAME", ""),
                   partition=env.get("SLURM_JOB_PARTITION", ""), array_job_id=env.get("SLURM_ARRAY_JOB_ID", ""),
                   array_task_id=env.get("SLURM_ARRAY_TASK_ID", ""),
                   gres={k: env[k] for k in GRES_ENV if env.get(k)})

    @property
    def label(self) -> str:
        """``job 1234`` or ``job 1233_1`` (array job 1233, task 1), as squeue prints it."""
        if self.array_job_id and self.array_task_id:
            return f"job {self.array_job_id}_{self.array_task_id}"
        return f"job {self.job_id}"

    def describe(self) -> str:
        parts = [self.label + (f" ({self.name})" if self.name else "")]
        if self.node:
            parts.append(f"node {self.node}")
        if self.partition:
            parts.append(f"partition {self.partition}")
        if self.gres:
            parts.append(" ".join(f"{k}={v}" for k, v in self.gres.items()))
        return ", ".join(parts)


def parse_end_time(text: str) -> float | None:
    """Slurm's end time -> epoch seconds: ``1714567890`` (``SLURM_TIME_FORMAT=%s``), or ``2024-05-01T12:34:56``
    (Slurm's default, local time), or ``EndTime=...`` in ``scontrol show job``. None: unknown/unlimited."""
    match = re.search(r"EndTime=(\S+)", text)
    value = (match[1] if match else text).strip()
    if re.fullmatch(r"\d{9,}", value):
        return float(value)
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except ValueError:  # "Unknown", "N/A", "NONE", an unlimited job
        return None


def _run(argv: list[str], env: Mapping[str, str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=QUERY_TIMEOUT, env=dict(env),
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def end_time(job: SlurmJob, env: Mapping[str, str] | None = None,
             run: Callable[[list[str], Mapping[str, str]], str | None] = _run) -> float | None:
    """When ``job`` will be stopped (epoch seconds), as Slurm says now; None if Slurm cannot say."""
    env = os.environ if env is None else env
    set_by_slurm = parse_end_time(env.get("SLURM_JOB_END_TIME", ""))
    query_env = {**env, "SLURM_TIME_FORMAT": "%s"}
    out = run(["squeue", "--noheader", "--jobs", job.job_id, "--format", "%e"], query_env)
    if out is not None and out.strip():
        return parse_end_time(out.strip().splitlines()[0])
    out = run(["scontrol", "show", "job", job.job_id], query_env)
    if out is not None:
        return parse_end_time(out)
    return set_by_slurm
