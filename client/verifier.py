"""Checking servers' work: a random sample of span steps and forward passes is re-run on other servers.

With ``ClientConfig.verify_rate`` = r, each span of each inference step, and each link of each
forward pass, is checked with probability r. A check sends the span's inputs (for an inference
session: every input the span has cached, so one check covers every step the span ran so far) to
another server holding those blocks as a forward pass, and compares its outputs with the ones the
checked server gave (:mod:`swarm.verification`: relative error per token, tolerance by dtype).
Checkers as precise as the checked server are preferred (a bfloat16 one could only see a float32
server's gross errors). If they disagree, a third server precise enough to tell the two apart
decides; without one nobody is blamed. A server found wrong is never used again by this client
and is reported in the DHT (``"{prefix}.reports"``, shown on the health page).

Detection: a server that returns wrong outputs on a fraction f of its steps is caught at the first
check of its span after its first wrong step: on average 1/f + 1/r steps; the chance that it goes
unchecked for n more steps is (1 - r)^n.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from swarm.errors import MissingBlocksError, SwarmError, WrongResult
from swarm.records import ServerRecord
from swarm.routing import ChainLink
from swarm.verification import Verdict, disagreement, judge, tolerance

if TYPE_CHECKING:
    from client.remote_sequence import RemoteSequence
    from client.tuning import Extras

logger = logging.getLogger(__name__)

ATTEMPTS = 8  # servers a recomputation tries before the check is given up


@dataclasses.dataclass
class VerificationStats:
    checks: int = 0  # comparisons made
    unverifiable: int = 0  # draws with no other server (of the same quantization) to check against
    disagreements: int = 0  # checks that found someone wrong
    inconclusive: int = 0  # checks with three different answers (nobody blamed)
    tokens: int = 0  # tokens re-run on other servers
    largest_agreeing_error: float = 0.0  # the largest disagreement still within tolerance


class Verifier:
    """One client's checks; owned by its :class:`~client.remote_sequence.RemoteSequence`."""

    def __init__(self, sequence: RemoteSequence, rate: float, rng: random.Random | None = None):
        self.sequence, self.rate = sequence, rate
        self.rng = rng or random.Random()
        self.stats = VerificationStats()

    def draw(self) -> bool:
        """Whether to check the span step (or forward link) just done."""
        return self.rate > 0 and self.rng.random() < self.rate

    async def check(self, link: ChainLink, inputs: torch.Tensor, claimed: torch.Tensor,
                    extras: Extras, failed: set[str] | None = None) -> Verdict | None:
        """Re-runs blocks ``link.start:link.end`` on ``inputs`` ([batch, seq, hidden], with ``extras``) on other
        servers and judges ``claimed``, what ``link.peer_id`` returned for them. Servers found wrong are banned
        for good and reported. Returns None if no other server could check. Servers that fail to recompute are
        added to ``failed`` and not asked again (by checks given the same set)."""
        failed = set() if failed is None else failed
        checked = self.sequence.record(link.peer_id, link.start)
        # checkers as precise as the checked server, if enough of them hold its blocks (a bfloat16 checker
        # could only tell a float32 server's gross errors)
        own = tolerance(checked, checked) if checked is not None else None
        coarse = self._coarser(checked, link, lambda t: t > own) if own is not None else set()
        first = await self._recompute(link, inputs, extras, {link.peer_id}, failed, coarse)
        if checked is None or first is None or (tol := tolerance(checked, *first[2])) is None:
            self.stats.unverifiable += 1
            logger.info("Could not check blocks %d:%d of server %s: %s", link.start, link.end, link.peer_id,
                        "no record of it" if checked is None else "no other server answered" if first is None
                        else "no other server of its quantization")
            return None
        error = disagreement(claimed, first[0])
        second_out, second_tol = None, None
        if tol < error < float("inf"):  # a third server decides; one that cannot tell the two apart is no use
            exclude, too_coarse = {link.peer_id, *first[1]}, self._coarser(checked, link, lambda t: t >= error)
            for _ in range(ATTEMPTS):
                second = await self._recompute(link, inputs, extras, exclude, failed, too_coarse)
                if second is None:
                    break
                second_tol = tolerance(checked, *second[2])
                if second_tol is not None and second_tol < error:
                    second_out = second[0]
                    break
                exclude |= set(second[1]) & too_coarse or set(second[1])
                second_tol = None
        verdict = judge(claimed, first[0], tol, link.peer_id, first[1], second_out, second_tol)
        self.stats.checks += 1
        self.stats.tokens += inputs.shape[0] * inputs.shape[1]
        if verdict.agrees:
            self.stats.largest_agreeing_error = max(self.stats.largest_agreeing_error, verdict.error)
            return verdict
        if verdict.inconclusive:
            self.stats.inconclusive += 1
            logger.warning("Checking blocks %d:%d of server %s: it and server(s) %s disagree (%.2e apart) and no "
                           "third server could tell which is right; nobody blamed", link.start, link.end,
                           link.peer_id, ", ".join(first[1]), verdict.error)
            return verdict
        self.stats.disagreements += 1
        for peer_id in verdict.wrong:
            error = WrongResult(f"server {peer_id} computed blocks {link.start}:{link.end} wrong: relative error "
                                f"{verdict.error:.2e} against another server's result, tolerance {verdict.tolerance:.0e}")
            self.sequence.ban(peer_id, error)
            await self.sequence.report(peer_id, f"blocks {link.start}:{link.end}: relative error {verdict.error:.2e} "
                                                f"> {verdict.tolerance:.0e}")
        return verdict

    def _coarser(self, checked: ServerRecord, link: ChainLink, too_coarse: Callable[[float], bool]) -> set[str]:
        """Servers of blocks ``link.start:link.end`` (last lookup) whose results cannot be compared with
        ``checked``'s, or only with a tolerance that is ``too_coarse``."""
        return {peer_id for peer_id, record in self.sequence.records(link.start, link.end).items()
                if (tol := tolerance(checked, record)) is None or too_coarse(tol)}

    async def _recompute(self, link: ChainLink, inputs: torch.Tensor, extras: Extras, exclude: set[str],
                         failed: set[str], avoid: set[str] = frozenset()
                         ) -> tuple[torch.Tensor, tuple[str, ...], list] | None:
        """``(outputs, peer ids, their records)`` of blocks ``link.start:link.end`` on ``inputs`` by servers
        not in ``exclude`` nor ``failed`` (nor ``avoid``, if the others cover the blocks), or None if none could.
        A server that fails is banned, added to ``failed`` and another one tried, at most :data:`ATTEMPTS` times."""
        for _ in range(ATTEMPTS):
            try:
                try:
                    chain = await self.sequence.chain(link.start, link.end, purpose="check",
                                                      exclude=exclude | failed | avoid, wait=False)
                except MissingBlocksError:
                    if not avoid - exclude - failed:
                        raise
                    chain = await self.sequence.chain(link.start, link.end, purpose="check", exclude=exclude | failed,
                                                      wait=False)
            except MissingBlocksError as e:
                logger.info("Could not check blocks %d:%d: %s", link.start, link.end, e)
                return None
            out = inputs
            try:
                for other in chain:
                    out = (await self.sequence.forward_link(other, out, extras)).to(inputs.dtype)
            except SwarmError as e:
                self.sequence.ban(other.peer_id, e)
                failed.add(other.peer_id)
                logger.info("Checking blocks %d:%d: server %s failed (%s)", link.start, link.end, other.peer_id, e)
                continue
            records = [self.sequence.record(other.peer_id, other.start) for other in chain]
            if any(record is None for record in records):
                return None
            return out, tuple(other.peer_id for other in chain), records
        return None
