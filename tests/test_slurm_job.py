"""The Slurm job a process runs in (swarm/slurm.py): its environment and its end time, as Slurm reports them."""

from __future__ import annotations

import datetime

from swarm.slurm import SlurmJob, end_time, parse_end_time


def test_job_from_env():
    assert SlurmJob.from_env({}) is None and SlurmJob.from_env({"SLURM_JOB_ID": " "}) is None
    job = SlurmJob.from_env({"SLURM_JOB_ID": "1235", "SLURM_ARRAY_JOB_ID": "1233", "SLURM_ARRAY_TASK_ID": "2",
                             "SLURM_JOB_NAME": "swarm-llama", "SLURMD_NODENAME": "gpu17", "SLURM_JOB_PARTITION": "a100",
                             "SLURM_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "0,1", "HOME": "/home/x"})
    assert job.label == "job 1233_2" and job.gres == {"SLURM_JOB_GPUS": "0,1", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert job.describe() == ("job 1233_2 (swarm-llama), node gpu17, partition a100, SLURM_JOB_GPUS=0,1 "
                              "CUDA_VISIBLE_DEVICES=0,1")
    assert SlurmJob.from_env({"SLURM_JOB_ID": "7"}).describe() == "job 7"


def test_end_time_formats():
    assert parse_end_time("1714567890") == 1714567890.0  # SLURM_TIME_FORMAT=%s
    local = datetime.datetime(2024, 5, 1, 12, 34, 56).timestamp()
    assert parse_end_time("2024-05-01T12:34:56") == local  # Slurm's default format, local time
    assert parse_end_time("JobId=7 JobName=x\n   StartTime=2024-05-01T12:00:00 EndTime=2024-05-01T12:34:56 x") == local
    for unknown in ("Unknown", "N/A", "NONE", "", "EndTime=Unknown", "12:00"):
        assert parse_end_time(unknown) is None


def test_end_time_asks_slurm_first_and_falls_back():
    job = SlurmJob("7")
    asked: list[list[str]] = []

    def slurm(answers):
        def run(argv, env):
            asked.append(argv)
            assert env["SLURM_TIME_FORMAT"] == "%s"
            return answers.get(argv[0])
        return run

    env = {"SLURM_JOB_END_TIME": "1700000000"}
    assert end_time(job, env, slurm({"squeue": "1714567890\n"})) == 1714567890.0  # squeue follows `scontrol update`
    assert asked[0] == ["squeue", "--noheader", "--jobs", "7", "--format", "%e"]
    assert end_time(job, env, slurm({"squeue": "", "scontrol": "JobId=7 EndTime=1714560000"})) == 1714560000.0
    assert end_time(job, env, slurm({})) == 1700000000.0  # no Slurm commands: the value set at the start
    assert end_time(job, {}, slurm({})) is None
