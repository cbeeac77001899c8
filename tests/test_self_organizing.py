"""A swarm that organizes itself, on real peers: servers without ``--blocks`` place themselves where the
swarm is weakest and move when it becomes lopsided (server/rebalancer.py, swarm/placement.py).

Every wait polls the DHT (or a log line) with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from swarm import aio
from swarm.dht import NetworkConfig, Peer, fetch_servers
from swarm.local_swarm import LocalSwarm, Proc
from swarm.placement import block_totals
from swarm.records import ServerRecord, ServerState
from swarm.swarm_state import merge_servers
from swarm.tiny import make_tiny_model

pytestmark = pytest.mark.integration

NUM_BLOCKS = 8
FAST = ("--num-threads", "1", "--rebalance-period", "1")  # checks every 0.5-1.5 s


class DHTWatcher:
    """A client-mode DHT peer on its own event-loop thread, for reading the swarm from sync test code."""

    def __init__(self, initial_peers: list[str]):
        self.loop = aio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dht-watcher", daemon=True)
        self.thread.start()
        self.peer: Peer = self._call(Peer.start(NetworkConfig(
            initial_peers=tuple(initial_peers), host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=True)))

    def _call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def servers(self, prefix: str) -> dict[str, ServerRecord]:
        """One record per server of ``prefix``, by peer id."""
        return merge_servers(self._call(fetch_servers(self.peer, prefix, list(range(NUM_BLOCKS)))))

    def wait_until(self, prefix: str, condition: Callable[[dict[str, ServerRecord]], bool], what: str,
                   timeout: float = 120) -> dict[str, ServerRecord]:
        deadline = time.monotonic() + timeout
        delay = 0.1
        servers: dict[str, ServerRecord] = {}
        while time.monotonic() < deadline:
            servers = self.servers(prefix)
            if condition(servers):
                return servers
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        spans = {p[-6:]: (r.state.name, f"{r.start}:{r.end}") for p, r in servers.items()}
        raise AssertionError(f"{what} did not happen within {timeout:.0f}s; the DHT shows {spans}")

    def close(self) -> None:
        try:
            self._call(self.peer.shutdown(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def tiny_llama8(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-llama-8"), "llama", num_hidden_layers=8)


@pytest.fixture(scope="module")
def local_llama8(tiny_llama8):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama8, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with LocalSwarm(log_dir=str(tmp_path_factory.mktemp("self-organizing"))) as local:
        local.start_dht()
        yield local


@pytest.fixture(scope="module")
def watcher(swarm):
    dht = DHTWatcher(swarm.initial_peers)
    yield dht
    dht.close()


def _online_everywhere(servers: dict[str, ServerRecord]) -> bool:
    online = [r for r in servers.values() if r.state == ServerState.ONLINE]
    return all(any(r.start <= b < r.end for r in online) for b in range(NUM_BLOCKS))


def _generate_matches_local(model_path: str, swarm: LocalSwarm, prefix: str, local_model) -> None:
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers,
                                                            dht_prefix=prefix, torch_dtype="float32")
    model.generation_config.eos_token_id = None
    try:
        ids = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(11))
        remote = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(remote, local_model.generate(ids, max_new_tokens=12, do_sample=False))
    finally:
        model.shutdown()


def _peer_id(proc: Proc) -> str:
    return proc.wait_for("Server ONLINE", 5).split(" as ")[1].split()[0]


@contextlib.contextmanager
def _servers(swarm: LocalSwarm) -> Iterator[list[Proc]]:
    """Collects the servers a test starts and stops them together at its end (in parallel: each takes seconds)."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            swarm.stop(proc, timeout=30)


def test_servers_without_blocks_cover_the_model(tiny_llama8, local_llama8, swarm, watcher):
    # started at once, both may pick 0:4 from an empty DHT: then one of them moves
    with _servers(swarm) as procs:
        procs += [swarm.start_server(tiny_llama8, None, "--dht-prefix", "auto", "--num-blocks", "4", *FAST, wait=False,
                                     name=f"auto{i}") for i in range(2)]
        for proc in procs:
            proc.wait_for("Server ONLINE", 180)
        servers = watcher.wait_until("auto", lambda s: len(s) == 2 and _online_everywhere(s), "covering blocks 0:8")
        assert sorted((r.start, r.end) for r in servers.values()) == [(0, 4), (4, 8)]
        for record in servers.values():  # measured (or cached) on this machine and published
            assert record.throughput > 0 and record.forward_rps > 0 and record.inference_rps > 0
            assert record.network_rps == 0.0 and not record.using_relay
        logs = "".join(proc.log() for proc in procs)
        assert "Throughput: inference" in logs and "Memory budget" not in logs  # --num-blocks skips the budget
        _generate_matches_local(tiny_llama8, swarm, "auto", local_llama8)


def test_a_joining_server_goes_to_the_weak_blocks_and_moves_when_the_swarm_becomes_lopsided(
        tiny_llama8, local_llama8, swarm, watcher):
    with _servers(swarm) as procs:
        # blocks 0:4 offer 10 tokens/s, blocks 4:8 only 5
        procs += [swarm.start_server(tiny_llama8, span, "--dht-prefix", "lopsided", "--throughput", speed,
                                     "--num-threads", "1", wait=False, name=name)
                  for span, speed, name in (("0:4", "10", "lopsided_left"), ("4:8", "5", "lopsided_right"))]
        left, right = procs
        watcher.wait_until("lopsided", lambda s: len(s) == 2 and _online_everywhere(s), "two pinned servers online")

        # a third server (5 blocks) joins where the swarm is weakest: 3:8
        mover = swarm.start_server(tiny_llama8, None, "--dht-prefix", "lopsided", "--num-blocks", "5", "--throughput",
                                   "10", "--network-rps", "5000", "--no-use-relay", *FAST, name="lopsided_auto")
        procs.append(mover)
        mover_id = _peer_id(mover)
        servers = watcher.wait_until("lopsided", lambda s: mover_id in s and s[mover_id].state == ServerState.ONLINE,
                                     "the third server coming online")
        record = servers[mover_id]
        assert (record.start, record.end) == (3, 8)
        assert (record.throughput, record.network_rps, record.forward_rps) == (10.0, 5000.0, 0.0)  # --throughput wins
        assert not record.using_relay
        log = mover.log()
        assert "Placing this server at blocks 3:8" in log and "--throughput; not measured" in log
        by_block = {b: {p: r for p, r in servers.items() if r.start <= b < r.end} for b in range(NUM_BLOCKS)}
        assert block_totals(by_block, NUM_BLOCKS) == [10.0, 10.0, 10.0, 20.0, 15.0, 15.0, 15.0, 15.0]

        # the left server stops: blocks 0:3 have no server, so the third one moves there, keeping blocks 3 and 4
        assert swarm.stop(left, timeout=60) == 0  # it announces OFFLINE
        servers = watcher.wait_until("lopsided", lambda s: s[mover_id].state == ServerState.ONLINE and
                                     (s[mover_id].start, s[mover_id].end) == (0, 5), "the third server moving to 0:5")
        log = mover.log()
        assert "Moving from blocks 3:8 to 0:5: the swarm would have 0 block(s) without a server instead of 3" in log
        assert "kept 2 block(s)" in log
        moved = log[log.index("Moving from blocks"):]
        assert "Loading blocks 0:3" in moved and "Loading blocks 3:" not in moved  # blocks 3 and 4 were kept
        assert "Traceback" not in log
        assert servers[_peer_id(right)].state == ServerState.ONLINE
        _generate_matches_local(tiny_llama8, swarm, "lopsided", local_llama8)
