"""Room in a full KV cache: sessions idle for a while give their pages to busy ones.

Pages are charged as sessions fill them, so a session holds only what it used; but a peer that
opens sessions, fills them and then sends a token now and then (or nothing) would keep those pages
from everyone. When a new session or a step finds too few free pages, sessions with no step for
``evict_idle`` seconds (and none running) are closed, the idlest first, until the pages fit: each
gets ``server_busy`` on its stream (its client replays it here or elsewhere). ``cache_tokens_left``
in ``info`` and the server's record counts their pages as free (:func:`room`), so clients route to
a server whose cache is full only of idle sessions.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from swarm.errors import ServerBusy, to_wire
from swarm.wire import ErrorReply, encode

from server.kv_cache import PagePool

logger = logging.getLogger(__name__)


def idle_sessions(sessions: Iterable[Any], evict_idle: float, busy: Any = None) -> list[Any]:
    """Sessions that may be closed to make room, the idlest first (never ``busy``, nor one mid-step)."""
    now = time.monotonic()
    return sorted((s for s in sessions if s is not busy and not s.lock.locked() and now - s.last_used > evict_idle),
                  key=lambda s: s.last_used)


def held_pages(session: Any) -> int:
    return session.cache.table.numel() + len(session.cache.charged)


def room(pool: PagePool, sessions: Iterable[Any], evict_idle: float) -> int:
    """Tokens (of one row) a new session can get: the free pages and those of idle sessions."""
    return pool.tokens_left + pool.page_tokens * sum(held_pages(s) for s in idle_sessions(sessions, evict_idle))


def make_room(pool: PagePool, sessions: Iterable[Any], pages: int, evict_idle: float, busy: Any = None) -> None:
    """Closes idle sessions, the idlest first, until ``pages`` pages are free (or none is left to close)."""
    free, now = pool.tokens_left // pool.page_tokens, time.monotonic()
    for victim in idle_sessions(sessions, evict_idle, busy):
        if free >= pages:
            return
        free += held_pages(victim)
        logger.info("session %s of %s idle for %.0fs: evicted to make room in a full cache",
                    victim.session_id[:8], victim.peer[-8:], now - victim.last_used)
        victim.cache.close()
        with contextlib.suppress(Exception):  # without waiting: the stream closes next anyway
            victim.writer.write(encode(ErrorReply(*to_wire(ServerBusy(
                f"this session was idle for {now - victim.last_used:.0f}s while the server's KV cache was full; it "
                "was closed to make room (replay it here or elsewhere)"))))[0])
        if victim.task is not None:
            victim.task.cancel()
