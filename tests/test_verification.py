"""swarm.verification: the comparison of two servers' outputs, its tolerances and verdicts; client.verifier's
choice of checkers over in-memory fake servers (no peers)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from swarm.errors import MissingBlocksError, WrongResult
from swarm.routing import ChainLink
from swarm.records import ReportRecord, ServerRecord, ServerState, decode_record, encode_record, reports_key
from swarm.verification import FLOAT32_TOLERANCE, HALF_TOLERANCE, disagreement, judge, tolerance

from client.tuning import Extras
from client.verifier import Verifier


def rec(dtype: str = "float32", quant: str = "none") -> ServerRecord:
    return ServerRecord(state=ServerState.ONLINE, start=0, end=4, dtype=dtype, quant=quant)


def test_tolerance_depends_on_what_both_servers_run():
    assert tolerance(rec(), rec()) == FLOAT32_TOLERANCE == 5e-3
    assert tolerance(rec(), rec("bfloat16")) == tolerance(rec("float16"), rec("float16")) == HALF_TOLERANCE
    assert tolerance(rec(quant="int8"), rec(quant="int8")) == HALF_TOLERANCE
    assert tolerance(rec(quant="int8"), rec()) is None and tolerance(rec(quant="nf4"), rec(quant="int8")) is None
    # a 1e-2 error is caught between float32 servers, and honest bfloat16 noise (measured <= 4.4e-2) passes
    assert FLOAT32_TOLERANCE < 1e-2 and 4.4e-2 < HALF_TOLERANCE


def test_disagreement_is_the_worst_row():
    reference = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    assert disagreement(reference.clone(), reference) == 0.0
    claimed = reference.clone()
    claimed[1, 3] *= 1.02
    assert disagreement(claimed, reference) == pytest.approx(0.02, rel=1e-3)
    assert disagreement(reference.to(torch.bfloat16), reference) < 1e-2  # bfloat16 rounding alone
    for bad in (torch.full_like(reference, float("nan")), reference[:, :4], reference * float("inf")):
        assert disagreement(bad, reference) == float("inf")
    assert disagreement(reference[:, :0], reference[:, :0]) == 0.0


def test_verdicts():
    reference = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(1))
    wrong = reference * 1.05
    assert judge(reference + 1e-7, reference, 5e-3, "S", ("C",)).agrees
    # no second opinion: either of the two may lie, nobody is blamed
    verdict = judge(wrong, reference, 5e-3, "S", ("C",))
    assert verdict.inconclusive and not verdict.agrees and not verdict.wrong
    # a second checker agrees with the first: the checked server is wrong
    assert judge(wrong, reference, 5e-3, "S", ("C",), reference, 5e-3).wrong == ("S",)
    # the second agrees with the checked server: the first checker lied
    assert judge(reference, wrong, 5e-3, "S", ("C",), reference, 5e-3).wrong == ("C",)
    # three different answers: nobody can be blamed
    verdict = judge(wrong, reference, 5e-3, "S", ("C",), reference * 0.9, 5e-3)
    assert verdict.inconclusive and not verdict.agrees and not verdict.wrong
    assert verdict.error == pytest.approx(0.05, rel=1e-3)
    # a second opinion too coarse to tell them apart (a bfloat16 server, 0.15) agrees with both: nobody blamed
    verdict = judge(wrong, reference, 5e-3, "S", ("C",), reference * 1.02, HALF_TOLERANCE)
    assert verdict.inconclusive and not verdict.wrong
    # non-finite outputs are wrong whatever a (lying) second checker says, or with no second opinion
    assert judge(reference * float("nan"), reference, 5e-3, "S", ("C",), reference * 0.9, 5e-3).wrong == ("S",)
    assert judge(reference * float("nan"), reference, 5e-3, "S", ("C",)).wrong == ("S",)


def test_report_record_round_trips():
    record = ReportRecord(wrong={"12D3KooWPeer": "blocks 0:4: relative error 1.0e-02 > 5e-03"})
    assert decode_record(ReportRecord, encode_record(record)) == record
    assert reports_key("Qwen2.5-7B") == "Qwen2.5-7B.reports"


class _FakeSequence:
    """What client.verifier.Verifier uses of a RemoteSequence, over in-memory servers of blocks 0:4: each
    server is ``(record, how it computes)``; chains are drawn at random like real checks."""

    def __init__(self, servers: dict, seed: int):
        self.servers, self.rng = servers, random.Random(seed)
        self.asked: list[str] = []
        self.banned: dict[str, BaseException] = {}

    def record(self, peer_id, block):
        return self.servers[peer_id][0] if peer_id in self.servers else None

    def records(self, start, end):
        return {peer_id: record for peer_id, (record, _) in self.servers.items()}

    async def chain(self, start, end, purpose, exclude, wait):
        options = sorted(set(self.servers) - set(exclude) - set(self.banned))
        if not options:
            raise MissingBlocksError("no server left")
        return [ChainLink(self.rng.choice(options), 0, 4)]

    async def forward_link(self, link, hidden, extras):
        self.asked.append(link.peer_id)
        return self.servers[link.peer_id][1](hidden)

    def ban(self, peer_id, error=None, cost=0.0):
        self.banned[peer_id] = error

    async def report(self, peer_id, reason):
        pass


def _honest(hidden):
    return hidden * 2.0


def _perturbed(hidden):
    return _honest(hidden) * 1.01  # relative error 1e-2


def _half(hidden):
    return (_honest(hidden) + 1e-3 * torch.randn_like(hidden)).to(torch.bfloat16).float()


@pytest.mark.parametrize("seed", range(8))
def test_a_float32_server_is_judged_by_float32_checkers_when_there_are_some(seed):
    """Checkers as precise as the checked server are drawn first, and only they can break a tie."""
    sequence = _FakeSequence({"S": (rec(), _honest), "C": (rec(), _honest), "D": (rec(), _honest),
                              "B": (rec("bfloat16"), _half)}, seed)
    verifier = Verifier(sequence, 1.0)
    inputs = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(seed))
    verdict = asyncio.run(verifier.check(ChainLink("S", 0, 4), inputs, _perturbed(inputs), Extras()))
    assert verdict.wrong == ("S",) and "B" not in sequence.asked and isinstance(sequence.banned["S"], WrongResult)


@pytest.mark.parametrize("seed", range(8))
def test_an_honest_server_is_never_blamed_on_a_lying_checkers_word(seed):
    """An honest server checked by a rogue, with only a bfloat16 server (too coarse to tell 1e-2 apart) left to
    decide: nobody is blamed. With a float32 third server, the rogue is."""
    servers = {"S": (rec(), _honest), "R": (rec(), _perturbed), "B": (rec("bfloat16"), _half)}
    inputs = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(seed))
    sequence = _FakeSequence(servers, seed)
    verifier = Verifier(sequence, 1.0)
    verdict = asyncio.run(verifier.check(ChainLink("S", 0, 4), inputs, _honest(inputs), Extras()))
    assert "S" not in sequence.banned and (verdict.agrees or verdict.inconclusive)  # B checked it, or R did
    sequence = _FakeSequence({**servers, "D": (rec(), _honest)}, seed)
    verifier = Verifier(sequence, 1.0)
    verdict = asyncio.run(verifier.check(ChainLink("S", 0, 4), inputs, _honest(inputs), Extras()))
    assert "S" not in sequence.banned and (verdict.agrees or verdict.wrong == ("R",))
