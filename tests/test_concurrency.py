"""Concurrent sessions on one real server: batched steps equal each session alone; a full cache refuses
one session and no other.

Tolerance: float32 hidden states within 1e-5 of the same session run alone on the same server, bfloat16
within 1e-2 of the largest output (batched rows run at another shape, so the matmuls may round
differently; see test_batching.py).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from swarm.dht import Peer, fetch_servers
from swarm.errors import ServerBusy
from swarm.transport import Stream
from swarm.wire import InferenceStep, OpenSession, SessionOpened, StepOutput, expect

from peer_helpers import join, server_info

pytestmark = pytest.mark.integration
TIMEOUT = 30
TOL = 1e-5
PREFIX = "batching-llama"
SIZES = (1, 2, 1, 1)  # rows of each session
PREFILLS = (3, 9, 17, 5)  # tokens of each session's first step; then one token per step
DECODES = 8


def _inputs(i: int) -> torch.Tensor:
    return torch.randn(SIZES[i], PREFILLS[i] + DECODES + 1, 64, generator=torch.Generator().manual_seed(i))


class _Session:
    def __init__(self, stream: Stream, session_id: str):
        self.stream, self.session_id = stream, session_id

    @classmethod
    async def open(cls, peer: Peer, server_id: str, batch: int) -> "_Session":
        stream = await Stream.open(peer.p2p, server_id, "inference", TIMEOUT)
        session_id = uuid.uuid4().hex
        await stream.send(OpenSession(session_id=session_id, start=0, end=4, max_length=256, batch_size=batch))
        expect(await stream.receive(TIMEOUT), SessionOpened)
        return cls(stream, session_id)

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        await self.stream.send(InferenceStep(session_id=self.session_id, hidden=hidden, start_position=position))
        return expect(await self.stream.receive(TIMEOUT), StepOutput).hidden


async def _run(peer: Peer, server_id: str, i: int, steps: int, start_after: asyncio.Event | None = None,
               progress: asyncio.Event | None = None) -> tuple[_Session, list[torch.Tensor]]:
    """Session ``i``: its prefill, then ``steps`` one-token steps; sets ``progress`` after its third."""
    if start_after is not None:
        await start_after.wait()
    x = _inputs(i)
    session = await _Session.open(peer, server_id, SIZES[i])
    outs = [await session.step(x[:, :PREFILLS[i]], 0)]
    for t in range(steps):
        position = PREFILLS[i] + t
        outs.append(await session.step(x[:, position:position + 1], position))
        if t == 2 and progress is not None:
            progress.set()
    return session, outs


async def _tokens_left(peer: Peer, server_id: str) -> int:
    return (await server_info(peer, server_id, TIMEOUT)).cache_tokens_left


def test_concurrent_sessions_equal_each_alone_and_a_full_cache_refuses_one(tiny_llama, llama_swarm):
    # 16 pages of 16 tokens: the four sessions below hold 8 of them at most
    llama_swarm.start_server(tiny_llama, "0:4", "--dht-prefix", PREFIX, "--num-threads", "1", "--cache-tokens", "256",
                             "--peer-cache-share", "1")  # one peer fills the whole cache here

    async def scenario():
        peer = await join(llama_swarm.initial_peers)
        try:
            (server_id,) = (await fetch_servers(peer, PREFIX, [0]))[0]
            alone = []
            for i in range(len(SIZES)):  # each session alone, one after another (session 0: one step more)
                session, outs = await _run(peer, server_id, i, DECODES + (i == 0))
                alone.append(outs)
                session.stream.close()

            # concurrently: session 3 joins after session 0's third step; session 1 leaves after 4 steps
            third = asyncio.Event()
            runs = [_run(peer, server_id, 0, DECODES, progress=third), _run(peer, server_id, 1, 4),
                    _run(peer, server_id, 2, DECODES), _run(peer, server_id, 3, DECODES, start_after=third)]
            results = await asyncio.gather(*runs)
            for i, (_, outs) in enumerate(results):
                for got, expected in zip(outs, alone[i]):
                    assert (got - expected).abs().max().item() <= TOL
            sessions = [session for session, _ in results]
            sessions[1].stream.close()  # its pages go back; sessions 0, 2, 3 hold 1 + 2 + 1 pages
            for _ in range(100):  # the server notices the closed stream asynchronously
                if await _tokens_left(peer, server_id) == 12 * 16:
                    break
                await asyncio.sleep(0.05)
            assert await _tokens_left(peer, server_id) == 12 * 16

            # a session takes every free page, then cannot grow; a new one is refused; the others go on
            hog = await _Session.open(peer, server_id, 1)
            await hog.step(torch.randn(1, 12 * 16, 64), 0)
            with pytest.raises(ServerBusy, match="KV cache is full"):
                await hog.step(torch.randn(1, 1, 64), 12 * 16)
            with pytest.raises(ServerBusy, match="KV cache is full"):
                await _Session.open(peer, server_id, 1)
            position = PREFILLS[0] + DECODES
            extra = await sessions[0].step(_inputs(0)[:, position:position + 1], position)  # within its pages
            assert (extra - alone[0][-1]).abs().max().item() <= TOL
            for session in (*sessions, hog):
                session.stream.close()
        finally:
            await peer.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_bfloat16_server_batches_concurrent_sessions_within_one_rounding_of_alone(tiny_llama, llama_swarm):
    # a server in bfloat16 (as servers usually run): concurrent sessions batch, each within 1e-2 of its largest
    # output when run alone on the same server (batched bfloat16 matmuls round differently; measured 5.1e-3)
    llama_swarm.start_server(tiny_llama, "0:4", "--dht-prefix", PREFIX + "-bf16", "--num-threads", "1",
                             "--dtype", "bfloat16")

    async def scenario():
        peer = await join(llama_swarm.initial_peers)
        try:
            (server_id,) = (await fetch_servers(peer, PREFIX + "-bf16", [0]))[0]
            alone = []
            for i in range(len(SIZES)):
                session, outs = await _run(peer, server_id, i, DECODES)
                alone.append(outs)
                session.stream.close()
            results = await asyncio.gather(*(_run(peer, server_id, i, DECODES) for i in range(len(SIZES))))
            worst = 0.0
            for i, (session, outs) in enumerate(results):
                session.stream.close()
                for got, expected in zip(outs, alone[i]):
                    assert got.dtype == torch.bfloat16
                    worst = max(worst, ((got - expected).abs().max() / expected.abs().max()).item())
            assert worst <= 1e-2, worst
        finally:
            await peer.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 120))
