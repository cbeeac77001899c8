"""Server-published pings (server/pings.py): which servers a server pings, how it smooths and drops
them, and, on real peers, that a server publishes its round trip to the next server in its record."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from server import pings as next_pings
from server.pings import NextPings, next_candidates
from swarm import aio
from swarm.dht import Peer, fetch_servers
from swarm.errors import ServerUnavailable
from swarm.local_swarm import LocalSwarm, Proc
from swarm.records import ServerRecord, ServerState
from swarm.swarm_state import merge_servers

from peer_helpers import join


def rec(start: int, end: int, throughput: float = 1.0, state: ServerState = ServerState.ONLINE) -> ServerRecord:
    return ServerRecord(state=state, start=start, end=end, throughput=throughput)


def test_next_candidates_are_online_servers_of_the_end_block_fastest_first():
    servers = {"self": rec(2, 6), "slow": rec(4, 8, 1.0), "fast": rec(3, 5, 9.0), "joining": rec(4, 6, 50.0,
               ServerState.JOINING), "offline": rec(4, 8, 50.0, ServerState.OFFLINE), "before": rec(0, 4, 50.0)}
    assert next_candidates(servers, "self", 4) == ["fast", "slow"]
    many = {f"p{i:02d}": rec(4, 8, float(i % 3)) for i in range(20)}
    chosen = next_candidates(many, "self", 4)
    assert len(chosen) == next_pings.MAX_NEXT_PEERS and all(many[p].throughput == 2.0 for p in chosen[:6])


def test_next_pings_smooth_and_drop_vanished_or_silent_servers(monkeypatch):
    answers: dict[str, float | None] = {"a": 0.010, "b": 0.020}

    async def fake_ping(p2p, peer_id: str, timeout: float) -> float:
        rtt = answers[peer_id]
        if rtt is None:
            raise ServerUnavailable(f"server {peer_id} did not answer in {timeout:.0f}s")
        return rtt

    bandwidths: dict[str, float | None] = {"a": 1e6, "b": None}  # b: a fast link, the probe cannot tell

    async def fake_bandwidth(p2p, peer_id: str, rtt: float, timeout: float) -> float | None:
        return bandwidths[peer_id]

    monkeypatch.setattr(next_pings.transport, "ping", fake_ping)
    monkeypatch.setattr(next_pings.transport, "bandwidth", fake_bandwidth)
    tracker = NextPings(p2p=None)
    assert aio.run(tracker.update(["a", "b"])) == {"a": 0.010, "b": 0.020}
    assert tracker.bandwidths == {"a": 1e6}
    answers.update(a=0.020, c=0.005)
    bandwidths.update(a=2e6, c=5e5)
    published = aio.run(tracker.update(["a", "c"]))  # b left the candidates
    assert published == pytest.approx({"a": 0.7 * 0.010 + 0.3 * 0.020, "c": 0.005})
    assert tracker.bandwidths == pytest.approx({"a": 0.7 * 1e6 + 0.3 * 2e6, "c": 5e5})
    answers["a"] = None  # a stops answering: no route should count on pushing to it
    assert aio.run(tracker.update(["a", "c"])) == pytest.approx({"c": 0.005})
    assert set(tracker.bandwidths) == {"c"}
    tracker.clear()
    assert tracker.rtts == {} and tracker.bandwidths == {}


# ---------------------------------------------------------------- on real peers


@pytest.mark.integration
def test_a_server_publishes_its_round_trip_to_the_next_server(tiny_llama, tmp_path):
    with LocalSwarm(log_dir=str(tmp_path)) as swarm:
        swarm.start_dht()
        common = ("--dht-prefix", "next-pings", "--throughput", "100", "--num-threads", "1", "--update-period", "1")
        first, last = (swarm.start_server(tiny_llama, span, *common, wait=False) for span in ("0:2", "2:4"))
        first_id, last_id = _peer_id(first), _peer_id(last)

        async def scenario() -> None:
            peer = await join(swarm.initial_peers)
            try:
                servers = await _wait_until(peer, lambda s: last_id in s.get(first_id, _NONE).next_pings and
                                            s.get(last_id, _NONE).state == ServerState.ONLINE,
                                            "the first server publishing a ping to the last")
                assert 0.0 < servers[first_id].next_pings[last_id] < 1.0  # loopback: milliseconds
                assert list(servers[first_id].next_pings) == [last_id]
                assert servers[last_id].next_pings == {}  # nothing comes after block 4 of 4

                assert swarm.stop(last) == 0  # announces OFFLINE: the first server stops publishing its ping
                await _wait_until(peer, lambda s: s[first_id].next_pings == {}, "the ping to a gone server dropped")
            finally:
                await peer.shutdown()

        aio.run(scenario())
        assert "Traceback" not in first.log()


_NONE = ServerRecord(state=ServerState.OFFLINE, start=0, end=1)


async def _wait_until(peer: Peer, condition: Callable[[dict[str, ServerRecord]], bool], what: str,
                      timeout: float = 60.0) -> dict[str, ServerRecord]:
    deadline = time.monotonic() + timeout
    servers: dict[str, ServerRecord] = {}
    while time.monotonic() < deadline:
        servers = merge_servers(await fetch_servers(peer, "next-pings", list(range(4))))
        if condition(servers):
            return servers
        await asyncio.sleep(0.2)
    shown = {p[-6:]: (r.state.name, f"{r.start}:{r.end}", r.next_pings) for p, r in servers.items()}
    raise AssertionError(f"{what} did not happen within {timeout:.0f}s; the DHT shows {shown}")


def _peer_id(proc: Proc) -> str:
    return proc.wait_for("Server ONLINE", 180).split(" as ")[1].split()[0]
