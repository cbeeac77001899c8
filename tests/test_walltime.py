"""Leaving before a Slurm job's time limit (server/walltime.py) on a fake clock, and the sbatch script
``swarm slurm`` writes (swarm/sbatch.py). The real thing on a real Slurm cluster: tests/test_slurm.py."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys

import pytest

from server.walltime import WARNING_SIGNAL, poll_period, watch_walltime
from swarm.command_config import SlurmConfig
from swarm.errors import ConfigError
from swarm.sbatch import render_script, walltime_seconds
from swarm.slurm import SlurmJob

JOB = SlurmJob("42", array_job_id="41", array_task_id="1")


class FakeServer:
    def __init__(self):
        self.left: list[tuple[str, float, float]] = []  # (reason, drain_until, when)


def _run(ends, leave_before: float, *, warning: asyncio.Event | None = None, signal_after: int | None = None,
         max_polls: int = 200) -> tuple[FakeServer, list[float]]:
    """Runs watch_walltime on a fake clock (sleeping advances it) until the server leaves; ``ends`` is what
    Slurm answers, one value per poll (the last repeats). Returns the server and the clock at each poll."""
    now = [0.0]
    polls: list[float] = []
    server = FakeServer()

    async def leave(reason: str, drain_until: float) -> None:
        server.left.append((reason, drain_until, now[0]))

    server.leave = leave

    def read_end():
        polls.append(now[0])
        if len(polls) > max_polls:
            raise AssertionError("never left")
        if signal_after is not None and len(polls) == signal_after:
            os.kill(os.getpid(), WARNING_SIGNAL)
        return ends[min(len(polls) - 1, len(ends) - 1)]

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        await asyncio.sleep(0)

    async def main() -> None:
        task = asyncio.create_task(watch_walltime(server, JOB, leave_before, read_end=read_end, clock=lambda: now[0],
                                                  sleep=sleep, warning=warning))
        while not server.left and not task.done():
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    return server, polls


def test_leaves_leave_before_seconds_before_the_end():
    server, polls = _run([1000.0], leave_before=100.0)
    ((reason, drain_until, when),) = server.left
    assert when == 900.0 and drain_until == 950.0  # open sessions get half of the margin
    assert reason.startswith("Slurm job 41_1 reaches its time limit at ") and "(--leave-before 100s)" in reason
    assert poll_period(100.0) == 25.0 and all(b - a <= 25.0 for a, b in zip(polls, polls[1:]))
    assert poll_period(1.0) == 1.0 and poll_period(3600.0) == 60.0


def test_follows_an_end_moved_by_scontrol_update():
    server, _ = _run([5000.0, 5000.0, 300.0], leave_before=100.0)  # brought forward at the third poll (t=50)
    ((_, drain_until, when),) = server.left
    assert when == 200.0 and drain_until == 250.0
    later, _ = _run([300.0, 5000.0], leave_before=100.0)  # pushed back: leaves 100 s before the new end
    assert later.left[0][2] == 4900.0


def test_an_end_slurm_cannot_tell_keeps_the_last_one_known():
    server, _ = _run([400.0, None], leave_before=100.0)
    assert server.left[0][2] == 300.0
    with pytest.raises(AssertionError, match="never left"):
        _run([None], leave_before=100.0, max_polls=20)  # unlimited job, or no squeue: never leaves on its own


def test_slurms_warning_signal_makes_it_leave_at_once():
    server, _ = _run([5000.0], leave_before=100.0, signal_after=3)  # a real SIGUSR1 to this process at t=50
    ((reason, drain_until, when),) = server.left
    assert when in (50.0, 75.0)  # the loop handles the signal on its next turn: at most one poll later
    assert drain_until == 4950.0 and "(Slurm's warning signal)" in reason
    warned = asyncio.Event()
    warned.set()
    server, _ = _run([None], leave_before=100.0, warning=warned)  # end unknown: the margin from now
    assert server.left[0][1:] == (50.0, 0.0)


# ---------------------------------------------------------------- the sbatch script


def test_walltime_formats():
    assert walltime_seconds("30") == 1800 and walltime_seconds("1:30") == 90
    assert walltime_seconds("04:00:00") == 14400 and walltime_seconds("2-0") == 172800
    assert walltime_seconds("1-02:03") == 93780 and walltime_seconds("1-02:03:04") == 93784
    for bad in ("", "4h", "1:2:3:4", "-5"):
        with pytest.raises(ConfigError, match="is not a Slurm time"):
            walltime_seconds(bad)


def test_script_for_an_array_of_dcu_servers(tmp_path):
    env_file = tmp_path / "swarm.env"
    config = SlurmConfig(array=4, time="12:00:00", partition="dcu", gres="dcu:1", cpus_per_task=8, mem="64G",
                         job_name="swarm-qwen", modules=("compiler/dtk/24.04", "python/3.10"),
                         env_file=str(env_file), sbatch_args=("--account=proj42",), swarm="swarm")
    script = render_script(config, ("--model", "Qwen/Qwen2.5-7B", "--num-blocks", "8", "--leave-before", "300"))
    assert script.splitlines() == [
        "#!/bin/bash",
        "# Written by `swarm slurm` (docs/hpc.md). Submit again with: sbatch THIS_FILE",
        "#SBATCH --job-name=swarm-qwen", "#SBATCH --output=swarm-qwen-%A_%a.out", "#SBATCH --time=12:00:00",
        "#SBATCH --signal=B:USR1@300", "#SBATCH --nodes=1", "#SBATCH --ntasks=1", "#SBATCH --array=0-3",
        "#SBATCH --partition=dcu", "#SBATCH --gres=dcu:1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64G",
        "#SBATCH --account=proj42",
        "set -e", "module load compiler/dtk/24.04", "module load python/3.10",
        "set -a", f"source {env_file}", "set +a",
        "export PYTHONUNBUFFERED=1",
        'echo "swarm: Slurm job ${SLURM_JOB_ID} (array task ${SLURM_ARRAY_TASK_ID:-none}) on $(hostname), '
        'GPUs: ${SLURM_JOB_GPUS:-${CUDA_VISIBLE_DEVICES:-none}}"',
        "exec swarm serve --leave-before 300 --model Qwen/Qwen2.5-7B --num-blocks 8 --leave-before 300"]
    single = render_script(SlurmConfig(), ("--model", "a model dir; rm -rf ~"))  # quoted, never run as shell
    assert "#SBATCH --output=swarm-%j.out" in single and "--array" not in single
    assert single.endswith(f"serve --leave-before 120 --model 'a model dir; rm -rf ~'\n")
    assert f"exec {shlex.quote(sys.executable)} -m swarm.cli serve" in single  # this Python, by default
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_bad_slurm_requests_are_refused_before_submitting():
    with pytest.raises(ConfigError, match="leaves no time to serve"):
        render_script(SlurmConfig(time="2"), ("--model", "m"))  # 120 s walltime, leaving 120 s before
    with pytest.raises(ConfigError, match="flags after -- are not valid: .*arguments are required: --model"):
        render_script(SlurmConfig(), ("--modle", "m"))
    with pytest.raises(ConfigError, match="needs the `swarm serve` flags after --"):
        render_script(SlurmConfig(), ())
    for bad in (dict(array=0), dict(gres="gpu:1\n#SBATCH --uid=0"), dict(partition="a b"),
                dict(sbatch_args=("--x\nrm -rf /",)), dict(sbatch_args=("account=x",)), dict(modules=("a\nb",))):
        with pytest.raises(ConfigError):
            SlurmConfig(**bad)


def test_swarm_slurm_without_sbatch_says_where_to_run_it(tmp_path, monkeypatch, capsys):
    from swarm.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(["slurm", "--script", str(tmp_path / "s.sbatch"), "--", "--model", "m"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err
    assert (tmp_path / "s.sbatch").read_text().startswith("#!/bin/bash")
