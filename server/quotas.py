"""What one peer may hold on this server: streams, sessions, KV cache pages and compute (pure).

Anyone can open streams to a server, so each remote peer (the libp2p peer id that opened the
stream, which it cannot forge) gets a share: at most ``streams_per_peer`` open streams,
``sessions_per_peer`` inference sessions, ``cache_share`` of the KV cache pages and
``jobs_per_peer`` forward or backward passes queued or running. Past a share the request gets
:class:`~swarm.errors.ServerBusy`, which says which share, and nothing else is touched.

A Sybil attacker (many peer ids) gets a share per id, so the streams of all peers together are
capped too (``max_streams``, from the process's file descriptor limit): when that is reached, the
stream idle the longest makes room for the new one (:meth:`Quotas.open_stream` names it), and only
if every open stream is busy is the new one refused.
"""

from __future__ import annotations

import dataclasses
import resource
import threading
import time
from collections.abc import Hashable

from swarm.errors import ServerBusy

STREAM_IDLE_EVICT = 1.0  # seconds a stream must have been idle before a new one may take its place


def default_max_streams() -> int:
    """Half the process's file descriptor limit: every open stream holds one, p2pd's socket and the
    model's files need the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, (soft if soft != resource.RLIM_INFINITY else 4096) // 2)


@dataclasses.dataclass(frozen=True)
class QuotaLimits:
    streams_per_peer: int = 128
    sessions_per_peer: int = 64
    jobs_per_peer: int = 4  # forward and backward passes queued or running
    cache_share: float = 0.5  # of the KV cache pages one peer's sessions may hold
    max_streams: int = dataclasses.field(default_factory=default_max_streams)


@dataclasses.dataclass(eq=False)
class StreamSlot:
    """One open stream: who opened it and when it last did something."""

    peer: str
    key: Hashable  # what to close to end it (the handler's task)
    last_active: float = dataclasses.field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_active = time.monotonic()


@dataclasses.dataclass
class _Peer:
    streams: int = 0
    sessions: int = 0
    jobs: int = 0
    pages: int = 0


class Quotas:
    """Every peer's usage against :class:`QuotaLimits`; ``cache_pages`` is the KV cache's size in pages."""

    def __init__(self, limits: QuotaLimits, cache_pages: int):
        self.limits = limits
        self.page_limit = max(1, int(cache_pages * limits.cache_share))
        self._peers: dict[str, _Peer] = {}
        self._slots: set[StreamSlot] = set()
        self._lock = threading.RLock()  # pages are taken on the compute thread, the rest on the event loop

    def _peer(self, peer: str) -> _Peer:
        return self._peers.setdefault(peer, _Peer())

    def _drop_if_idle(self, peer: str) -> None:
        usage = self._peers.get(peer)
        if usage is not None and usage == _Peer():
            del self._peers[peer]

    # ---------------------------------------------------------------- streams

    def open_stream(self, peer: str, key: Hashable, now: float | None = None) -> tuple[StreamSlot, StreamSlot | None]:
        """Admits a new stream of ``peer``: ``(its slot, a slot to close to make room or None)``, or
        :class:`ServerBusy`."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return self._open_stream(peer, key, now)

    def _open_stream(self, peer: str, key: Hashable, now: float) -> tuple[StreamSlot, StreamSlot | None]:
        usage = self._peer(peer)
        if usage.streams >= self.limits.streams_per_peer:
            raise ServerBusy(f"peer {peer} has {usage.streams} streams open here, this server's limit per peer "
                             f"(--max-streams-per-peer {self.limits.streams_per_peer}); close some first")
        evict = None
        if len(self._slots) >= self.limits.max_streams:
            oldest = min(self._slots, key=lambda s: s.last_active)
            if now - oldest.last_active < STREAM_IDLE_EVICT:
                raise ServerBusy(f"this server has {len(self._slots)} streams open and all are busy; retry later "
                                 "or use another server")
            evict = oldest
            self.close_stream(oldest)
        slot = StreamSlot(peer, key, now)
        usage.streams += 1
        self._slots.add(slot)
        return slot, evict

    def close_stream(self, slot: StreamSlot) -> None:
        with self._lock:
            if slot in self._slots:
                self._slots.discard(slot)
                self._peer(slot.peer).streams -= 1
                self._drop_if_idle(slot.peer)

    @property
    def open_streams(self) -> int:
        return len(self._slots)

    # ---------------------------------------------------------------- sessions and jobs

    def open_session(self, peer: str) -> None:
        with self._lock:
            usage = self._peer(peer)
            if usage.sessions >= self.limits.sessions_per_peer:
                raise ServerBusy(f"peer {peer} has {usage.sessions} sessions open here, this server's limit per "
                                 f"peer (--max-sessions-per-peer {self.limits.sessions_per_peer})")
            usage.sessions += 1

    def close_session(self, peer: str) -> None:
        with self._lock:
            self._peer(peer).sessions -= 1
            self._drop_if_idle(peer)

    def start_job(self, peer: str) -> None:
        with self._lock:
            usage = self._peer(peer)
            if usage.jobs >= self.limits.jobs_per_peer:
                raise ServerBusy(f"peer {peer} has {usage.jobs} forward/backward passes queued or running here, "
                                 f"this server's limit per peer (--max-jobs-per-peer {self.limits.jobs_per_peer}); "
                                 "wait for them or use another server")
            usage.jobs += 1

    def end_job(self, peer: str) -> None:
        with self._lock:
            self._peer(peer).jobs -= 1
            self._drop_if_idle(peer)

    # ---------------------------------------------------------------- cache pages (any thread)

    def take_pages(self, peer: str, count: int, what: str = "") -> None:
        """Charges ``count`` KV cache pages to ``peer``, or :class:`ServerBusy` (nothing charged)."""
        with self._lock:
            usage = self._peer(peer)
            if usage.pages + count > self.page_limit:
                raise ServerBusy(f"{what or 'the step'}: peer {peer}'s sessions hold {usage.pages} pages of this server's KV cache and "
                                 f"need {count} more; one peer may hold {self.page_limit} "
                                 f"(--peer-cache-share {self.limits.cache_share})")
            usage.pages += count

    def give_pages(self, peer: str, count: int) -> None:
        with self._lock:
            self._peer(peer).pages -= count
            self._drop_if_idle(peer)

    def account(self, peer: str) -> "PeerAccount":
        return PeerAccount(self, peer)

    def pages_of(self, peer: str) -> int:
        with self._lock:
            usage = self._peers.get(peer)
            return 0 if usage is None else usage.pages


@dataclasses.dataclass(frozen=True)
class PeerAccount:
    """The cache pages of one peer's session are charged here (see :class:`server.kv_cache.SessionCache`)."""

    quotas: Quotas
    peer: str

    def take(self, count: int, what: str = "") -> None:
        self.quotas.take_pages(self.peer, count, what)

    def give(self, count: int) -> None:
        self.quotas.give_pages(self.peer, count)
