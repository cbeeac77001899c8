"""Pushes into a session on real peers: only from the hop its client named, with that hop's token.

Any peer that learns a session id (every server of a push chain learns the ids after it) tries to
push steps into it: with no token, with a token the client made for another hop, with a replayed
token, and rewinding the cache. None of it reaches the session; the honest client's generation
equals transformers' own (the fault-free run).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch

from swarm.dht import Peer, fetch_servers
from swarm.errors import SwarmError
from swarm.push_tokens import new_push_key, push_token
from swarm.transport import Stream
from swarm.wire import InferenceStep, OpenSession, SessionOpened, StepOutput, expect

from peer_helpers import join

pytestmark = pytest.mark.integration
TIMEOUT = 30


async def _peer(swarm) -> Peer:
    return await join(swarm.initial_peers)


async def _nothing_arrives(stream: Stream, seconds: float = 1.0) -> None:
    with pytest.raises(SwarmError, match="did not answer"):
        await stream.receive(seconds)


def test_only_the_named_hop_pushes_once_and_never_rewinds(llama_swarm):
    async def scenario():
        client, attacker = await _peer(llama_swarm), await _peer(llama_swarm)
        try:
            servers = await fetch_servers(client, "tiny-llama", [3])
            (last,) = [p for p, r in servers[3].items() if (r.start, r.end) == (3, 4)]
            me, them = client.p2p.peer_id.to_base58(), attacker.p2p.peer_id.to_base58()
            key, session_id = new_push_key(), uuid.uuid4().hex
            session = await Stream.open(client.p2p, last, "inference", TIMEOUT)
            await session.send(OpenSession(session_id=session_id, start=3, end=4, max_length=16, push_key=key))
            expect(await session.receive(TIMEOUT), SessionOpened)
            hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(1))

            def step(token: bytes, step_id: int = 1, position: int = 0, tokens: torch.Tensor = hidden):
                return InferenceStep(session_id=session_id, hidden=tokens, start_position=position, step_id=step_id,
                                     push_token=token)

            rogue = await Stream.open(attacker.p2p, last, "push", TIMEOUT)
            await rogue.send(step(b""))  # no token
            await rogue.send(step(push_token(key, me, 1, 0, 4, None)))  # the token of another hop
            await rogue.send(step(push_token(new_push_key(), them, 1, 0, 4, None)))  # a token under another key
            await _nothing_arrives(session)

            hop = await Stream.open(client.p2p, last, "push", TIMEOUT)  # the hop the client names: itself here
            await hop.send(step(push_token(key, me, 1, 0, 4, None)))
            first = expect(await session.receive(TIMEOUT), StepOutput)
            assert (first.step_id, first.position) == (1, 4)
            await hop.send(step(push_token(key, me, 1, 0, 4, None)))  # replayed: answered once only
            await hop.send(step(push_token(key, me, 2, 4, 1, None), 2, 0, hidden[:, :1]))  # rewinding to 0
            await hop.send(step(push_token(key, me, 2, 4, 1, None), 3, 4, hidden[:, :1]))  # step 2's token
            await _nothing_arrives(session)
            await session.send(InferenceStep(session_id=session_id, hidden=hidden[:, :1], start_position=4,
                                             step_id=4))  # the cache is as step 1 left it
            assert expect(await session.receive(TIMEOUT), StepOutput).position == 5

            # a session opened without a push key takes no pushes at all
            plain_id = uuid.uuid4().hex
            plain = await Stream.open(client.p2p, last, "inference", TIMEOUT)
            await plain.send(OpenSession(session_id=plain_id, start=3, end=4, max_length=16))
            expect(await plain.receive(TIMEOUT), SessionOpened)
            await hop.send(InferenceStep(session_id=plain_id, hidden=hidden, start_position=0, step_id=1,
                                         push_token=push_token(b"", me, 1, 0, 4, None)))
            await _nothing_arrives(plain)
            for stream in (session, rogue, hop, plain):
                stream.close()
        finally:
            await client.shutdown()
            await attacker.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_generation_is_exact_while_a_peer_pushes_into_its_sessions(tiny_llama, llama_swarm, local_llama):
    from swarm import AutoDistributedModelForCausalLM

    ids = torch.randint(3, 1000, (1, 5), generator=torch.Generator().manual_seed(3))
    expected = local_llama.generate(ids, max_new_tokens=10, do_sample=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=llama_swarm.initial_peers)
    model.generation_config.eos_token_id = None

    async def attack(targets: list[tuple[str, str]]) -> None:
        attacker = await _peer(llama_swarm)
        try:
            for peer_id, session_id in targets:  # garbage at position 0 (a rewind), far-future step ids
                stream = await Stream.open(attacker.p2p, peer_id, "push", TIMEOUT)
                for step_id in (1, 5, 10**6):
                    await stream.send(InferenceStep(session_id=session_id, hidden=torch.full((1, 3, 64), 1e4),
                                                    start_position=0, step_id=step_id, push_token=b"\0" * 16))
                stream.close()
        finally:
            await attacker.shutdown()

    try:
        with model.inference_session(max_length=16) as session:
            head = model.generate(ids, max_new_tokens=4, do_sample=False, session=session)
            targets = [(span.link.peer_id, span.session_id) for span in session._spans]
            assert len(targets) == 3
            asyncio.run(asyncio.wait_for(attack(targets), 60))
            whole = model.generate(None, max_new_tokens=6, do_sample=False, session=session)
            assert session.failovers == 0  # no server was thrown off by the pushes (a taken one forces a replay)
        assert torch.equal(head, expected[:, :9]) and torch.equal(whole, expected)
    finally:
        model.shutdown()
