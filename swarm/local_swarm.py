"""A whole swarm on 127.0.0.1 as child processes: for ``swarm demo``, tests and benchmarks.

Each peer is a real ``swarm dht`` / ``swarm serve`` process (with its own ``p2pd``) in its own
process group. Readiness is a line the process prints once it is ready (the DHT peer's address,
``Server ONLINE``); every wait is bounded, and :meth:`LocalSwarm.close` stops every process it
started (SIGTERM, then SIGKILL to the group) and removes the sockets they left.

With ``wan=LinkShape(delay, bandwidth)`` every server listens on a private port behind its own
delaying proxy (:mod:`swarm.wan`, one process per server) and announces the proxy's address, so every
connection to it, the client's and other servers', carries that shape.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time

from swarm.dht import clean_peer_sockets, die_with_parent, peer_sockets
from swarm.errors import SwarmError
from swarm.wan import READY, LinkShape, free_port

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@dataclasses.dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: str
    started: float

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for(self, text: str, timeout: float) -> str:
        """Returns the first log line containing ``text``; raises if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if text in line:
                    return line
            if self.popen.poll() is not None:
                raise SwarmError(f"{self.name} exited with code {self.popen.returncode} before printing "
                                 f"{text!r}; its log:\n{self.log()[-3000:]}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)
        raise SwarmError(f"{self.name} did not print {text!r} within {timeout:.0f}s; its log:\n{self.log()[-3000:]}")


def threads_per_process(processes: int) -> int:
    """Torch threads for each of ``processes`` compute-heavy processes sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def api_url(proc: Proc, timeout: float = 120) -> str:
    """The base URL (``http://127.0.0.1:PORT/``) of a ``swarm api`` process, once it serves."""
    line = proc.wait_for("OpenAI-compatible API: ", timeout)
    return line.split("OpenAI-compatible API: ", 1)[1].split()[0].removesuffix("v1")


class LocalSwarm:
    """``with LocalSwarm() as swarm: peer = swarm.start_dht(); swarm.start_server(model, "0:2")``."""

    def __init__(self, log_dir: str | None = None, env: dict[str, str] | None = None, threads: int | None = None,
                 wan: LinkShape | None = None):
        """``threads``: torch threads of each server started without its own ``--num-threads`` (processes
        on one machine that each take every core slow each other down; see :func:`threads_per_process`).
        ``wan``: the shape of every server's links, if any."""
        self.threads = threads
        self.wan = wan
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="swarm-local-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.procs: list[Proc] = []
        self.initial_peers: list[str] = []
        self._dhts: list[Proc] = []  # started by start_dht
        self._shared_proxies: dict[str, tuple[int, int]] = {}  # server name -> (its port, proxy port)
        self._sockets_before = peer_sockets()

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None, module: str = "swarm.cli") -> Proc:
        log_path = os.path.join(self.log_dir, f"{name}.log")
        with open(log_path, "w") as log:
            popen = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**self.env, **(env or {})},
                                     # a test run killed by a timeout must not leave servers behind
                                     start_new_session=True, preexec_fn=die_with_parent)
        proc = Proc(name, popen, log_path, time.monotonic())
        self.procs.append(proc)
        return proc

    def start_dht(self, *extra: str, timeout: float = 60) -> str:
        """Starts ``swarm dht`` (plus ``extra`` flags); returns its full multiaddr."""
        proc = self._spawn(f"dht{len(self.procs)}", ["dht", "--host-maddrs", LOOPBACK, *extra])
        self._dhts.append(proc)
        maddr = proc.wait_for("/p2p/", timeout).strip()
        self.initial_peers.append(maddr)
        return maddr

    def start_server(self, model: str, blocks: str | None, *extra: str, wait: bool = True,
                     timeout: float = 180, name: str | None = None, env: dict[str, str] | None = None,
                     wan: LinkShape | None = None) -> Proc:
        """Starts ``swarm serve`` (``env``: extra environment variables for this process only; ``wan``: this
        server's link shape instead of the swarm's)."""
        name = name or f"server{len(self.procs)}_{(blocks or 'all').replace(':', '_')}"
        args = ["serve", "--model", model, *self.listen_args(name, wan or self.wan), *extra]
        if self.threads is not None and "--num-threads" not in extra:
            args += ["--num-threads", str(self.threads)]
        if blocks is not None:
            args += ["--blocks", blocks]
        if self.initial_peers:
            args += ["--initial-peers", *self.initial_peers]
        proc = self._spawn(name, args, env)
        if wait:
            proc.wait_for("Server ONLINE", timeout)
        return proc

    def listen_args(self, name: str, shape: LinkShape | None, flag: str = "--{}-maddrs") -> list[str]:
        """A server's listen flags: loopback, or with ``shape`` (or a proxy :meth:`start_shared_proxy` started
        for ``name``) a private port behind a proxy it announces. ``flag`` spells the flags (``"--{}_maddrs"``
        for Petals' servers)."""
        if name in self._shared_proxies:
            port, proxy_port = self._shared_proxies.pop(name)
        elif shape is None:
            return [flag.format("host"), LOOPBACK]
        else:
            port, proxy_port = self.start_proxy(name, shape)
        return [flag.format("host"), f"/ip4/127.0.0.1/tcp/{port}",
                flag.format("announce"), f"/ip4/127.0.0.1/tcp/{proxy_port}"]

    def start_proxy(self, name: str, shape: LinkShape, timeout: float = 30) -> tuple[int, int]:
        """Starts a proxy for a server about to listen; returns (the server's port, the proxy's port)."""
        port, proxy_port = free_port(), free_port()
        while proxy_port == port:
            proxy_port = free_port()
        proc = self._spawn(f"{name}-wan", ["--listen", str(proxy_port), "--target", str(port), *shape.args()],
                           module="swarm.wan")
        proc.wait_for(READY, timeout)
        return port, proxy_port

    def start_shared_proxy(self, names: list[str], shape: LinkShape, access_bandwidth: float,
                           access_from: str = "127.0.0.2", timeout: float = 30) -> None:
        """One proxy process for the servers ``names`` (started next, with those names), every byte they send
        back to a client listening on ``access_from`` sharing one link of ``access_bandwidth`` bytes/s: that
        client's downlink (:mod:`swarm.wan`)."""
        ports: set[int] = set()
        while len(ports) < 2 * len(names):
            ports.add(free_port())
        pairs = list(zip(list(ports)[::2], list(ports)[1::2]))  # (server port, proxy port)
        args = [arg for port, proxy_port in pairs for arg in ("--listen", str(proxy_port), "--target", str(port))]
        proc = self._spawn("access-wan", [*args, *shape.args(), "--access-bandwidth", repr(access_bandwidth),
                                          "--access-from", access_from],
                           module="swarm.wan")
        proc.wait_for(READY, timeout)
        self._shared_proxies.update(zip(names, pairs))

    def start_api(self, *extra: str, name: str | None = None) -> Proc:
        """Starts ``swarm api`` on 127.0.0.1 and a free port (plus ``extra`` flags); :func:`api_url` waits for it."""
        args = ["api", "--host", "127.0.0.1", "--port", "0", "--host-maddrs", LOOPBACK,
                "--initial-peers", *self.initial_peers, *extra]
        return self._spawn(name or f"api{len(self.procs)}", args)

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Stops one process (by pid first, so it can announce OFFLINE), then its whole group."""
        return self.stop_all([proc], sig, timeout)[0]

    def stop_all(self, procs: list[Proc], sig: int = signal.SIGTERM, timeout: float = 20) -> list[int]:
        """Stops processes together: signals each (by pid first, so it can announce OFFLINE), gives them
        ``timeout`` seconds in all, then kills their whole groups (p2pd children, or a process that hung)."""
        for proc in procs:
            if proc.popen.poll() is None:
                try:
                    proc.popen.send_signal(sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        codes = []
        for proc in procs:
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                codes.append(proc.popen.wait(5))
            except subprocess.TimeoutExpired:
                codes.append(-9)
        return codes

    def close(self) -> None:
        """Stops every server and client together, then the DHT peers (so servers can still announce OFFLINE)."""
        procs = list(reversed(self.procs))
        self.stop_all([proc for proc in procs if proc not in self._dhts])
        self.stop_all([proc for proc in procs if proc in self._dhts])
        clean_peer_sockets(keep=self._sockets_before)

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
