"""Bad requests to a real server get clear errors, and every other session goes on unharmed."""

from __future__ import annotations

import asyncio
import struct
import uuid

import msgpack
import pytest
import torch

from swarm.transport import Stream
from swarm.dht import Peer
from swarm.errors import BadRequest, SessionLengthExceeded, UnknownSession
from swarm.wire import (
    BackwardRequest,
    ForwardRequest,
    ForwardResponse,
    InferenceStep,
    OpenSession,
    SessionOpened,
    StepOutput,
    expect,
)

from peer_helpers import join, server_info, server_of

pytestmark = pytest.mark.integration
TIMEOUT = 30


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def _client(swarm) -> tuple[Peer, str]:
    """A client peer and the id of the server holding blocks 1:3."""
    peer = await join(swarm.initial_peers)
    return peer, await server_of(peer, "tiny-llama", 1, 3)


async def _open(peer: Peer, server_id: str, max_length: int = 8, start: int = 1, end: int = 3,
                session_id: str | None = None, **fields) -> tuple[Stream, str]:
    stream = await Stream.open(peer.p2p, server_id, "inference", TIMEOUT)
    session_id = session_id or uuid.uuid4().hex
    await stream.send(OpenSession(session_id=session_id, start=start, end=end, max_length=max_length, **fields))
    expect(await stream.receive(TIMEOUT), SessionOpened)
    return stream, session_id


async def _step(stream: Stream, session_id: str, hidden: torch.Tensor, position: int) -> torch.Tensor:
    await stream.send(InferenceStep(session_id=session_id, hidden=hidden, start_position=position))
    return expect(await stream.receive(TIMEOUT), StepOutput).hidden


def test_bad_requests_get_clear_errors_and_other_sessions_carry_on(llama_swarm):
    async def scenario():
        peer, server_id = await _client(llama_swarm)
        try:
            hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
            # a healthy session runs alongside every bad request below
            good, good_id = await _open(peer, server_id, max_length=16)
            reference = await _step(good, good_id, hidden[:, :3], 0)

            # 1. a session that exceeds its max_length
            bad, bad_id = await _open(peer, server_id, max_length=4)
            await _step(bad, bad_id, hidden[:, :3], 0)
            with pytest.raises(SessionLengthExceeded, match="more than its max_length 4"):
                await _step(bad, bad_id, hidden[:, 3:5], 3)
            # the same session is still usable within its limit
            await _step(bad, bad_id, hidden[:, 3:4], 3)

            # 2. an unknown session id on an open stream
            with pytest.raises(UnknownSession, match="not the one open on this stream"):
                await _step(bad, "no-such-session", hidden[:, :1], 0)

            # 3. a wrong hidden size, then a wrong dtype
            with pytest.raises(BadRequest, match=r"expected \[batch, seq, 64\]"):
                await _step(bad, bad_id, torch.zeros(1, 1, 32), 0)
            with pytest.raises(BadRequest, match="dtype torch.int64"):
                await _step(bad, bad_id, torch.zeros(1, 1, 64, dtype=torch.int64), 0)
            # a start position past what the session holds
            with pytest.raises(BadRequest, match="start_position 9"):
                await _step(bad, bad_id, hidden[:, :1], 9)
            # a padded step with a mask that is not 0/1, or positions out of range or of the wrong shape
            for fields, match in ((dict(attention_mask=torch.full((1, 1), 2)), "attention_mask must be"),
                                  (dict(attention_mask=torch.ones(1, 2, dtype=torch.int64)), "attention_mask must be"),
                                  (dict(position_ids=torch.full((1, 1), -1)), "position_ids must be"),
                                  (dict(position_ids=torch.zeros(1, 1, dtype=torch.int32)), "position_ids must be")):
                await bad.send(InferenceStep(session_id=bad_id, hidden=hidden[:, :1], start_position=3, **fields))
                with pytest.raises(BadRequest, match=match):
                    expect(await bad.receive(TIMEOUT), StepOutput)
            bad.close()

            # 4. blocks the server does not hold: in a session and in a forward pass
            with pytest.raises(BadRequest, match="server holds 1:3"):
                await _open(peer, server_id, start=0, end=3)
            stream = await Stream.open(peer.p2p, server_id, "forward", TIMEOUT)
            await stream.send(ForwardRequest(start=2, end=4, hidden=hidden))
            with pytest.raises(BadRequest, match="blocks 2:4 are not all served here"):
                expect(await stream.receive(TIMEOUT), ForwardResponse)
            stream.close()

            # 5. a session asking for more than the server allows
            with pytest.raises(SessionLengthExceeded, match="max-session-length"):
                await _open(peer, server_id, max_length=10**9)

            # 6. malformed frames: garbage header, unknown message type
            for payload in (b"\xc1\xc1\xc1 not msgpack",
                            msgpack.packb({"type": "Nonsense", "fields": {}, "sizes": []})):
                stream = await Stream.open(peer.p2p, server_id, "inference", TIMEOUT)
                stream.writer.write(struct.pack("<I", len(payload)) + payload)
                await stream.writer.drain()
                with pytest.raises(BadRequest, match="not valid msgpack|unknown message type"):
                    expect(await stream.receive(TIMEOUT), SessionOpened)
                stream.close()

            # 7. fine-tuning requests: backward with a mismatched gradient, badly shaped prompts, LoRA weights
            # for a module the blocks lack, an adapter the server did not preload
            async def call(handler: str, request) -> None:
                stream = await Stream.open(peer.p2p, server_id, handler, TIMEOUT)
                try:
                    await stream.send(request)
                    expect(await stream.receive(TIMEOUT), object)  # an ErrorReply raises its error
                finally:
                    stream.close()

            with pytest.raises(BadRequest, match="grad_output has shape"):
                await call("backward", BackwardRequest(start=1, end=3, hidden=hidden, grad_output=hidden[:, :2]))
            with pytest.raises(BadRequest, match=r"prompts have .* expected floating point \[2 blocks"):
                await call("forward", ForwardRequest(start=1, end=3, hidden=hidden, prompts=torch.zeros(3, 1, 2, 64)))
            with pytest.raises(BadRequest, match="block 1 has no Linear module 'self_attn.nope'"):
                await call("backward", BackwardRequest(
                    start=1, end=3, hidden=hidden, grad_output=hidden, lora_modules=("1.self_attn.nope",),
                    lora_a=(torch.zeros(2, 64),), lora_b=(torch.zeros(64, 2),), lora_scaling=1.0))
            with pytest.raises(BadRequest, match="adapter 'chat' is not loaded on this server"):
                await call("forward", ForwardRequest(start=1, end=3, hidden=hidden, adapter="chat"))
            with pytest.raises(BadRequest, match="adapter 'chat' is not loaded on this server"):
                await _open(peer, server_id, session_id=None, adapter="chat")

            # the healthy session goes on and still computes the same states as a fresh one
            continued = await _step(good, good_id, hidden[:, 3:], 3)
            fresh, fresh_id = await _open(peer, server_id, max_length=16)
            expected = await _step(fresh, fresh_id, hidden, 0)
            assert torch.allclose(torch.cat([reference, continued], dim=1), expected, atol=1e-5)
            good.close()
            fresh.close()

            # and the server still answers info
            info = await server_info(peer, server_id, TIMEOUT)
            assert (info.start, info.end, info.hidden_size) == (1, 3, 64)
        finally:
            await peer.shutdown()

    run(scenario())


def test_closing_the_stream_frees_the_cache(llama_swarm):
    async def scenario():
        peer, server_id = await _client(llama_swarm)
        try:
            async def tokens_left() -> int:
                return (await server_info(peer, server_id, TIMEOUT)).cache_tokens_left

            before = await tokens_left()
            stream, session_id = await _open(peer, server_id, max_length=1000)
            assert await tokens_left() == before  # pages are taken as the session fills them, not at open
            await _step(stream, session_id, torch.randn(1, 40, 64), 0)
            assert await tokens_left() == before - 48  # 40 tokens take three pages of 16
            stream.close()
            for _ in range(100):  # the server notices the closed stream asynchronously
                if await tokens_left() == before:
                    break
                await asyncio.sleep(0.05)
            assert await tokens_left() == before
        finally:
            await peer.shutdown()

    run(scenario())
