"""A server found dead is used again as soon as it answers, and a hedge looks again before it finds no
other server: a restarted server (same identity) whose new record has not shown in lookups yet (its first
announcements may fail to be stored; the next comes an update period later) is the replica a frozen server
is hedged to. Pure logic: a RemoteSequence over an in-memory view of the swarm."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

import client.routing as routing
from client.remote_sequence import RemoteSequence
from swarm.config import ClientConfig
from swarm.errors import MissingBlocksError, ServerUnreachable

from fake_swarm import FAKE_PEER, record


class Sequence(RemoteSequence):
    """Lookups return ``cached`` unless forced (then ``fresh``); pings answer for the peers in ``alive``, and
    fail as a real ping of a peer that cannot be dialed does."""

    def __init__(self, cached: dict, fresh: dict, alive: set[str]):
        super().__init__(ClientConfig(initial_peers=(FAKE_PEER,), missing_blocks_timeout=5.0), "fake", 2, "fake")
        self.cached, self.fresh, self.alive, self.lookups, self.pinged = cached, fresh, alive, 0, []

    async def servers(self, force: bool = False) -> dict:
        self.lookups += force
        self._servers = self.fresh if force else self.cached
        return self._servers

    async def ping(self, peer_id: str) -> float | None:
        self.pinged.append(peer_id)
        if peer_id not in self.alive:
            self.ban(peer_id, ServerUnreachable(f"cannot reach server {peer_id}: connection refused"), probe=False)
            return None
        self.pings[peer_id] = (0.01, time.monotonic())
        return 0.01


def view(*peers: str) -> dict:
    """Every block's servers, each announced at the same time in every lookup."""
    return {b: {p: dataclasses.replace(record(0, 2), announced_at=100.0) for p in peers} for b in range(2)}


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(routing, "REVIVE_FIRST_INTERVAL", 0.05)
    monkeypatch.setattr(routing, "REVIVE_MAX_INTERVAL", 0.1)


async def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_dead_server_that_answers_again_is_used_though_its_record_is_the_same(quick):
    async def main():
        seq = Sequence(view("a", "b"), view("a", "b"), alive={"b"})  # a's restart never shows in lookups
        await seq.servers()
        seq.ban("a", ServerUnreachable("cannot reach server a: connection refused"))
        assert "a" in seq.bans.banned(time.monotonic(), view("a", "b"))
        await wait_for(lambda: seq.pinged.count("a") >= 2)  # still down: pinged again, still dead
        assert seq.bans.is_dead("a")
        seq.alive.add("a")  # restarted with the same identity; its record unchanged in every lookup
        await wait_for(lambda: not seq.bans.is_dead("a"))
        assert "a" not in seq.bans.banned(time.monotonic(), view("a", "b"))
        # b freezes: the hedge finds a
        chain = await seq.chain(0, 2, exclude={"b"}, wait=False)
        assert [link.peer_id for link in chain] == ["a"]
        await seq.shutdown()

    asyncio.run(main())


def test_a_server_that_stays_dead_is_pinged_a_bounded_number_of_times(quick, monkeypatch):
    monkeypatch.setattr(routing, "REVIVE_PINGS", 3)

    async def main():
        seq = Sequence(view("a", "b"), view("a", "b"), alive={"b"})
        await seq.servers()
        seq.ban("a", ServerUnreachable("cannot reach server a: connection refused"))
        seq.ban("a", ServerUnreachable("cannot reach server a: connection refused"))  # one prober per server
        await wait_for(lambda: not seq._probes)
        assert seq.pinged.count("a") == 3 and seq.bans.is_dead("a")
        await seq.shutdown()

    asyncio.run(main())


def test_a_hedge_looks_again_before_it_finds_no_other_server():
    async def main():
        # the cached view predates b's restart (b absent); a fresh lookup shows it
        seq = Sequence(view("a"), view("a", "b"), alive={"a", "b"})
        chain = await seq.chain(0, 2, exclude={"a"}, wait=False)
        assert [link.peer_id for link in chain] == ["b"] and seq.lookups == 1
        # nobody else, even in a fresh lookup: the hedge gives up at once, without waiting for servers
        seq = Sequence(view("a"), view("a"), alive={"a"})
        t0 = time.monotonic()
        with pytest.raises(MissingBlocksError):
            await seq.chain(0, 2, exclude={"a"}, wait=False)
        assert seq.lookups == 1 and time.monotonic() - t0 < 1.0
        await seq.shutdown()

    asyncio.run(main())
