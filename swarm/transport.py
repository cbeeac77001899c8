"""Calls to one server over its stream handlers, with timeouts and errors mapped to our tree."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from hivemind.p2p import P2P, PeerID

from swarm import aio
from swarm.errors import ServerUnavailable
from swarm.wire import HANDLERS, InfoRequest, InfoResponse, expect, read_message, write_message


class Stream:
    """One open stream to a server: send messages, read replies."""

    def __init__(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.peer_id, self.reader, self.writer = peer_id, reader, writer

    @classmethod
    async def open(cls, p2p: P2P, peer_id: str, handler: str, timeout: float) -> "Stream":
        try:
            _info, reader, writer = await asyncio.wait_for(
                p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), HANDLERS[handler]), timeout)
        except asyncio.TimeoutError:
            raise ServerUnavailable(f"server {peer_id} did not accept a {handler} stream in {timeout:.0f}s") from None
        except Exception as e:
            raise ServerUnavailable(f"cannot reach server {peer_id}: {e}") from None
        return cls(peer_id, reader, writer)

    async def send(self, msg: Any) -> None:
        try:
            await write_message(self.writer, msg)
        except (ConnectionError, OSError) as e:
            raise ServerUnavailable(f"server {self.peer_id} closed the stream: {e}") from None

    async def receive(self, timeout: float) -> Any:
        try:
            return await aio.wait_for(read_message(self.reader), timeout)
        except asyncio.TimeoutError:
            raise ServerUnavailable(f"server {self.peer_id} did not answer in {timeout:.0f}s") from None
        except (EOFError, ConnectionError, OSError) as e:
            raise ServerUnavailable(f"server {self.peer_id} closed the stream: {e}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def call(p2p: P2P, peer_id: str, handler: str, request: Any, connect_timeout: float,
               timeout: float) -> Any:
    """One request, one reply (the reply may be an ErrorReply; see :func:`swarm.wire.expect`)."""
    stream = await Stream.open(p2p, peer_id, handler, connect_timeout)
    try:
        await stream.send(request)
        return await stream.receive(timeout)
    finally:
        stream.close()


async def ping(p2p: P2P, peer_id: str, timeout: float) -> float:
    """Seconds for one ``info`` round trip to ``peer_id`` (stream opening included, as every call pays it).

    Clients ping the servers a chain may go through; servers ping those that may follow them
    (:mod:`server.pings`). Raises a :class:`~swarm.errors.SwarmError` if the server does not answer
    within ``timeout`` or answers with an error.
    """
    t0 = time.perf_counter()
    expect(await call(p2p, peer_id, "info", InfoRequest(), timeout, timeout), InfoResponse)
    return time.perf_counter() - t0
