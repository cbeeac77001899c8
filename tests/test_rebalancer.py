"""The server's placement loop (server/rebalancer.py) over a fake DHT: what it reads, when it moves."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from typing import cast

import pytest

import server.rebalancer
from server.rebalancer import MovableServer, Rebalancer, initial_span
from swarm.records import ServerRecord, ServerState

ONLINE, JOINING = ServerState.ONLINE, ServerState.JOINING


class FakePeerID:
    def __init__(self, name: str):
        self.name = name

    def to_base58(self) -> str:
        return self.name


@dataclasses.dataclass
class FakePeer:
    peer_id: FakePeerID


@dataclasses.dataclass
class FakeServer:
    peer: FakePeer
    state: ServerState
    start: int
    end: int
    offered_throughput: float = 10.0
    moves: list[tuple[int, int, str]] = dataclasses.field(default_factory=list)

    async def move_to(self, start: int, end: int, reason: str) -> None:
        self.moves.append((start, end, reason))
        self.start, self.end = start, end


def by_block(servers: dict[str, ServerRecord], num_blocks: int = 8) -> dict[int, dict[str, ServerRecord]]:
    return {b: {p: r for p, r in servers.items() if r.start <= b < r.end} for b in range(num_blocks)}


@pytest.fixture
def dht(monkeypatch):
    """The records the fake DHT returns (``dht["records"]``) and the lookups made (``dht["calls"]``)."""
    state: dict = {"records": {}, "calls": [], "error": None}

    async def fake_fetch(peer, prefix, blocks):
        state["calls"].append((prefix, list(blocks)))
        if state["error"] is not None:
            raise state["error"]
        return by_block(state["records"])

    monkeypatch.setattr(server.rebalancer, "fetch_servers", fake_fetch)
    return state


def rebalancer_for(server: FakeServer, quality: float = 1.3) -> Rebalancer:
    return Rebalancer(cast(MovableServer, server), prefix="m", num_blocks=8, period=10.0, balance_quality=quality, rng=random.Random(0))


def test_initial_span_picks_the_weakest_window_and_ignores_its_own_old_records(dht):
    dht["records"] = {"a": ServerRecord(ONLINE, 0, 4, throughput=10), "me": ServerRecord(ONLINE, 4, 8, throughput=10)}
    span = asyncio.run(initial_span(FakePeer(FakePeerID("me")), "m", 8, 4, throughput=None))
    assert span == (4, 8) and dht["calls"] == [("m", list(range(8)))]


def test_initial_span_of_the_whole_model_reads_nothing(dht):
    assert asyncio.run(initial_span(FakePeer(FakePeerID("me")), "m", 8, 8, throughput=5.0)) == (0, 8)
    assert dht["calls"] == []


def test_check_moves_when_placement_says_so(dht):
    me = FakeServer(FakePeer(FakePeerID("me")), ONLINE, 0, 4)
    dht["records"] = {"a": ServerRecord(ONLINE, 0, 4, throughput=10), "me": ServerRecord(ONLINE, 0, 4, throughput=10)}
    assert asyncio.run(rebalancer_for(me).check())
    assert [(s, e) for s, e, _ in me.moves] == [(4, 8)]
    assert "without a server" in me.moves[0][2]


def test_check_stays_on_equal_options_and_while_not_online(dht):
    dht["records"] = {"a": ServerRecord(ONLINE, 0, 4, throughput=10), "me": ServerRecord(ONLINE, 4, 8, throughput=10)}
    me = FakeServer(FakePeer(FakePeerID("me")), ONLINE, 4, 8)
    assert not asyncio.run(rebalancer_for(me, quality=1.0).check()) and me.moves == []
    # blocks 0:4 lose their server, but a server still loading its span never moves (nor reads the DHT)
    dht["records"]["a"] = ServerRecord(ServerState.OFFLINE, 0, 4, throughput=10)
    calls = len(dht["calls"])
    loading = FakeServer(FakePeer(FakePeerID("me")), JOINING, 4, 8)
    assert not asyncio.run(rebalancer_for(loading).check()) and loading.moves == []
    assert len(dht["calls"]) == calls


def test_a_failed_lookup_skips_one_check(dht, caplog):
    dht["error"] = TimeoutError("no peers answered")
    me = FakeServer(FakePeer(FakePeerID("me")), ONLINE, 0, 4)
    assert not asyncio.run(rebalancer_for(me).check())
    assert "Rebalancing check skipped" in caplog.text and "no peers answered" in caplog.text


def test_waits_are_jittered_around_the_period():
    rebalancer = rebalancer_for(FakeServer(FakePeer(FakePeerID("me")), ONLINE, 0, 4))
    waits = [rebalancer.next_wait() for _ in range(200)]
    assert all(5.0 <= w <= 15.0 for w in waits)
    assert max(waits) - min(waits) > 5.0  # servers started together drift apart
