"""Probing one server with the ``info`` RPC, and a short-lived cache of the answers.

A probe opens an ``info`` stream (:class:`swarm.transport.Stream`), sends :class:`InfoRequest` and
waits for :class:`InfoResponse`, each step bounded by ``timeout``. It never raises for a peer's
fault: a peer that does not answer, answers with an error or answers garbage gives ``ok=False``
and the reason in ``error``. The cache is keyed by peer id and reads the clock it is given.
"""

from __future__ import annotations

import dataclasses
import time

from hivemind.p2p import P2P

from swarm.errors import SwarmError
from swarm.transport import Stream
from swarm.wire import InfoRequest, InfoResponse


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What one ``info`` probe found. ``rtt`` is seconds from opening the stream to the answer."""

    ok: bool
    checked_at: float  # the monotonic clock when the probe ended
    rtt: float | None = None
    error: str | None = None
    info: InfoResponse | None = None


async def probe_server(p2p: P2P, peer_id: str, timeout: float) -> ProbeResult:
    """Asks ``peer_id`` for its info; returns ``ok=False`` (never raises) if it cannot answer in time."""
    started = time.monotonic()
    stream: Stream | None = None
    try:
        stream = await Stream.open(p2p, peer_id, "info", timeout)
        await stream.send(InfoRequest())
        info = await stream.receive(timeout, InfoResponse)
    except SwarmError as e:
        return ProbeResult(ok=False, checked_at=time.monotonic(), error=str(e))
    except Exception as e:  # a malformed peer id or a daemon error: still the peer's (or the address's) fault
        return ProbeResult(ok=False, checked_at=time.monotonic(), error=f"{type(e).__name__}: {e}")
    finally:
        if stream is not None:
            stream.close()
    now = time.monotonic()
    return ProbeResult(ok=True, checked_at=now, rtt=now - started, info=info)


class ProbeCache:
    """Probe results reused for ``ttl`` seconds, so a crawl every few seconds does not flood servers."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._results: dict[str, ProbeResult] = {}

    def get(self, peer_id: str, now: float, max_age: float | None = None) -> ProbeResult | None:
        """The cached result if it is younger than ``ttl`` (and ``max_age``, if given) at ``now`` (a
        monotonic time), else None."""
        result = self._results.get(peer_id)
        limit = self.ttl if max_age is None else min(self.ttl, max_age)
        if result is None or now - result.checked_at >= limit:
            return None
        return result

    def put(self, peer_id: str, result: ProbeResult) -> None:
        self._results[peer_id] = result

    def prune(self, now: float) -> None:
        """Forgets expired results, so peers that left do not pile up."""
        for peer_id in [p for p, r in self._results.items() if now - r.checked_at >= self.ttl]:
            del self._results[peer_id]
