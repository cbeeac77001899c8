"""Concurrent steps of one client's sessions to one server travel as one frame (client/step_frames.py,
server/step_frames.py), on a real server.

Tolerance: float32 hidden states within 1e-5 of the same sessions stepped one by one on their own
streams (the frame's steps run as one batched forward; batched matmuls may round differently, see
test_batching.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import pytest
import torch

from client.inference_session import InferenceSession
from client.loop import run_sync
from client.remote_sequence import RemoteSequence
from swarm import transport
from swarm.config import ClientConfig
from swarm.dht import NetworkConfig, Peer, fetch_servers
from swarm.errors import BadRequest
from swarm.transport import Stream
from swarm.wire import (ErrorReply, InferenceStep, InferenceSteps, OpenSession, SessionOpened, StepOutput,
                        StepOutputs, expect)

pytestmark = pytest.mark.integration
TIMEOUT = 30
TOL = 1e-5
PREFIX = "frames-llama"
SIZES = (1, 2, 1, 3, 1)  # rows of each session
PREFILLS = (3, 9, 17, 5, 1)  # tokens of each session's first step; then one token per step
DECODES = 6


@pytest.fixture(scope="module")
def frames_server(tiny_llama, llama_swarm):
    llama_swarm.start_server(tiny_llama, "0:4", "--dht-prefix", PREFIX, "--num-threads", "1")
    return llama_swarm


def _inputs(i: int) -> torch.Tensor:
    return torch.randn(SIZES[i], PREFILLS[i] + DECODES, 64, generator=torch.Generator().manual_seed(100 + i))


async def _generate(sequence: RemoteSequence, i: int) -> list[torch.Tensor]:
    x, session = _inputs(i), InferenceSession(sequence, PREFILLS[i] + DECODES)
    try:
        outs = [await session.astep(x[:, :PREFILLS[i]])]
        for position in range(PREFILLS[i], PREFILLS[i] + DECODES):
            outs.append(await session.astep(x[:, position:position + 1]))
        return outs
    finally:
        await session.aclose()


def test_sessions_stepping_together_share_frames_and_equal_each_alone(tiny_llama, frames_server):
    def sequence(step_frames: bool) -> RemoteSequence:
        config = ClientConfig(initial_peers=tuple(frames_server.initial_peers), dht_prefix=PREFIX, verify_rate=0.0,
                              step_frames=step_frames)
        return RemoteSequence(config, PREFIX, 4, tiny_llama)

    alone_sequence, framed_sequence = sequence(False), sequence(True)
    try:
        alone = [run_sync(_generate(alone_sequence, i)) for i in range(len(SIZES))]
        assert not alone_sequence._frames  # off: every step went on its session's stream

        async def together():
            return await asyncio.gather(*(_generate(framed_sequence, i) for i in range(len(SIZES))))

        framed = run_sync(together())
        for i in range(len(SIZES)):
            for got, expected in zip(framed[i], alone[i], strict=True):
                assert got.shape == expected.shape
                assert (got - expected).abs().max().item() <= TOL
        (frames,) = framed_sequence._frames.values()
        # every one-token step went in a frame; longer prefills went on their sessions' streams (a frame is
        # answered whole: a prefill in it would hold the decode steps beside it)
        assert frames.steps_sent == len(SIZES) * DECODES + sum(p == 1 for p in PREFILLS)
        assert frames.frames_sent < frames.steps_sent / 2  # sessions answered together stepped again together
    finally:
        for s in (alone_sequence, framed_sequence):
            run_sync(s.shutdown(), timeout=30)


def test_a_server_without_the_steps_protocol_gets_steps_on_session_streams(tiny_llama, frames_server, monkeypatch):
    # the client asks for a protocol the server does not serve, as it would of an older server
    monkeypatch.setitem(transport.HANDLERS, "steps", transport.HANDLERS["steps"] + "-older-server")
    config = ClientConfig(initial_peers=tuple(frames_server.initial_peers), dht_prefix=PREFIX, verify_rate=0.0)
    framed, alone = RemoteSequence(config, PREFIX, 4, tiny_llama), RemoteSequence(
        dataclasses.replace(config, step_frames=False), PREFIX, 4, tiny_llama)
    try:
        expected = [run_sync(_generate(alone, i)) for i in range(2)]

        async def together():
            return await asyncio.gather(*(_generate(framed, i) for i in range(2)))

        got = run_sync(together(), timeout=60)
        for i in range(2):
            for a, b in zip(got[i], expected[i], strict=True):
                assert (a - b).abs().max().item() <= TOL
        (frames,) = framed._frames.values()
        assert not frames.served and frames.steps_sent == 0  # turned down once, never sent
        assert frames.peer_id not in framed.bans.banned(time.monotonic())  # not taken for a failure
    finally:
        for s in (framed, alone):
            run_sync(s.shutdown(), timeout=30)


class _Raw:
    """A session opened by hand, to put any step in a frame."""

    def __init__(self, stream: Stream, session_id: str):
        self.stream, self.session_id = stream, session_id

    @classmethod
    async def open(cls, peer: Peer, server_id: str) -> "_Raw":
        stream = await Stream.open(peer.p2p, server_id, "inference", TIMEOUT)
        session_id = uuid.uuid4().hex
        await stream.send(OpenSession(session_id=session_id, start=0, end=4, max_length=64, batch_size=1))
        expect(await stream.receive(TIMEOUT), SessionOpened)
        return cls(stream, session_id)

    async def step(self, hidden: torch.Tensor, position: int, step_id: int) -> torch.Tensor:
        await self.stream.send(InferenceStep(session_id=self.session_id, hidden=hidden, start_position=position,
                                             step_id=step_id))
        return expect(await self.stream.receive(TIMEOUT), StepOutput).hidden


def test_each_step_of_a_frame_gets_its_own_answer_and_a_broken_frame_ends_only_the_stream(frames_server):
    async def scenario():
        peers = [await Peer.start(NetworkConfig(initial_peers=tuple(frames_server.initial_peers),
                                                host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=True))
                 for _ in range(2)]
        try:
            (server_id,) = (await fetch_servers(peers[0], PREFIX, [0]))[0]
            good, bad = await _Raw.open(peers[0], server_id), await _Raw.open(peers[0], server_id)
            foreign = await _Raw.open(peers[1], server_id)  # another peer's session
            x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(7))
            expected = await good.step(x[:, :4], 0, 1)  # on its own stream
            await bad.step(x[:, :4], 0, 1)
            await foreign.step(x[:, :4], 0, 1)
            alone = await (await _Raw.open(peers[0], server_id)).step(x, 0, 1)  # what good's next step must give

            frames = await Stream.open(peers[0].p2p, server_id, "steps", TIMEOUT)
            await frames.send(InferenceSteps(
                session_ids=(good.session_id, bad.session_id, foreign.session_id, "no-such-session"),
                hidden=(x[:, 4:5], x[:, 4:5], x[:, 4:5], x[:, 4:5]),
                start_positions=(4, 9, 4, 0),  # bad: beyond the 4 tokens it holds
                step_ids=(2, 2, 2, 2)))
            reply = await frames.receive(TIMEOUT, StepOutputs)
            assert reply.session_ids[0] == good.session_id and reply.step_ids == (2, 2, 2, 2)
            assert reply.error_codes == ("", "bad_request", "unknown_session", "unknown_session")
            assert "start_position 9" in reply.error_messages[1]
            assert reply.positions[0] == 5
            assert (reply.hidden[0] - alone[:, 4:5]).abs().max().item() <= TOL
            assert (expected - alone[:, :4]).abs().max().item() <= TOL
            assert all(h.numel() == 0 for h in reply.hidden[1:])
            # the refused steps changed nothing: both sessions step on where they were
            assert (await bad.step(x[:, 4:5], 4, 3) - alone[:, 4:5]).abs().max().item() <= TOL
            assert (await foreign.step(x[:, 4:5], 4, 3) - alone[:, 4:5]).abs().max().item() <= TOL

            # a malformed frame ends the steps stream with an error, and nothing else
            await frames.send(InferenceSteps(session_ids=(good.session_id,), hidden=(), start_positions=(5,),
                                             step_ids=(3,)))
            with pytest.raises(BadRequest, match="as many hidden states"):
                expect(await frames.receive(TIMEOUT), StepOutputs)
            again = await Stream.open(peers[0].p2p, server_id, "steps", TIMEOUT)
            await again.send(InferenceSteps(session_ids=(good.session_id, good.session_id), hidden=(x[:, :1],) * 2,
                                            start_positions=(5, 5), step_ids=(3, 4)))
            assert isinstance(await again.receive(TIMEOUT), ErrorReply)
            y = torch.randn(1, 1, 64)
            assert (await good.step(y, 5, 3)).shape == (1, 1, 64)  # the session lives on
            for stream in (frames, again, good.stream, bad.stream, foreign.stream):
                stream.close()
        finally:
            for peer in peers:
                await peer.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 120))
