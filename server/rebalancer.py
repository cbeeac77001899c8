"""Where a server without ``--blocks`` sits: placement at startup, and moving when the swarm is lopsided.

The decisions are :mod:`swarm.placement`'s pure functions over the records :func:`swarm.dht.fetch_servers`
returns; this module does the I/O around them:

- :func:`initial_span` — reads the DHT and picks the span where the swarm is weakest
- :func:`settled_span` — after announcing JOINING, reads the DHT again (servers started at the same
  moment see each other now) and says where to load instead, if anywhere
- :class:`Rebalancer` — every ``--rebalance-period`` seconds (jittered, so that servers started
  together do not all decide at the same moment on the same records) asks
  :func:`~swarm.placement.should_move` and, if it says so, calls the server's ``move_to``

A move itself (announce, keep the shared blocks, load the new ones, swap handlers) is the server's:
:meth:`server.server.Server.move_to`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Protocol

from swarm.dht import Peer, fetch_servers
from swarm.placement import block_totals, choose_span, settle_span, should_move, typical_throughput
from swarm.records import ServerState

logger = logging.getLogger(__name__)

JITTER = 0.5  # each wait is uniform in [1 - JITTER, 1 + JITTER] x the period


async def initial_span(peer: Peer, prefix: str, num_blocks: int, length: int,
                       throughput: float | None) -> tuple[int, int]:
    """The ``length``-block span where the swarm of ``prefix`` is weakest now (JOINING servers count).

    ``throughput``: this server's offer if known; it stands in for servers that have not published
    theirs yet (else the swarm's typical one does).
    """
    if length >= num_blocks:
        return 0, num_blocks
    servers = await fetch_servers(peer, prefix, list(range(num_blocks)))
    own = peer.peer_id.to_base58()
    totals = block_totals(servers, num_blocks, exclude={own},
                          unknown_throughput=throughput or typical_throughput(servers))
    start = choose_span(totals, length)
    logger.info("Placing this server at blocks %d:%d of %d, where the swarm is weakest (tokens/s per block: %s)",
                start, start + length, num_blocks, " ".join(f"{t:.0f}" for t in totals))
    return start, start + length


SETTLE_DELAY = 1.0  # seconds between announcing JOINING and looking again: others' announcements land meanwhile


async def settled_span(peer: Peer, prefix: str, num_blocks: int, start: int, end: int,
                       throughput: float | None) -> tuple[int, int]:
    """Where a JOINING server at ``start:end`` should load, after a second look at the swarm
    (:func:`swarm.placement.settle_span`); ``start:end`` itself unless a better window appeared."""
    if end - start >= num_blocks:
        return start, end
    await asyncio.sleep(SETTLE_DELAY)
    servers = await fetch_servers(peer, prefix, list(range(num_blocks)))
    best = settle_span(servers, num_blocks, peer_id=peer.peer_id.to_base58(), start=start, end=end,
                       throughput=throughput or typical_throughput(servers))
    if best != start:
        logger.info("Servers that joined at the same time took blocks %d:%d; loading %d:%d instead",
                    start, end, best, best + end - start)
    return best, best + end - start


class MovableServer(Protocol):
    """What :class:`Rebalancer` needs of a server."""

    peer: Peer
    state: ServerState
    start: int
    end: int

    @property
    def offered_throughput(self) -> float: ...

    async def move_to(self, start: int, end: int, reason: str) -> None: ...


class Rebalancer:
    """Checks every ~``period`` seconds whether ``server`` should hold other blocks, and moves it if so.

    ``run`` loops until cancelled; an error of a move (e.g. a block that fails to load) ends it and
    reaches the owner. A failed DHT lookup only skips one check.
    """

    def __init__(self, server: MovableServer, *, prefix: str, num_blocks: int, period: float,
                 balance_quality: float, rng: random.Random | None = None):
        self.server, self.prefix, self.num_blocks = server, prefix, num_blocks
        self.period, self.balance_quality = period, balance_quality
        self.rng = rng or random.Random()

    def next_wait(self) -> float:
        return self.period * self.rng.uniform(1 - JITTER, 1 + JITTER)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.next_wait())
            await self.check()

    async def check(self) -> bool:
        """One check; True if the server moved."""
        server = self.server
        if server.state != ServerState.ONLINE:
            return False
        try:
            servers = await fetch_servers(server.peer, self.prefix, list(range(self.num_blocks)))
        except Exception as e:  # the DHT may be briefly unreachable: the next check tries again
            logger.warning("Rebalancing check skipped: reading the DHT failed (%s); next in ~%.0fs",
                           e or type(e).__name__, self.period)
            return False
        decision = should_move(servers, self.num_blocks, peer_id=server.peer.peer_id.to_base58(),
                               start=server.start, end=server.end, throughput=server.offered_throughput,
                               balance_quality=self.balance_quality)
        if not decision.move:
            logger.debug("Staying at blocks %d:%d: %s", server.start, server.end, decision.reason)
            return False
        await server.move_to(decision.start, decision.end, decision.reason)
        return True
