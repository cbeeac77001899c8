"""Round trips from this server to the servers likely to come next in a chain, for its record.

A client's inference step is pushed from server to server (:mod:`server.push`), so the hop from
this server to the next one costs the round trip between the two, which no client can measure.
Each announce, :class:`NextPings` pings (an ``info`` call, like client pings) the online servers
that hold this server's ``end`` block, smooths the round trips, and the server publishes them as
``ServerRecord.next_pings``; :func:`swarm.routing.make_latency_chain` reads them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from hivemind.p2p import P2P

from swarm import transport
from swarm.errors import SwarmError
from swarm.records import ServerRecord, ServerState

logger = logging.getLogger(__name__)

MAX_NEXT_PEERS = 8  # servers pinged per announce (a record stays small, an announce stays quick)
PING_TIMEOUT = 3.0  # seconds; a server that does not answer in time is left out until it does
SMOOTHING = 0.3  # weight of a new round trip in the moving average (as the client's pings)


def next_candidates(servers: Mapping[str, ServerRecord], own_peer_id: str, end: int,
                    limit: int = MAX_NEXT_PEERS) -> list[str]:
    """The online servers (by peer id) a chain may go to after a server ending at block ``end``:
    those holding block ``end``, fastest first (then by peer id), at most ``limit``."""
    options = [(peer_id, record) for peer_id, record in servers.items()
               if peer_id != own_peer_id and record.state == ServerState.ONLINE and record.start <= end < record.end]
    options.sort(key=lambda item: (-item[1].throughput, item[0]))
    return [peer_id for peer_id, _ in options[:limit]]


class NextPings:
    """Smoothed round trips (seconds) to the servers that may follow this one, by peer id, and the
    bandwidth (bytes/s) to each, measured with a probe (:func:`swarm.transport.bandwidth`) when the
    link is slow enough to tell (clients compress their states on slow links, :mod:`swarm.compression`)."""

    def __init__(self, p2p: P2P, timeout: float = PING_TIMEOUT):
        self.p2p, self.timeout = p2p, timeout
        self.rtts: dict[str, float] = {}
        self.bandwidths: dict[str, float] = {}

    async def update(self, candidates: list[str]) -> dict[str, float]:
        """Pings ``candidates`` concurrently (at most ``timeout`` seconds in all) and returns what to publish.

        Servers no longer among the candidates are dropped, and so are those that did not answer this
        time: a route through them would not get its push through either.
        """
        results = await asyncio.gather(*(self._ping(peer_id) for peer_id in candidates))
        rtts: dict[str, float] = {}
        bandwidths: dict[str, float] = {}
        for peer_id, (rtt, bandwidth) in zip(candidates, results):
            if rtt is None:
                continue
            rtts[peer_id] = _smooth(self.rtts.get(peer_id), rtt)
            if bandwidth is not None:
                bandwidths[peer_id] = _smooth(self.bandwidths.get(peer_id), bandwidth)
        self.rtts, self.bandwidths = rtts, bandwidths
        return dict(rtts)

    def clear(self) -> None:
        self.rtts, self.bandwidths = {}, {}

    async def _ping(self, peer_id: str) -> tuple[float | None, float | None]:
        """(round trip, bandwidth) to ``peer_id``, within ``timeout`` seconds in all; None where unknown."""
        deadline = time.monotonic() + self.timeout
        try:
            rtt = await asyncio.wait_for(transport.ping(self.p2p, peer_id, self.timeout), self.timeout)
        except (SwarmError, asyncio.TimeoutError) as e:
            logger.debug("Next server %s did not answer a ping: %s", peer_id, e)
            return None, None
        left = deadline - time.monotonic()
        try:
            bandwidth = await asyncio.wait_for(transport.bandwidth(self.p2p, peer_id, rtt, left), left)
        except (SwarmError, asyncio.TimeoutError, ValueError) as e:
            logger.debug("Next server %s did not answer a bandwidth probe: %s", peer_id, e)
            bandwidth = None
        return rtt, bandwidth


def _smooth(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * value
