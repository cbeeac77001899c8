"""Pure block placement: which span a server should hold so that the swarm is as fast as it can be.

No I/O and no clock: the functions take the records a caller fetched from the DHT
(``{block: {peer_id: ServerRecord}}``, as :func:`swarm.dht.fetch_servers` returns them) and numbers.

The model: every JOINING or ONLINE server adds its ``throughput`` (tokens/s per block it offers) to
each block of its span; a block's **total** is that sum. A request crosses every block, so the
swarm is as fast as its **bottleneck**, the smallest total; a block with total 0 is a **gap**, and
while there is a gap the model cannot run at all.

- :func:`block_totals` — each block's total, optionally without some servers
- :func:`typical_throughput` — what a server that has not measured yet is assumed to offer
- :func:`choose_span` — the start of the window where the swarm is weakest (where a new server helps most)
- :class:`SwarmScore` / :func:`swarm_score` — gaps and bottleneck of a swarm, to compare placements
- :func:`should_move` — whether a serving server should move, and where, as a :class:`MoveDecision`
- :func:`settle_span` — right after announcing JOINING: where to load instead, now that servers started
  at the same moment can see each other (the one with the smaller peer id keeps its choice)

Ties never make a server move: :func:`choose_span` keeps the current start among equal windows,
and :func:`should_move` moves only for fewer gaps or a bottleneck better by ``balance_quality`` times.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

from swarm.records import ServerRecord, ServerState

ServersByBlock = Mapping[int, Mapping[str, ServerRecord]]

COUNTED_STATES = (ServerState.JOINING, ServerState.ONLINE)  # a loading server will serve soon: count it
RELATIVE_TOLERANCE = 1e-3  # totals this close count as equal (throughputs are noisy measurements)


def block_totals(servers: ServersByBlock, num_blocks: int, *, exclude: Collection[str] = (),
                 unknown_throughput: float = 1.0) -> list[float]:
    """Total throughput of each block ``0..num_blocks-1`` over JOINING and ONLINE servers.

    Servers in ``exclude`` (peer ids) are left out. A record whose throughput is not positive (a
    server that has not measured it yet) counts as ``unknown_throughput``. A record found under a
    block outside its own span (a stale entry) does not count for that block.
    """
    totals = [0.0] * num_blocks
    for block, records in servers.items():
        if not 0 <= block < num_blocks:
            continue
        for peer_id, record in records.items():
            if peer_id in exclude or record.state not in COUNTED_STATES or not record.start <= block < record.end:
                continue
            totals[block] += record.throughput if record.throughput > 0 else unknown_throughput
    return totals


def typical_throughput(servers: ServersByBlock, default: float = 1.0) -> float:
    """The median published throughput of JOINING/ONLINE servers (``default`` if none published one):
    what a server that has not measured yet is assumed to offer."""
    known: dict[str, float] = {}
    for records in servers.values():
        for peer_id, record in records.items():
            if record.state in COUNTED_STATES and record.throughput > 0:
                known[peer_id] = record.throughput
    if not known:
        return default
    values = sorted(known.values())
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def _clearly_less(a: float, b: float) -> bool:
    return b - a > RELATIVE_TOLERANCE * max(abs(a), abs(b), 1e-9)


def _weaker(window: Sequence[float], than: Sequence[float]) -> bool:
    """True if ``window`` (sorted totals) is clearly weaker: its weakest blocks first, compared in order."""
    for a, b in zip(window, than):
        if _clearly_less(a, b):
            return True
        if _clearly_less(b, a):
            return False
    return False


def choose_span(totals: Sequence[float], length: int, current: int | None = None) -> int:
    """The start of the ``length``-block window where the swarm is weakest.

    Windows are compared by their totals sorted ascending: the one with the weakest block wins,
    then the one whose second-weakest block is weakest, and so on, so a window that closes gaps
    (totals of 0) always beats one that does not. Among equal windows (within
    :data:`RELATIVE_TOLERANCE`) ``current`` wins if it is one of them, else the lowest start, so
    equal options never make a server move. Raises ValueError if ``length`` does not fit.
    """
    if not 0 < length <= len(totals):
        raise ValueError(f"a span of {length} blocks does not fit a model of {len(totals)} blocks")
    starts = range(len(totals) - length + 1)
    if current is not None and current not in starts:
        raise ValueError(f"current start {current} is not a valid start for {length} of {len(totals)} blocks")
    best = current if current is not None else 0
    best_window = sorted(totals[best:best + length])
    for start in starts:
        window = sorted(totals[start:start + length])
        if _weaker(window, best_window):
            best, best_window = start, window
    return best


@dataclasses.dataclass(frozen=True)
class SwarmScore:
    """How good a placement is: fewer gaps first, then a higher bottleneck."""

    gaps: int  # blocks no JOINING or ONLINE server holds
    bottleneck: float  # the smallest total throughput of a block, tokens/s

    def describe(self) -> str:
        if self.gaps:
            return f"{self.gaps} block(s) without a server"
        return f"bottleneck {self.bottleneck:.1f} tokens/s"


def swarm_score(totals: Sequence[float]) -> SwarmScore:
    return SwarmScore(gaps=sum(1 for t in totals if t <= 0), bottleneck=min(totals, default=0.0))


def improves(new: SwarmScore, old: SwarmScore, balance_quality: float) -> bool:
    """True if ``new`` is clearly better: fewer gaps, or no gaps either way and a bottleneck at least
    ``balance_quality`` times ``old``'s (and strictly higher)."""
    if new.gaps != old.gaps:
        return new.gaps < old.gaps
    if new.gaps:
        return False  # as many gaps either way: no move is worth its reload
    return new.bottleneck > old.bottleneck and new.bottleneck >= balance_quality * old.bottleneck


def _with_span(totals: Sequence[float], start: int, end: int, throughput: float) -> list[float]:
    out = list(totals)
    for block in range(start, end):
        out[block] += throughput
    return out


@dataclasses.dataclass(frozen=True)
class MoveDecision:
    """The answer of :func:`should_move`: where the server is, where it would go, and why."""

    move: bool
    start: int  # the span to hold: the new one if ``move``, else the current one
    end: int
    current: SwarmScore  # the swarm as it is
    proposed: SwarmScore  # the swarm if this server held the best other span (== current if none)
    reason: str


def should_move(servers: ServersByBlock, num_blocks: int, *, peer_id: str, start: int, end: int,
                throughput: float, balance_quality: float) -> MoveDecision:
    """Whether the server ``peer_id`` holding ``start:end`` should hold another span instead.

    This server's own records are removed first and its contribution (``throughput``, tokens/s
    per block) is added back at ``start:end``, so what it announced earlier (or a stale record)
    never counts twice. The candidate is :func:`choose_span` over the others, preferring the
    current start; the move happens only if it :func:`improves` the swarm by ``balance_quality``.
    """
    if not 0 <= start < end <= num_blocks:
        raise ValueError(f"span {start}:{end} is outside the model's {num_blocks} blocks")
    length = end - start
    others = block_totals(servers, num_blocks, exclude={peer_id}, unknown_throughput=throughput)
    current = swarm_score(_with_span(others, start, end, throughput))
    best = choose_span(others, length, current=start)
    if best == start:
        return MoveDecision(False, start, end, current, current,
                            f"blocks {start}:{end} are already where this server helps most ({current.describe()})")
    proposed = swarm_score(_with_span(others, best, best + length, throughput))
    move = improves(proposed, current, balance_quality)
    if move and proposed.gaps < current.gaps:
        why = f"the swarm would have {proposed.gaps} block(s) without a server instead of {current.gaps}"
    elif move:
        why = (f"the swarm's bottleneck would go from {current.bottleneck:.1f} to {proposed.bottleneck:.1f} "
               f"tokens/s ({proposed.bottleneck / current.bottleneck:.2f}x >= --balance-quality {balance_quality})")
    else:
        why = (f"blocks {best}:{best + length} would give {proposed.describe()} instead of {current.describe()}: "
               f"not better by --balance-quality {balance_quality}")
    target = (best, best + length) if move else (start, end)
    return MoveDecision(move, *target, current, proposed, why)


def settle_span(servers: ServersByBlock, num_blocks: int, *, peer_id: str, start: int, end: int,
                throughput: float) -> int:
    """The start a JOINING server ``peer_id`` should load at, given the records after its own announce.

    Servers started at the same moment each chose a span before seeing the others; nothing is loaded
    yet, so any better window is worth taking. To converge at once instead of everyone jumping to the
    same other window, a JOINING server with a larger peer id than this one is ignored (it yields to
    this one); ONLINE servers and JOINING ones with smaller ids count. Ties keep ``start``.
    """
    yielding = {p for records in servers.values() for p, r in records.items()
                if r.state == ServerState.JOINING and p > peer_id}
    others = block_totals(servers, num_blocks, exclude={peer_id} | yielding, unknown_throughput=throughput)
    return choose_span(others, end - start, current=start)
