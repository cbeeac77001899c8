"""Server-to-server push on real peers: outputs go straight to the next server; failures fall back."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from swarm.dht import Peer
from swarm.errors import BadRequest
from swarm.push_tokens import push_token
from swarm.transport import Stream
from swarm.wire import FetchOutputs, InferenceStep, OpenSession, SessionOpened, SessionOutputs, StepOutput, expect

from peer_helpers import join, server_of

pytestmark = pytest.mark.integration
TIMEOUT = 30


KEY = b"k" * 32  # every session's push key here (a client draws a random one per session)


async def _open(peer: Peer, server_id: str, start: int, end: int, echo: bool = True) -> tuple[Stream, str]:
    stream = await Stream.open(peer.p2p, server_id, "inference", TIMEOUT)
    session_id = uuid.uuid4().hex
    await stream.send(OpenSession(session_id=session_id, start=start, end=end, max_length=16, push_key=KEY,
                                  echo=echo))
    expect(await stream.receive(TIMEOUT), SessionOpened)
    return stream, session_id


async def _middle_and_last(peer: Peer) -> tuple[str, str]:
    """The peer ids of the servers of blocks 1:3 and 3:4."""
    return await server_of(peer, "tiny-llama", 1, 3), await server_of(peer, "tiny-llama", 3, 4)


def test_push_reaches_the_next_server_and_a_failed_push_falls_back(llama_swarm):
    async def scenario():
        peer = await join(llama_swarm.initial_peers)
        try:
            middle, last = await _middle_and_last(peer)
            hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))

            # reference: the client carries the states from one server to the next
            a, a_id = await _open(peer, middle, 1, 3)
            b, b_id = await _open(peer, last, 3, 4)
            await a.send(InferenceStep(session_id=a_id, hidden=hidden, start_position=0, step_id=1))
            mid = expect(await a.receive(TIMEOUT), StepOutput)
            assert not mid.pushed
            await b.send(InferenceStep(session_id=b_id, hidden=mid.hidden, start_position=0, step_id=1))
            reference = expect(await b.receive(TIMEOUT), StepOutput).hidden

            # push: the middle server sends its output to the last one, which answers on its own stream
            c, c_id = await _open(peer, middle, 1, 3)
            d, d_id = await _open(peer, last, 3, 4)
            await c.send(InferenceStep(session_id=c_id, hidden=hidden, start_position=0, step_id=1,
                                       next_servers=((last, d_id, push_token(KEY, middle, 1, 0, 4, None)),)))
            pushed_mid = expect(await c.receive(TIMEOUT), StepOutput)
            assert pushed_mid.pushed and pushed_mid.step_id == 1
            final = expect(await d.receive(TIMEOUT), StepOutput)
            assert final.step_id == 1 and final.position == 4
            assert torch.allclose(final.hidden, reference, atol=1e-6)

            # the same step sent again by the client is a duplicate: answered once only
            await d.send(InferenceStep(session_id=d_id, hidden=pushed_mid.hidden, start_position=0, step_id=1))
            await d.send(InferenceStep(session_id=d_id, hidden=pushed_mid.hidden[:, :1], start_position=4,
                                       step_id=2))
            second = expect(await d.receive(TIMEOUT), StepOutput)
            assert second.step_id == 2 and second.position == 5

            # a push to a peer that does not exist fails; the server says so, and the client carries on
            e, e_id = await _open(peer, middle, 1, 3)
            await e.send(InferenceStep(session_id=e_id, hidden=hidden, start_position=0, step_id=1,
                                       next_servers=(("12D3KooWNoSuchPeerNoSuchPeerNoSuchPeerNoSuchPeer1", "x", b""),)))
            failed = expect(await e.receive(TIMEOUT), StepOutput)
            assert not failed.pushed
            assert torch.allclose(failed.hidden, mid.hidden, atol=1e-6)
            for stream in (a, b, c, d, e):
                stream.close()
        finally:
            await peer.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_push_without_echo_acknowledges_and_keeps_the_outputs_for_a_replay(llama_swarm):
    async def scenario():
        peer = await join(llama_swarm.initial_peers)
        try:
            middle, last = await _middle_and_last(peer)
            hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(1))
            more = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(2))

            # reference, with echo: the middle server's outputs of both steps
            a, a_id = await _open(peer, middle, 1, 3)
            await a.send(InferenceStep(session_id=a_id, hidden=hidden, start_position=0, step_id=1))
            first = expect(await a.receive(TIMEOUT), StepOutput).hidden
            await a.send(InferenceStep(session_id=a_id, hidden=more, start_position=3, step_id=2))  # rolls back 1
            second = expect(await a.receive(TIMEOUT), StepOutput).hidden
            with pytest.raises(BadRequest, match="echo"):  # a session with echo keeps no outputs
                await a.send(FetchOutputs(session_id=a_id, start=0, end=5))
                expect(await a.receive(TIMEOUT), SessionOutputs)

            # without echo: pushed steps are acknowledged, the next server answers with its outputs
            c, c_id = await _open(peer, middle, 1, 3, echo=False)
            d, d_id = await _open(peer, last, 3, 4, echo=False)
            for step_id, (states, start) in enumerate(((hidden, 0), (more, 3)), start=1):
                await c.send(InferenceStep(session_id=c_id, hidden=states, start_position=start, step_id=step_id,
                                           next_servers=((last, d_id, push_token(KEY, middle, step_id, start,
                                                                                 states.shape[1], None)),)))
                ack = expect(await c.receive(TIMEOUT), StepOutput)
                assert ack.pushed and ack.hidden is None and ack.step_id == step_id
                final = expect(await d.receive(TIMEOUT), StepOutput)
                assert final.hidden is not None and final.hidden.shape == states.shape
            # the middle server kept what it pushed: after the rollback, tokens 0:3 of the first step, then the second
            await c.send(FetchOutputs(session_id=c_id, start=0, end=5))
            kept = expect(await c.receive(TIMEOUT), SessionOutputs)
            assert kept.start == 0
            assert torch.equal(kept.hidden, torch.cat([first[:, :3], second], dim=1))
            await c.send(FetchOutputs(session_id=c_id, start=2, end=5))
            assert torch.equal(expect(await c.receive(TIMEOUT), SessionOutputs).hidden, kept.hidden[:, 2:])
            for start, end in ((0, 6), (3, 2), (-1, 2)):  # beyond what it holds, or no range at all
                await c.send(FetchOutputs(session_id=c_id, start=start, end=end))
                with pytest.raises(BadRequest, match="outputs"):
                    expect(await c.receive(TIMEOUT), SessionOutputs)
            # the session lives on after a bad request
            await c.send(InferenceStep(session_id=c_id, hidden=more[:, :1], start_position=5, step_id=3))
            assert expect(await c.receive(TIMEOUT), StepOutput).hidden.shape == (1, 1, 64)
            for stream in (a, c, d):
                stream.close()
        finally:
            await peer.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_generation_is_identical_with_and_without_push(tiny_llama, llama_swarm, local_llama):
    from swarm import AutoDistributedModelForCausalLM

    ids = torch.randint(3, 1000, (2, 6), generator=torch.Generator().manual_seed(11))
    expected = local_llama.generate(ids, max_new_tokens=10, do_sample=False)
    for use_push, push_echo in ((True, False), (True, True), (False, None)):
        model = AutoDistributedModelForCausalLM.from_pretrained(  # no echo only without checks (verify_rate=0)
            tiny_llama, initial_peers=llama_swarm.initial_peers, use_push=use_push, push_echo=push_echo,
            verify_rate=0.0 if push_echo is False else 0.05)
        model.generation_config.eos_token_id = None
        try:
            assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), expected)
        finally:
            model.shutdown()


def test_outputs_kept_without_echo_are_charged_to_the_cache(llama_swarm):
    """A session without echo keeps its outputs for replays: they take pages of --cache-tokens like its keys and
    values (tiny Llama, blocks 1:3: 12 tokens of keys and values fill one page, their 12 outputs one more)."""
    async def scenario():
        peer = await join(llama_swarm.initial_peers)
        streams = []
        try:
            middle, _ = await _middle_and_last(peer)
            hidden = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(3))

            async def open_and_step(echo: bool) -> int:
                """Tokens the server had left before this session; then a 12-token step in it."""
                stream = await Stream.open(peer.p2p, middle, "inference", TIMEOUT)
                streams.append(stream)
                session_id = uuid.uuid4().hex
                await stream.send(OpenSession(session_id=session_id, start=1, end=3, max_length=16, echo=echo))
                left = expect(await stream.receive(TIMEOUT), SessionOpened).cache_tokens_left
                await stream.send(InferenceStep(session_id=session_id, hidden=hidden, start_position=0, step_id=1))
                expect(await stream.receive(TIMEOUT), StepOutput)
                return left

            before_no_echo = await open_and_step(echo=False)
            before_echo = await open_and_step(echo=True)
            after = await open_and_step(echo=True)
            with_echo, without_echo = before_echo - after, before_no_echo - before_echo
            assert with_echo > 0 and without_echo == 2 * with_echo, (without_echo, with_echo)
        finally:
            for stream in streams:
                stream.close()
            await peer.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 120))
