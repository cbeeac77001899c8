"""Servers as Slurm batch jobs, on a real Slurm cluster (munged, slurmctld, slurmd on 127.0.0.1:
tests/slurm_cluster.py): ``swarm slurm`` submits a job array of two servers that join a swarm the
test started; a generation runs through them; one job's time limit is brought forward mid-generation
(``scontrol update EndTime=``) and its server leaves before it: OFFLINE in the DHT while the job
still runs, its session handed over, the job done before its end. The output equals local
transformers' fault-free run."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
import uuid

import pytest
import torch

from client.loop import run_sync
from slurm_cluster import SlurmCluster, missing_binaries
from swarm.errors import ServerUnavailable
from swarm.local_swarm import LocalSwarm
from swarm.records import ServerState
from swarm.transport import Stream
from swarm.wire import OpenSession

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"Slurm/munge binaries not installed: {missing_binaries()} "
                       "(Debian: apt-get install slurm-wlm munge; .ci/run installs them)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd runs jobs as their users, so it must run as root"),
]

LEAVE_BEFORE = 20.0  # seconds: the server polls Slurm every 5 s (server.walltime.poll_period)


def _wait(what: str, ready, timeout: float, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


async def _open_session(model, peer_id: str) -> str:
    """Tries to open a new session on ``peer_id``; returns the error it answers with."""
    peer = await model.remote.peer()
    stream = await Stream.open(peer.p2p, peer_id, "inference", 10)
    try:
        await stream.send(OpenSession(session_id=uuid.uuid4().hex, start=0, end=4, max_length=16))
        try:
            reply = await stream.receive(10)
        except ServerUnavailable as e:
            return str(e)
        return f"opened: {reply}"
    finally:
        stream.close()


class _LeaveAfter:
    """A streamer that, after ``after`` tokens, brings forward the time limit of the job serving the
    session and holds the generation until that job's server has left the swarm and the job ended."""

    def __init__(self, test, after: int):
        self.test, self.after, self.count = test, after, -1
        self.victim: str | None = None
        self.seen_offline_while_running = False
        self.refused = ""
        self.end_time = 0.0
        self.finished_at = 0.0

    def put(self, value) -> None:
        self.count += 1  # the first put is the prompt
        if self.count != self.after or self.victim is not None:
            return
        test = self.test
        peer_id = test.session.chain[0].peer_id
        self.victim = next(task for task, log in test.logs.items() if peer_id in _read(log))
        job = f"{test.job_id}_{self.victim}"
        self.end_time = time.time() + LEAVE_BEFORE + 5
        stamp = datetime.datetime.fromtimestamp(self.end_time).strftime("%Y-%m-%dT%H:%M:%S")
        test.cluster.run("scontrol", "update", f"JobId={job}", f"EndTime={stamp}")

        def offline_in_dht() -> bool:
            servers = run_sync(test.model.remote.servers(force=True))
            record = servers[0].get(peer_id)
            return record is not None and record.state == ServerState.OFFLINE

        _wait("the job's server to announce OFFLINE", offline_in_dht, 60, step=1.0)
        self.seen_offline_while_running = test.cluster.job_state(job) == "RUNNING"
        self.refused = run_sync(_open_session(test.model, peer_id))  # while it drains its open sessions
        _wait("the job to end", lambda: test.cluster.job_state(job) not in ("RUNNING", "COMPLETING"), 60)
        self.finished_at = time.time()

    def end(self) -> None:
        pass


def test_slurm_array_serves_and_leaves_before_its_time_limit(tiny_llama, local_llama, tmp_path):
    ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(5))
    expected = local_llama.generate(ids, max_new_tokens=16, do_sample=False)
    with LocalSwarm(log_dir=str(tmp_path / "local")) as local, SlurmCluster(str(tmp_path / "slurm")) as cluster:
        dht = local.start_dht()
        submitted = subprocess.run(
            [sys.executable, "-m", "swarm.cli", "slurm", "--array", "2", "--time", "10", "--job-name", "swarm-test",
             "--output", str(tmp_path / "job-%A_%a.out"), "--script", str(tmp_path / "serve.sbatch"), "--",
             "--model", tiny_llama, "--num-threads", "1", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
             "--initial-peers", dht, "--leave-before", str(LEAVE_BEFORE), "--update-period", "5"],
            env={**cluster.env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        test = type("T", (), {})()  # what the streamer needs
        test.cluster = cluster
        test.job_id = submitted.stdout.split("Submitted batch job ")[1].split(":")[0]
        test.logs = {task: str(tmp_path / f"job-{test.job_id}_{task}.out") for task in ("0", "1")}
        for task, log in test.logs.items():
            job = f"{test.job_id}_{task}"
            _wait(f"job {job} to print Server ONLINE", lambda: "Server ONLINE" in _read(log)
                  or (cluster.job_state(job) not in ("PENDING", "RUNNING", "CONFIGURING") and
                      pytest.fail(f"job {job} ended: {cluster.job_state(job)}\n{_read(log)[-3000:]}")), 240)
            stdout_path = cluster.run("scontrol", "show", "job", job).stdout.split("StdOut=")[1].split()[0]
            assert stdout_path == log  # where squeue/scontrol users look
            assert "Running in Slurm job" in _read(log) and "blocks 0:4" in _read(log)  # placed itself: all 4 blocks

        from swarm import AutoDistributedModelForCausalLM

        test.model = AutoDistributedModelForCausalLM.from_pretrained(
            tiny_llama, initial_peers=local.initial_peers, request_timeout=20, missing_blocks_timeout=5)
        test.model.generation_config.eos_token_id = None
        try:
            with test.model.inference_session(max_length=64) as session:
                test.session = session
                streamer = _LeaveAfter(test, after=5)
                out = test.model.generate(ids, max_new_tokens=16, do_sample=False, session=session, streamer=streamer)
                assert streamer.victim is not None and session.failovers >= 1
                survivor = "1" if streamer.victim == "0" else "0"
                assert session.chain[0].peer_id in _read(test.logs[survivor])  # went on through the other job
        finally:
            test.model.shutdown()
        assert torch.equal(out, expected)

        victim_job = f"{test.job_id}_{streamer.victim}"
        assert streamer.seen_offline_while_running  # OFFLINE was in the DHT before Slurm ended the job
        assert "this server takes no new sessions: Slurm job" in streamer.refused  # while its old one went on
        assert streamer.finished_at < streamer.end_time  # it left before its time limit
        assert cluster.job_state(victim_job) == "COMPLETED"  # exit 0, not TIMEOUT or FAILED
        log = _read(test.logs[streamer.victim])
        assert f"Leaving the swarm: Slurm job {victim_job} reaches its time limit" in log
        assert cluster.job_state(f"{test.job_id}_{survivor}") == "RUNNING"
