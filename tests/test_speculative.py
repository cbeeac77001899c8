"""Speculative decoding's draft length (client/speculative.py): pure cost model, and rollback in a session."""

from __future__ import annotations

import asyncio

import pytest
import torch

import client.inference_session
from client.inference_session import InferenceSession
from client.speculative import best_draft_length, expected_tokens
from swarm.errors import BadRequest

from fake_swarm import FakeNet, record, toy_blocks


def test_expected_tokens_counts_accepted_drafts_plus_the_models_own_token():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_draft_length_grows_with_the_round_trip_and_the_acceptance():
    # loopback: a step costs about what a few draft tokens do, so long drafts do not pay
    near = best_draft_length(0.7, step_s=0.003, draft_token_s=0.001, max_k=20)
    far = best_draft_length(0.7, step_s=0.100, draft_token_s=0.001, max_k=20)
    assert near < far
    assert best_draft_length(0.9, 0.1, 0.001, 20) > far
    assert best_draft_length(0.1, 0.1, 0.001, 20) <= 2
    assert best_draft_length(1.0, 0.1, 0.001, 20) == 20  # always right: as long as allowed
    assert best_draft_length(0.7, 0.1, 0.001, 3) == 3


def test_draft_length_maximizes_tokens_per_second():
    for acceptance in (0.3, 0.6, 0.8):
        k = best_draft_length(acceptance, 0.05, 0.002, 30)
        rates = [expected_tokens(acceptance, j) / (0.05 + j * 0.002) for j in range(1, 31)]
        assert rates[k - 1] == max(rates)


def test_a_session_rolls_back_and_a_failover_after_it_replays_only_what_was_kept(monkeypatch):
    # verify 4 draft tokens, keep 2 (rollback), go on; then a server dies: its replacement must get the kept
    # history only, or its outputs (which depend on every cached input) differ from the reference
    net = FakeNet({"a": record(0, 2), "b": record(2, 4), "b2": record(2, 4)})
    sequence = net.sequence(4, {"a": 0.01, "b": 0.01, "b2": 0.02})
    monkeypatch.setattr(client.inference_session, "Stream", net.Stream)
    tokens = torch.randn(1, 12, 4, generator=torch.Generator().manual_seed(1))
    wrong = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(2))

    async def scenario():
        session = InferenceSession(sequence, max_length=16)
        await session.astep(tokens[:, :3])
        await session.astep(torch.cat([tokens[:, 3:5], wrong], dim=1))  # 2 right drafts, 2 wrong ones
        session.rollback(2)
        with pytest.raises(BadRequest):
            session.rollback(6)
        assert session.position == 5
        out = [await session.astep(tokens[:, 5:7])]
        net.kill(session.chain[1].peer_id)
        out.append(await session.astep(tokens[:, 7:9]))
        assert session.failovers == 1 and session.chain[1].peer_id == "b2"
        await session.aclose()
        return torch.cat(out, dim=1)

    out = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert torch.allclose(out, toy_blocks(tokens[:, :9], 0, 4)[:, 5:9], atol=1e-5)


@pytest.mark.integration
def test_speculative_sampling_through_the_swarm_keeps_the_models_distribution(tiny_llama, swarm_llama, local_llama):
    # the draft (the model's first layer) and the model disagree: at temperature 0.05 the model puts 0.64 on one
    # next token that the draft gives 0.01. Sampled tokens must follow the model, not the draft.
    from swarm.tiny import load_draft

    draft = load_draft(tiny_llama, 1)
    ids = torch.randint(3, 1000, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        p = (local_llama(ids).logits[0, -1] / 0.05).softmax(-1)
        q = (draft(ids).logits[0, -1] / 0.05).softmax(-1)
    token = int(p.argmax())
    assert p[token] > 0.5 and q[token] < 0.05  # the case is as described
    torch.manual_seed(0)
    samples = 60
    firsts = []
    with swarm_llama.inference_session(max_length=16) as session:
        for _ in range(samples):  # each sample starts the session over: rolled back to nothing
            session.rollback(session.position)
            session.token_ids = None
            out = swarm_llama.generate(ids, max_new_tokens=2, do_sample=True, temperature=0.05, top_k=0,
                                       assistant_model=draft, session=session)
            firsts.append(int(out[0, 5]))
    share = firsts.count(token) / samples
    # binomial(60, p): 4 standard deviations either way (0.25 here)
    assert abs(share - float(p[token])) < 4 * (float(p[token] * (1 - p[token])) / samples) ** 0.5, share
