"""Push without echo (client/inference_session.py): servers acknowledge pushed steps, keep their outputs,
and a failover fetches a failed server's inputs from the server before it. In-memory swarm
(tests/fake_swarm.py): the real session, routing and retry code, fake streams."""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarm.config import ClientConfig
from swarm.errors import ConfigError

import client.inference_session
from client.inference_session import InferenceSession

import fake_swarm
from fake_swarm import FAKE_PEER, FakeNet, record, toy_blocks

CHAIN = {"a": record(0, 1, {"b": 0.001}), "b": record(1, 2, {"c": 0.001}), "c": record(2, 3, {"d": 0.001}),
         "d": record(3, 4)}
SPARES = {"b2": record(1, 2, {"c": 0.001}), "c2": record(2, 3, {"d": 0.001})}


def _net(monkeypatch, spares: bool = True) -> FakeNet:
    net = FakeNet({**CHAIN, **(SPARES if spares else {})})
    monkeypatch.setattr(client.inference_session, "Stream", net.Stream)
    return net


def _pings() -> dict[str, float]:
    return {"a": 0.01, "b": 0.01, "c": 0.01, "d": 0.01, "b2": 0.05, "c2": 0.05}


def _generate(net: FakeNet, steps: int, kill: dict[int, list[str]] | None = None, hypo_at: int | None = None,
              **config) -> tuple[InferenceSession, list[str]]:
    """A 3-token prefill then ``steps`` one-token steps of a batch of 2; ``kill[i]``: servers killed before step i;
    ``hypo_at``: swap the two rows (beam search) at that step. Checks the outputs; returns the session and the
    peers of its chain at the end."""
    sequence = net.sequence(4, _pings(), **{"verify_rate": 0.0, **config})  # no checks: echo off by default
    inputs = torch.randn(2, 3 + steps, 4, generator=torch.Generator().manual_seed(3))

    async def scenario():
        session = InferenceSession(sequence, max_length=16)
        outs = [await session.astep(inputs[:, :3])]
        for i in range(steps):
            for peer_id in (kill or {}).get(i, []):
                net.kill(peer_id)
            if i == hypo_at:
                session.pending_hypo_ids = torch.tensor([1, 0])
            outs.append(await session.astep(inputs[:, 3 + i:4 + i]))
        chain = [link.peer_id for link in session.chain]
        await session.aclose()
        return outs, session, chain

    outs, session, chain = asyncio.run(asyncio.wait_for(scenario(), 30))
    if hypo_at is None:
        reference = toy_blocks(inputs, 0, 4)
        assert torch.allclose(torch.cat(outs, dim=1), reference, atol=1e-5)
    else:  # the rows swapped their histories before step hypo_at
        swapped = torch.cat([inputs[:, :3 + hypo_at][[1, 0]], inputs[:, 3 + hypo_at:]], dim=1)
        assert torch.allclose(torch.cat(outs[1 + hypo_at:], dim=1),
                              toy_blocks(swapped, 0, 4)[:, 3 + hypo_at:], atol=1e-5)
    return session, chain


def test_pushed_steps_are_acknowledged_without_their_outputs(monkeypatch):
    net = _net(monkeypatch, spares=False)
    _generate(net, 3)
    for peer_id in "abc":  # every server but the last pushed on: no hidden states back to the client
        assert all(answer.pushed and answer.hidden is None for answer in net.servers[peer_id].answers)
    assert all(answer.hidden is not None for answer in net.servers["d"].answers)
    assert sum(s.fetches for s in net.servers.values()) == 0  # nothing fetched while nothing fails
    assert sum(s.refused_pushes for s in net.servers.values()) == 0  # each hop had its push token


def test_the_last_server_keeps_no_outputs(monkeypatch):
    """Its outputs are the chain's, sent to the client with every step: kept too, they would only take its cache."""
    net = _net(monkeypatch, spares=False)
    kept: dict[str, list[bool]] = {}
    step = fake_swarm.FakeServer.step

    def recording_step(server, session, msg):
        step(server, session, msg)
        kept.setdefault(server.peer_id, []).append(session.outputs is not None)

    monkeypatch.setattr(fake_swarm.FakeServer, "step", recording_step)
    _generate(net, 2)
    assert all(all(kept[peer_id]) for peer_id in "abc") and len(kept["a"]) == 3  # they push on: outputs kept
    assert kept["d"] == [False] * 3
    assert all(answer.hidden is not None for answer in net.servers["d"].answers)


@pytest.mark.parametrize("config", [dict(push_echo=True), dict(verify_rate=0.05)])
def test_with_push_echo_every_server_sends_its_outputs_back(monkeypatch, config):
    """Asked for, or while the client verifies servers (a check needs every span's inputs and outputs)."""
    net = _net(monkeypatch, spares=False)
    _generate(net, 2, **config)
    assert all(answer.hidden is not None for s in net.servers.values() for answer in s.answers)
    assert all(answer.pushed for peer_id in "abc" for answer in net.servers[peer_id].answers)


def test_no_echo_and_verification_do_not_go_together():
    with pytest.raises(ConfigError, match="push_echo=False leaves the client no span inputs"):
        ClientConfig(initial_peers=(FAKE_PEER,), push_echo=False, verify_rate=0.05)
    ClientConfig(initial_peers=(FAKE_PEER,), push_echo=False, verify_rate=0.0)
    ClientConfig(initial_peers=(FAKE_PEER,), push_echo=False, use_push=False)  # no push: nothing to echo


@pytest.mark.parametrize("killed", [["b"], ["c"], ["b", "c"]])
def test_a_failed_server_is_rebuilt_from_the_outputs_the_server_before_it_kept(monkeypatch, killed):
    net = _net(monkeypatch)
    session, chain = _generate(net, 4, kill={2: killed})
    assert chain == ["a", "b2" if "b" in killed else "b", "c2" if "c" in killed else "c", "d"]
    assert session.failovers == len(killed)
    # the failed server's inputs came from the server before it (a for b; b, or b's replacement, for c)
    assert net.servers["a" if "b" in killed else "b"].fetches == 1
    if killed == ["b", "c"]:
        assert net.servers["b2"].fetches == 1


def test_a_server_failing_with_the_one_before_it_is_rebuilt_after_it(monkeypatch):
    # c dies; asked for c's inputs, b fails too: b is rebuilt first (from a), then c (from b's replacement)
    net = _net(monkeypatch)
    net.servers["b"].die_on_fetch = True
    session, chain = _generate(net, 3, kill={1: ["c"]})
    assert chain == ["a", "b2", "c2", "d"] and session.failovers == 2
    assert net.servers["a"].fetches == 1 and net.servers["b2"].fetches == 1


def test_beam_reorder_and_failover_in_the_same_step(monkeypatch):
    net = _net(monkeypatch)
    session, chain = _generate(net, 3, kill={1: ["c"]}, hypo_at=1)
    assert chain == ["a", "b", "c2", "d"] and session.failovers == 1
