"""The chain a session opens is the planned chain, whole; failover re-plans the hole where it sits.

In-memory swarm (tests/fake_swarm.py): the real routing, session and retry code, fake streams.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

import client.inference_session
from client.inference_session import InferenceSession

from fake_swarm import FakeNet, record, toy_blocks


def _run(net: FakeNet, sequence, steps: int, monkeypatch, kill_after: dict[int, str] | None = None):
    """Prefill 3 tokens then ``steps`` one-token steps; ``kill_after[i]`` is killed after step i."""
    monkeypatch.setattr(client.inference_session, "Stream", net.Stream)
    inputs = torch.randn(1, 3 + steps, 4, generator=torch.Generator().manual_seed(0))

    async def scenario():
        session = InferenceSession(sequence, max_length=16)
        outs = [await session.astep(inputs[:, :3])]
        for i in range(steps):
            if kill_after and i in kill_after:
                net.kill(kill_after[i])
            outs.append(await session.astep(inputs[:, 3 + i:4 + i]))
        chain = [(link.peer_id, link.start, link.end) for link in session.chain]
        await session.aclose()
        return torch.cat(outs, dim=1), chain, session.failovers

    out, chain, failovers = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert torch.allclose(out, toy_blocks(inputs, 0, sequence.num_blocks), atol=1e-5)
    return chain, failovers


@pytest.mark.parametrize("use_push", [True, False])
def test_a_session_opens_the_chain_planned_over_the_whole_model(monkeypatch, use_push):
    # a publishes b1 at 200 ms and b2 at 1 ms; from the client, b1 and b2 look the same
    net = FakeNet({"a": record(0, 2, {"b1": 0.2, "b2": 0.001}), "b1": record(2, 4), "b2": record(2, 4)})
    pings = dict.fromkeys(["a", "b1", "b2"], 0.01)
    chain, _ = _run(net, net.sequence(4, pings, use_push=use_push), 2, monkeypatch)
    # with push the hop a -> b2 is taken; without, every hop goes through the client and the tie goes to b1
    assert chain == [("a", 0, 2), ("b2" if use_push else "b1", 2, 4)]
    assert sorted(net.opened) == sorted(chain)  # no session opened anywhere else


def test_failover_prices_the_replacement_from_the_server_before_it(monkeypatch):
    # x -> m -> y; m dies. m1 and m2 look the same to the client, but x reaches m2 faster
    net = FakeNet({"x": record(0, 1, {"m": 0.001, "m1": 0.3, "m2": 0.001}), "m": record(1, 2, {"y": 0.001}),
                   "m1": record(1, 2, {"y": 0.001}), "m2": record(1, 2, {"y": 0.001}),
                   "y": record(2, 3)})
    pings = {"x": 0.01, "m": 0.5, "m1": 0.5, "m2": 0.5, "y": 0.01}
    sequence = net.sequence(3, pings)
    chain, failovers = _run(net, sequence, 4, monkeypatch, kill_after={1: "m"})
    assert failovers == 1
    assert chain == [("x", 0, 1), ("m2", 1, 2), ("y", 2, 3)]


def test_failover_prices_the_replacement_to_the_server_after_it(monkeypatch):
    net = FakeNet({"x": record(0, 1, {"m": 0.001, "m1": 0.001, "m2": 0.001}), "m": record(1, 2, {"y": 0.001}),
                   "m1": record(1, 2, {"y": 0.001}), "m2": record(1, 2, {"y": 0.4}), "y": record(2, 3)})
    pings = {"x": 0.01, "m": 0.5, "m1": 0.5, "m2": 0.5, "y": 0.01}
    net.servers["m1"].record, net.servers["m2"].record = record(1, 2, {"y": 0.4}), record(1, 2, {"y": 0.001})
    chain, _ = _run(net, net.sequence(3, pings), 3, monkeypatch, kill_after={0: "m"})
    assert chain == [("x", 0, 1), ("m2", 1, 2), ("y", 2, 3)]


def test_a_link_that_fails_to_open_is_banned_and_the_chain_planned_again(monkeypatch):
    net = FakeNet({"a": record(0, 2, {"b1": 0.001, "b2": 0.2}), "b1": record(2, 4), "b2": record(2, 4)})
    net.servers["b1"].alive = False  # still in the DHT view below, but unreachable
    sequence = net.sequence(4, dict.fromkeys(["a", "b1", "b2"], 0.01))
    live = net.by_block
    net.by_block = lambda: {b: {**by, "b1": record(2, 4)} if b >= 2 else by for b, by in live().items()}
    chain, _ = _run(net, sequence, 1, monkeypatch)
    assert chain == [("a", 0, 2), ("b2", 2, 4)]
    assert "b1" in sequence.bans.banned(time.monotonic())
