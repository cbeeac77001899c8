"""Time limits on a handler's stream, and noticing that its client went away (pure asyncio).

Every read and write of a handler has a deadline, so a peer that sends nothing, trickles a frame
or never reads its answers holds a stream (and its file descriptor) for a bounded time. Work run
for a client (a forward pass) is cancelled when the client closes its stream: :func:`until_gone`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from swarm import aio
from swarm.errors import BadRequest
from swarm.wire import WireLimits, read_message, write_message

T = TypeVar("T")


class ClientGone(ConnectionError):
    """The client closed its stream while its request was being served."""


async def read(reader: asyncio.StreamReader, limits: WireLimits, timeout: float) -> Any:
    """One message, or ``TimeoutError`` if it has not fully arrived within ``timeout`` seconds."""
    return await aio.wait_for(read_message(reader, limits), timeout)


async def send(writer: asyncio.StreamWriter, msg: Any, timeout: float, *args: Any) -> None:
    """Writes ``msg``; a client that does not read it within ``timeout`` seconds loses its stream."""
    try:
        await aio.wait_for(write_message(writer, msg, *args), timeout)
    except asyncio.TimeoutError:
        writer.close()
        raise ClientGone(f"the client read no answer for {timeout:.0f}s") from None


async def until_gone(reader: asyncio.StreamReader, work: Awaitable[T]) -> T:
    """Awaits ``work``; if the client closes the stream first, cancels it and raises :class:`ClientGone`.
    A request stream carries one request, so any further byte is a protocol error (BadRequest)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(reader.read(1))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if watch.exception() is None and watch.result():
            raise BadRequest("a request stream carries one request; the client sent more before its answer")
        raise ClientGone("the client closed its stream before its answer")
    finally:
        for pending in (task, watch):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
