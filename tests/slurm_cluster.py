"""A real one-node Slurm cluster on 127.0.0.1 for tests: ``munged``, ``slurmctld`` and ``slurmd`` from
Debian's ``munge`` and ``slurm-wlm`` packages, started as root with a generated ``slurm.conf``, every
file (key, sockets, state, spool, logs) in one temp dir; :meth:`SlurmCluster.close` stops them by pid.

Client commands (``sbatch``, ``squeue``, ``scontrol``) find the cluster through ``SLURM_CONF`` in
:attr:`SlurmCluster.env`; jobs inherit it, so ``squeue`` works inside a job too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
NODE = "swarmnode"


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None and not os.path.exists(f"/usr/sbin/{name}")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, workdir: str, cpus: int = 4, kill_wait: int = 5):
        self.dir = workdir
        self.cpus, self.kill_wait = cpus, kill_wait
        self.procs: list[subprocess.Popen] = []
        self.conf = os.path.join(workdir, "slurm.conf")
        self.munge_socket = os.path.join(workdir, "munge.socket")
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def _write_config(self) -> None:
        for sub in ("state", "spool", "munge"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        d = self.dir
        lines = [
            "ClusterName=swarmtest", "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides", "MpiDefault=none", "ReturnToService=2",
            f"KillWait={self.kill_wait}", "MinJobAge=600", "InactiveLimit=0", "MessageTimeout=10",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            f"NodeName={NODE} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            "RealMemory=4000 State=UNKNOWN",
            f"PartitionName=swarm Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        with open(os.path.join(self.dir, log), "w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_config()
        key = os.path.join(self.dir, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn([_binary("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--pid-file={self.dir}/munge/munged.pid",
                     f"--log-file={self.dir}/munge/munged.log", f"--seed-file={self.dir}/munge/munged.seed"],
                    "munged.out")
        self._wait(lambda: os.path.exists(self.munge_socket), timeout, "munged to open its socket")
        self._spawn([_binary("slurmctld"), "-D", "-c", "-i", "-f", self.conf], "slurmctld.out")
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout,
                   "slurmctld to answer `scontrol ping`")
        self._spawn([_binary("slurmd"), "-D", "-N", NODE, "-f", self.conf], "slurmd.out")
        self._wait(lambda: self._node_state() in ("IDLE", "MIXED", "ALLOCATED"), timeout, "the node to be idle")
        return self

    def _node_state(self) -> str:
        done = self.run("sinfo", "--noheader", "--nodes", NODE, "--format", "%T", check=False)
        return done.stdout.strip().upper().rstrip("*~#$@+!%")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a Slurm daemon exited ({dead[0].args[0]}) while waiting for {what}:\n{self.logs()}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("munged.out", "slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    parts.append(f"--- {name}\n{f.read()[-2500:]}")
        return "\n".join(parts)

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def job_state(self, job_id: str) -> str:
        """``RUNNING``, ``PENDING``, ``COMPLETED``, ``TIMEOUT``... as ``scontrol show job`` says."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def close(self) -> None:
        """Cancels this cluster's jobs and waits for them, stops the daemons, then kills by pid anything left
        that carries this cluster's ``SLURM_CONF`` (a job's processes, should slurmd have died first)."""
        if self.procs:
            jobs = self.run("squeue", "--noheader", "--format", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", "--full", *jobs, check=False)
                deadline = time.monotonic() + self.kill_wait + 20
                while time.monotonic() < deadline and self.run("squeue", "--noheader", check=False).stdout.strip():
                    time.sleep(0.3)
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                stop_group(proc)
        self.procs.clear()
        for pid in self.leftover_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def leftover_pids(self) -> list[int]:
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                with contextlib.suppress(OSError):
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        if marker in f.read().split(b"\0"):
                            found.append(int(entry))
        return found

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM to ``proc``'s group (a daemon and anything it started), then SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue
