"""Hedged requests: when a server is slower than it said it would be, ask another one as well.

A hung or slow server must not hold a step for a whole ``request_timeout``. Every server publishes
its speed (``inference_rps``: 1-token steps per second through one block; ``forward_rps``: tokens
per second through one block); :func:`hedge_after` turns that into how long a request should take,
with generous room (:data:`HEDGE_FACTOR` times the advertised time, plus the round trip and
:data:`HEDGE_SLACK` for scheduling noise). Past that, :func:`race` starts the same work on another
server and takes whichever answer comes first; the loser is cancelled. The caller then avoids a
server that lost a race (a ban for as long as it kept the caller waiting, and a routing penalty:
:meth:`client.routing.Routing.slow`), and waits longer before hedging a server that won one (it was slow
this once, not lying).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from swarm.records import ServerRecord
from swarm.routing import DEFAULT_BLOCK_STEP

T = TypeVar("T")

HEDGE_FACTOR = 4.0  # a request may take this many times what the server advertised before it is hedged
HEDGE_SLACK = 1.0  # seconds of room on top, for scheduling noise on busy machines


def expected_seconds(record: ServerRecord | None, blocks: int, tokens: int) -> float:
    """How long ``tokens`` tokens through ``blocks`` of a server's blocks should take, by what it advertised:
    the per-step rate, or the token rate for long inputs, whichever is slower."""
    if record is None:
        return blocks * DEFAULT_BLOCK_STEP
    per_step = 1.0 / record.inference_rps if record.inference_rps > 0 else DEFAULT_BLOCK_STEP
    per_token = 1.0 / record.forward_rps if record.forward_rps > 0 else 0.0
    return blocks * max(per_step, tokens * per_token)


def hedge_after(expected: float, rtt: float) -> float:
    """Seconds to wait for a request expected to take ``expected`` seconds (plus the round trip ``rtt``)
    before asking another server too."""
    return HEDGE_FACTOR * (expected + rtt) + HEDGE_SLACK


@dataclasses.dataclass
class Raced(Generic[T]):
    value: T
    backup_won: bool
    primary_error: BaseException | None = None  # why the primary lost, if it failed (else: it was slow)


async def race(primary: Awaitable[T], after: float, backup: Callable[[], Awaitable[T]]) -> Raced[T]:
    """Awaits ``primary``; if it has not finished after ``after`` seconds, starts ``backup()`` too and returns
    the first success. Raises the primary's error when both fail (the backup's own failures are its business:
    it bans whom it blames). The loser is cancelled and awaited."""
    first = asyncio.ensure_future(primary)
    second: asyncio.Future[T] | None = None
    try:
        done, _ = await asyncio.wait({first}, timeout=max(after, 0.0))
        if done:
            return Raced(first.result(), False)
        second = asyncio.ensure_future(backup())
        done, _ = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
        if first in done and first.exception() is None:
            return Raced(first.result(), False)
        if second in done and second.exception() is None:
            return Raced(second.result(), True)
        # one failed: the other decides
        if first in done:
            await asyncio.wait({second})
            if second.exception() is None:
                return Raced(second.result(), True, primary_error=first.exception())
            return Raced(first.result(), False)  # raises the primary's error
        return Raced(await first, False)
    finally:
        losers = {task for task in (first, second) if task is not None and not task.done()}
        for task in losers:
            task.cancel()
        if losers:
            await asyncio.wait(losers)
