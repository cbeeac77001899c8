"""Calls to one server over its stream handlers, with timeouts and errors mapped to our tree.

What the other side did wrong becomes that server's retryable error (:mod:`swarm.errors`): a peer
that cannot be dialed (:class:`ServerUnreachable`: dead until it announces again), no stream in time,
no answer in time or a closed stream (:class:`ServerUnavailable`), a malformed message or one of the
wrong type (:class:`ServerError`). An error reply is the server's fault too: a retryable code is raised
as the class the server sent, a fatal one as :class:`ServerRefused` (the client checked its request
before sending it). Anything else (a bug on this side) propagates as it is.

In a private swarm every stream opens with a :class:`~swarm.wire.KeyProof`. The key belongs to the
peer, so :class:`swarm.dht.Peer` registers it for its P2P (:func:`swarm.swarm_key.use_swarm_key`) and
every stream that P2P opens carries the proof, whoever opens it (clients, push between servers,
pings, probes); :func:`check_opener` is the server's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError, P2PHandlerError

from swarm import aio
from swarm.errors import AccessDenied, BadRequest, ServerError, ServerUnavailable, ServerUnreachable, server_reply_error
from swarm.swarm_key import check_stream_proof, stream_proof, swarm_key_of
from swarm.wire import (
    HANDLERS,
    ErrorReply,
    InfoRequest,
    InfoResponse,
    KeyProof,
    WireLimits,
    read_message,
    write_message,
)

# what opening a stream raises when the peer cannot be reached: the daemon's refusals (no route, dial
# failed, protocol not served) and a lost connection to our own daemon
_UNREACHABLE = (P2PDaemonError, P2PHandlerError, ConnectionError, OSError, EOFError)


async def check_opener(p2p: P2P, stream_info: Any, reader: asyncio.StreamReader, timeout: float) -> None:
    """Server side: if ``p2p`` has a swarm key, reads the stream's :class:`KeyProof` and raises
    :class:`AccessDenied` unless it proves the key for this opener, this server and this handler."""
    key = swarm_key_of(p2p)
    if key is None:
        return
    opener = stream_info.peer_id.to_base58()
    try:  # nothing but a small KeyProof is read from a stranger: a first frame with tensors is refused unread
        msg = await aio.wait_for(read_message(reader, WireLimits(max_message_bytes=0)), timeout)
    except BadRequest:
        msg = None
    if not isinstance(msg, KeyProof):
        raise AccessDenied(f"this server serves a private swarm only; {opener} opened a {stream_info.proto} stream "
                           f"without proof of the swarm key (give the swarm's key file: --swarm-key FILE, or "
                           f"swarm_key=FILE in ClientConfig)")
    if not check_stream_proof(key, msg.proof, opener, p2p.peer_id.to_base58(), stream_info.proto):
        raise AccessDenied(f"this server serves a private swarm only; {opener} opened a {stream_info.proto} stream "
                           f"with proof of another swarm key than this swarm's (check the file given to "
                           f"--swarm-key / swarm_key=)")


class Stream:
    """One open stream to a server: send messages, read replies."""

    def __init__(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.peer_id, self.reader, self.writer = peer_id, reader, writer

    @classmethod
    async def open(cls, p2p: P2P, peer_id: str, handler: str, timeout: float) -> "Stream":
        try:
            peer = PeerID.from_base58(peer_id)
        except ValueError:  # a malformed id in some record: nothing to dial
            raise ServerUnreachable(f"{peer_id[:60]!r} is not a peer id") from None
        try:
            _info, reader, writer = await asyncio.wait_for(
                p2p.call_binary_stream_handler(peer, HANDLERS[handler]), timeout)
        except asyncio.TimeoutError:
            raise ServerUnavailable(f"server {peer_id} did not accept a {handler} stream in {timeout:.0f}s") from None
        except _UNREACHABLE as e:
            raise ServerUnreachable(f"cannot reach server {peer_id}: {e or type(e).__name__}") from None
        stream = cls(peer_id, reader, writer)
        key = swarm_key_of(p2p)
        if key is not None:
            try:  # the server proves against its id as p2pd writes it
                await stream.send(KeyProof(stream_proof(key, p2p.peer_id.to_base58(), peer.to_base58(),
                                                        HANDLERS[handler])))
            except BaseException:
                stream.close()
                raise
        return stream

    async def send(self, msg: Any, compression: str = "none") -> None:
        try:
            await write_message(self.writer, msg, compression)
        except (ConnectionError, OSError) as e:
            raise ServerUnavailable(f"server {self.peer_id} closed the stream: {e}") from None

    async def receive(self, timeout: float, expected: type | None = None) -> Any:
        """The next message; with ``expected``, an :class:`ErrorReply` is raised as the server's fault
        (:func:`~swarm.errors.server_reply_error`) and any other type is the server's fault too
        (:class:`ServerError`)."""
        try:
            msg = await aio.wait_for(read_message(self.reader), timeout)
        except asyncio.TimeoutError:
            raise ServerUnavailable(f"server {self.peer_id} did not answer in {timeout:.0f}s") from None
        except (EOFError, ConnectionError, OSError) as e:
            raise ServerUnavailable(f"server {self.peer_id} closed the stream: {e or type(e).__name__}") from None
        except BadRequest as e:  # the frame broke the protocol: what it sent is wrong, not what we asked
            raise ServerError(f"server {self.peer_id} sent a malformed message: {e}") from None
        if expected is None:
            return msg
        if isinstance(msg, ErrorReply):
            raise server_reply_error(msg.code, msg.message, self.peer_id)
        if not isinstance(msg, expected):
            raise ServerError(f"server {self.peer_id} answered {type(msg).__name__} where {expected.__name__} "
                              "was due")
        return msg

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def call(p2p: P2P, peer_id: str, handler: str, request: Any, expected: type, connect_timeout: float,
               timeout: float) -> Any:
    """One request, one reply of type ``expected`` (see :meth:`Stream.receive`)."""
    stream = await Stream.open(p2p, peer_id, handler, connect_timeout)
    try:
        await stream.send(request)
        return await stream.receive(timeout, expected)
    finally:
        stream.close()


async def ping(p2p: P2P, peer_id: str, timeout: float) -> float:
    """Seconds for one ``info`` round trip to ``peer_id`` (stream opening included, as every call pays it).

    Clients ping the servers a chain may go through; servers ping those that may follow them
    (:mod:`server.pings`). Raises a :class:`~swarm.errors.SwarmError` if the server does not answer
    within ``timeout`` or answers with an error.
    """
    t0 = time.perf_counter()
    await call(p2p, peer_id, "info", InfoRequest(), InfoResponse, timeout, timeout)
    return time.perf_counter() - t0


PROBE_BYTES = 64 << 10
PROBE_FLOOR_S = 0.002  # a probe less than this slower than the ping tells noise, not bandwidth


async def bandwidth(p2p: P2P, peer_id: str, rtt: float, timeout: float, nbytes: int = PROBE_BYTES) -> float | None:
    """Bytes/s between here and ``peer_id``: an ``info`` call carrying ``nbytes`` each way, less ``rtt`` (the
    same call without them, from :func:`ping`). None when the probe was less than :data:`PROBE_FLOOR_S`
    slower than the ping (a fast link, over ~64 MB/s with the default probe: the difference is noise)."""
    t0 = time.perf_counter()
    reply = await call(p2p, peer_id, "info", InfoRequest(probe=bytes(nbytes), probe_reply_bytes=nbytes), InfoResponse,
                       timeout, timeout)
    extra = time.perf_counter() - t0 - rtt
    if len(reply.probe) != nbytes:
        raise ServerError(f"server {peer_id} answered a {nbytes}-byte probe with {len(reply.probe)} bytes")
    return 2 * nbytes / extra if extra >= PROBE_FLOOR_S else None
