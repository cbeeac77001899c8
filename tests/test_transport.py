"""swarm.transport on in-memory streams: what a server did wrong is its (retryable) fault, a bug here is not.

No peers: a fake P2P whose stream opening raises what hivemind's daemon client raises, and
asyncio.StreamReaders fed with the bytes a server would send.
"""

from __future__ import annotations

import asyncio
import struct

import msgpack
import pytest
import torch
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure, P2PHandlerError

from swarm.errors import BadRequest, ServerError, ServerRefused, ServerUnavailable, ServerUnreachable, is_retryable
from swarm.transport import Stream
from swarm.wire import ErrorReply, ForwardResponse, SessionOpened, StepOutput, write_message

PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


class _Writer:
    def __init__(self):
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass


def _frame(msg) -> bytes:
    async def encode() -> bytes:
        writer = _Writer()
        await write_message(writer, msg)
        return bytes(writer.data)

    return asyncio.run(encode())


def _receive(data: bytes, expected: type | None = None, eof: bool = True):
    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        return await Stream(PEER_ID, reader, None).receive(0.5, expected)

    return asyncio.run(run())


def test_a_reply_of_the_expected_type_is_returned():
    msg = SessionOpened(session_id="s", cache_tokens_left=3)
    assert _receive(_frame(msg), SessionOpened) == msg


def test_an_error_reply_is_the_servers_fault():
    # the client checked its request before sending it: a server that calls it bad may be broken or hostile
    with pytest.raises(ServerRefused, match=f"server {PEER_ID} refused the request \\(bad_request\\): bad shape") as e:
        _receive(_frame(ErrorReply(code="bad_request", message="bad shape")), StepOutput)
    assert is_retryable(e.value) and type(e.value.refusal()) is BadRequest
    with pytest.raises(ServerError, match="out of memory"):
        _receive(_frame(ErrorReply(code="server_error", message="the server failed: out of memory")), StepOutput)


def test_a_reply_of_the_wrong_type_is_the_servers_fault():
    with pytest.raises(ServerError, match=f"server {PEER_ID} answered SessionOpened where StepOutput was due"):
        _receive(_frame(SessionOpened(session_id="s", cache_tokens_left=3)), StepOutput)


def test_a_malformed_frame_is_the_servers_fault():
    header = msgpack.packb({"type": "NoSuchMessage", "fields": {}, "sizes": []})
    with pytest.raises(ServerError, match="sent a malformed message: .*unknown message type"):
        _receive(struct.pack("<I", len(header)) + header, StepOutput)
    cut = _frame(ForwardResponse(hidden=torch.zeros(2, 3)))[:-1]  # a frame cut short: the stream closed
    with pytest.raises(ServerUnavailable, match="closed the stream"):
        _receive(cut, ForwardResponse)


def test_a_closed_or_silent_stream_is_unavailable():
    with pytest.raises(ServerUnavailable, match="closed the stream"):
        _receive(b"", StepOutput)
    with pytest.raises(ServerUnavailable, match="did not answer in 0s"):
        _receive(b"", StepOutput, eof=False)


class _FakeP2P:
    def __init__(self, error: BaseException):
        self.error = error

    async def call_binary_stream_handler(self, peer_id, handler):
        raise self.error


@pytest.mark.parametrize("error", [ControlFailure("failed to dial"), P2PHandlerError("protocol not supported"),
                                   ConnectionResetError("daemon went away"), asyncio.IncompleteReadError(b"", 4)])
def test_opening_a_stream_to_an_unreachable_server(error):
    # dead until its record changes (client.routing bans it so)
    with pytest.raises(ServerUnreachable, match=f"cannot reach server {PEER_ID}") as info:
        asyncio.run(Stream.open(_FakeP2P(error), PEER_ID, "forward", 1.0))
    assert is_retryable(info.value)


def test_a_bug_while_opening_a_stream_is_not_hidden_as_unavailable():
    with pytest.raises(TypeError, match="a bug"):
        asyncio.run(Stream.open(_FakeP2P(TypeError("a bug")), PEER_ID, "forward", 1.0))


def test_a_malformed_peer_id_is_unavailable_not_a_crash():
    with pytest.raises(ServerUnreachable, match="is not a peer id"):
        asyncio.run(Stream.open(_FakeP2P(AssertionError("not reached")), "not-base58-0OIl", "forward", 1.0))
