"""Server-to-server push: a server sends its step output straight to the next server's session.

This saves the client a round trip per span boundary on every token. The sender keeps one
persistent ``push`` stream per next peer, shared by every session; a failed push is reported to
the client (``StepOutput.pushed = False``), which then sends the output on itself.
"""

from __future__ import annotations

import asyncio
import logging

from hivemind.p2p import P2P

from swarm.errors import SwarmError
from swarm.transport import Stream
from swarm.wire import InferenceStep

logger = logging.getLogger(__name__)

MAX_NEXT_SERVERS = 64


class PushSender:
    def __init__(self, p2p: P2P, connect_timeout: float = 5.0):
        self.p2p, self.connect_timeout = p2p, connect_timeout
        self._streams: dict[str, Stream] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def push(self, peer_id: str, step: InferenceStep) -> bool:
        """Sends ``step`` to ``peer_id``'s push handler; True if it was written to the stream."""
        lock = self._locks.setdefault(peer_id, asyncio.Lock())
        async with lock:  # one message at a time per stream
            stream = self._streams.get(peer_id)
            try:
                if stream is None:
                    stream = await Stream.open(self.p2p, peer_id, "push", self.connect_timeout)
                    self._streams[peer_id] = stream
                await stream.send(step)
                return True
            except SwarmError as e:  # the next server is unreachable: "not pushed"; the client sends it instead
                logger.info("Push to %s failed (%s); the client will send the step itself", peer_id, e)
                if stream is not None:
                    stream.close()
                self._streams.pop(peer_id, None)
                return False

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
