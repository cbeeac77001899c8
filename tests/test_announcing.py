"""Re-announcing (server/announcing.py): a record the DHT did not store is announced again after 1 s,
2 s, 4 s ... (at most the update period), not a whole period later; on fakes of the DHT store."""

from __future__ import annotations

import asyncio
import time
import types

import pytest

from server import server as server_module
from server.announcing import FIRST_RETRY, AnnounceSchedule
from server.server import Server
from swarm.records import ServerState


def test_failed_stores_are_retried_after_doubling_delays_up_to_the_period():
    schedule = AnnounceSchedule(60.0)
    assert schedule.delay == 60.0 and not schedule.retrying
    assert [schedule.record(False) for _ in range(8)] == [FIRST_RETRY * 2**k for k in range(6)] + [60.0, 60.0]
    assert schedule.retrying
    assert schedule.record(True) == 60.0 and not schedule.retrying
    assert schedule.record(False) == FIRST_RETRY  # the backoff starts over after a stored announcement
    for _ in range(2000):  # long outages stay bounded by the period (no overflow)
        schedule.record(False)
    assert schedule.delay == 60.0
    assert AnnounceSchedule(0.5).record(False) == 0.5  # never later than the period, even the first retry
    with pytest.raises(ValueError):
        AnnounceSchedule(0.0)


class FakeStore:
    """declare_server's stand-in: fails the calls numbered in ``failing`` (from 1), records when each came."""

    def __init__(self, failing: set[int]):
        self.failing, self.calls = failing, []

    async def __call__(self, peer, prefix, record, expiration, model=None, blocks=None) -> bool:
        self.calls.append(time.monotonic())
        return len(self.calls) not in self.failing


def _server(monkeypatch, store: FakeStore, period: float, first_retry: float) -> tuple[Server, list[float]]:
    monkeypatch.setattr(server_module, "declare_server", store)
    server = Server(types.SimpleNamespace(update_period=period, dht_prefix="fake"))
    server.announcing = AnnounceSchedule(period, first_retry)
    server.state = ServerState.ONLINE
    server.model_record = None
    server._record = lambda: None

    async def visible_maddrs():
        return ["/ip4/127.0.0.1/tcp/1"]

    server.peer = types.SimpleNamespace(visible_maddrs=visible_maddrs)
    pinged: list[float] = []

    async def measure_next_pings():
        pinged.append(time.monotonic())

    server._measure_next_pings = measure_next_pings
    return server, pinged


async def _until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def test_the_announce_loop_retries_a_failed_store_soon_and_then_waits_the_period(monkeypatch):
    async def main():
        store = FakeStore(failing={1, 2, 3})  # the ONLINE announcement and the next two retries fail
        server, pinged = _server(monkeypatch, store, period=30.0, first_retry=0.05)
        await server._announce()  # ONLINE, before the loop starts (Server._serve)
        loop = asyncio.create_task(server._announce_loop())
        try:
            await _until(lambda: len(store.calls) >= 4, 5.0)
            assert len(store.calls) == 4, store.calls  # stored on the third retry
            gaps = [b - a for a, b in zip(store.calls, store.calls[1:])]
            for gap, expected in zip(gaps, (0.05, 0.1, 0.2)):
                assert expected * 0.9 <= gap < expected + 0.5, gaps
            assert not pinged  # retries store what was measured; the pings wait for the period
            assert not server.announcing.retrying
            await asyncio.sleep(0.3)
            assert len(store.calls) == 4  # stored: the next announcement is a period (30 s) away

            # a store that fails elsewhere (a move's announcement) wakes the loop to retry it soon
            store.failing.add(5)
            await server._announce()
            failed_at = store.calls[-1]
            await _until(lambda: len(store.calls) >= 6, 5.0)
            assert len(store.calls) == 6 and 0.045 <= store.calls[5] - failed_at < 0.55, store.calls
            assert not pinged
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)

    asyncio.run(asyncio.wait_for(main(), 30))
