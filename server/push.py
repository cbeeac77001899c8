"""Server-to-server push: a server sends its step output straight to the next server's session.

This saves the client a round trip per span boundary on every token. The sender keeps one
persistent ``push`` stream per next peer, shared by every session; a failed push is reported to
the client (``StepOutput.pushed = False``), which then sends the output on itself.

The receiver closes a push stream that brings nothing for its ``--idle-timeout``. A write into a
stream closed already fails (the client is told); one the receiver closes just as the step is
written would lose the step, so the sender opens a new stream instead of reusing one idle for
:data:`REUSE_IDLE` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time

from hivemind.p2p import P2P

from swarm.errors import SwarmError
from swarm.transport import Stream
from swarm.wire import InferenceStep

logger = logging.getLogger(__name__)

MAX_NEXT_SERVERS = 64
REUSE_IDLE = 20.0  # seconds; below any receiver's sensible --idle-timeout (60 s by default)


class PushSender:
    def __init__(self, p2p: P2P, connect_timeout: float = 5.0):
        self.p2p, self.connect_timeout = p2p, connect_timeout
        self._streams: dict[str, Stream] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_used: dict[str, float] = {}

    async def push(self, peer_id: str, step: InferenceStep, compression: str = "none") -> bool:
        """Sends ``step`` to ``peer_id``'s push handler (its hidden states under ``compression``); True if it
        was written to the stream."""
        lock = self._locks.setdefault(peer_id, asyncio.Lock())
        async with lock:  # one message at a time per stream
            stream = self._streams.get(peer_id)
            if stream is not None and time.monotonic() - self._last_used.get(peer_id, 0.0) > REUSE_IDLE:
                self._drop(peer_id, stream)  # the receiver may be closing it for idleness right now
                stream = None
            try:
                if stream is None:
                    stream = await Stream.open(self.p2p, peer_id, "push", self.connect_timeout)
                    self._streams[peer_id] = stream
                await stream.send(step, compression)
                self._last_used[peer_id] = time.monotonic()
                return True
            except SwarmError as e:  # the next server is unreachable: "not pushed"; the client sends it instead
                logger.info("Push to %s failed (%s); the client will send the step itself", peer_id, e)
                if stream is not None:
                    self._drop(peer_id, stream)
                return False

    def _drop(self, peer_id: str, stream: Stream) -> None:
        stream.close()
        if self._streams.get(peer_id) is stream:
            del self._streams[peer_id]

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
