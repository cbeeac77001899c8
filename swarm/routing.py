"""Pure routing: which servers a request goes through. No I/O; the clock is passed in.

- :func:`allowed_servers` — the servers a client's requests may use (a preloaded adapter, allowed quants)
- :func:`missing_blocks` — blocks no usable server holds
- :func:`make_chain` — a chain of spans covering ``start:end`` with as few hops as possible
- :func:`make_latency_chain` — the chain with the least expected step latency (inference), from client
  pings, the pings servers publish to their likely next servers, and per-block speeds
- :func:`make_forward_chain` — a chain drawn at random, weighted by throughput (forward passes)
- :class:`Bans` — peers not to use: failed ones for a while, dead ones until their record changes, wrong ones for good
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Collection, Mapping, Set

from swarm.config import QUANT_SCHEMES
from swarm.errors import MissingBlocksError
from swarm.records import ServerRecord, ServerState, encode_record

ServersByBlock = Mapping[int, Mapping[str, ServerRecord]]


@dataclasses.dataclass(frozen=True)
class ChainLink:
    """Blocks ``start:end`` served by ``peer_id`` (a sub-span of what the server holds)."""

    peer_id: str
    start: int
    end: int


def _usable(record: ServerRecord, peer_id: str, block: int, banned: Set[str], min_cache_tokens: int) -> bool:
    return (record.state == ServerState.ONLINE and record.start <= block < record.end and peer_id not in banned
            and record.cache_tokens_left >= min_cache_tokens)


def allowed_servers(servers: ServersByBlock, *, adapter: str = "",
                    allowed_quant: Collection[str] | None = None) -> dict[int, dict[str, ServerRecord]]:
    """The servers that preloaded ``adapter`` (if one is named) and store their blocks in one of
    ``allowed_quant`` (``ServerRecord.quant``; None: any)."""
    return {block: {peer_id: record for peer_id, record in by_peer.items()
                    if (not adapter or adapter in record.adapters)
                    and (allowed_quant is None or record.quant in allowed_quant)}
            for block, by_peer in servers.items()}


def quant_excluded(servers: ServersByBlock, blocks: list[int], allowed_quant: Collection[str] | None) -> str:
    """Why ``blocks`` may be missing because of ``allowed_quant``: "" if it excluded no online server of them."""
    if allowed_quant is None:
        return ""
    excluded = {(peer_id, record.quant) for b in blocks for peer_id, record in servers.get(b, {}).items()
                if record.state == ServerState.ONLINE and record.start <= b < record.end
                and record.quant not in allowed_quant}
    if not excluded:
        return ""
    quants = sorted({quant for _, quant in excluded})
    startable = sorted(q for q in allowed_quant if q in QUANT_SCHEMES)
    start = f", or start a server with --quant {startable[0]}" if startable else ""
    return (f"; the client's quant filter (allowed_quant={tuple(allowed_quant)!r}) excluded {len(excluded)} online "
            f"server(s) of these blocks that serve quant {', '.join(quants)}: allow it{start}")


def missing_blocks(servers: ServersByBlock, start: int, end: int, banned: Set[str] = frozenset(),
                   min_cache_tokens: int = 0) -> list[int]:
    return [b for b in range(start, end)
            if not any(_usable(r, p, b, banned, min_cache_tokens) for p, r in servers.get(b, {}).items())]


def format_blocks(blocks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0:3, 5:6"`` (spans, end exclusive)."""
    spans: list[str] = []
    for b in blocks:
        if spans and int(spans[-1].split(":")[1]) == b:
            spans[-1] = f"{spans[-1].split(':')[0]}:{b + 1}"
        else:
            spans.append(f"{b}:{b + 1}")
    return ", ".join(spans)


def make_chain(servers: ServersByBlock, start: int, end: int, *, banned: Set[str] = frozenset(),
               min_cache_tokens: int = 0, model: str = "the model") -> list[ChainLink]:
    """Greedy fewest-hops chain: from each block, the usable server that reaches farthest.

    Ties go to the higher throughput, then the smaller peer id, so equal inputs give equal chains.
    Raises :class:`MissingBlocksError` naming every block without a usable server.
    """
    _check_coverage(servers, start, end, banned, min_cache_tokens, model)
    chain: list[ChainLink] = []
    position = start
    while position < end:
        best: tuple[int, float] | None = None
        best_peer = ""
        for peer_id, record in servers[position].items():
            if not _usable(record, peer_id, position, banned, min_cache_tokens):
                continue
            key = (min(record.end, end), record.throughput)
            if best is None or key > best or (key == best and peer_id < best_peer):
                best, best_peer = key, peer_id
        assert best is not None  # guaranteed by the missing_blocks check
        reach = best[0]
        chain.append(ChainLink(peer_id=best_peer, start=position, end=reach))
        position = reach
    return chain


def _check_coverage(servers: ServersByBlock, start: int, end: int, banned: Set[str], min_cache_tokens: int,
                    model: str) -> None:
    missing = missing_blocks(servers, start, end, banned, min_cache_tokens)
    if not missing:
        return
    known = {p for b in range(start, end) for p in servers.get(b, {})}
    seen = f"{len(known)} server(s) seen, {len(banned & known)} temporarily banned after failures"
    fix = f"start one with `swarm serve --model ... --blocks {missing[0]}:{missing[-1] + 1}`"
    # blocks that an online, unbanned server holds: only their cache is short
    short = [b for b in missing if any(_usable(r, p, b, banned, 0) for p, r in servers.get(b, {}).items())]
    if short and len(short) == len(missing):
        most = max(r.cache_tokens_left for b in short for p, r in servers[b].items() if _usable(r, p, b, banned, 0))
        raise MissingBlocksError(
            f"blocks {format_blocks(missing)} of {model} have no online server with {min_cache_tokens} free cache "
            f"tokens: their servers have at most {most} free ({seen}); open a shorter session (max_length x batch), "
            f"wait for other sessions to end, or {fix}")
    dead = [b for b in missing if any(r.state == ServerState.ONLINE and r.start <= b < r.end and p in banned
                                      for p, r in servers.get(b, {}).items())]
    why = ("; the servers announced for them did not answer or failed (a dead server's record stays in the DHT "
           "until it expires)" if dead else "")
    raise MissingBlocksError(f"blocks {format_blocks(missing)} of {model} have no online server ({seen}){why}; {fix}")


DEFAULT_PING = 0.05  # seconds, for a server not pinged yet
DEFAULT_BLOCK_STEP = 0.01  # seconds per block per step, for a server that published no speed
_Option = tuple[float, int, tuple[ChainLink, ...]]  # a chain so far: (expected seconds, hops, links)


def make_latency_chain(servers: ServersByBlock, start: int, end: int, *, pings: Mapping[str, float],
                       banned: Set[str] = frozenset(), min_cache_tokens: int = 0, push: bool = True,
                       after: str | None = None, then: str | None = None,
                       model: str = "the model") -> list[ChainLink]:
    """The chain with the least expected time per inference step.

    A step goes client -> s1 -> s2 -> ... -> client; each leg costs half a round trip:

    - client -> s1 and sk -> client: the client's ping to that server (``pings``, :data:`DEFAULT_PING`
      if unknown);
    - s(i-1) -> si: with ``push``, the round trip s(i-1) measured and published (``next_pings[si]``);
      without ``push``, or when it published none for si, the step goes through the client: half of
      each one's client ping. So without any published pings a chain costs the sum of its servers'
      client pings;
    - through each server: its blocks ``b..min(s.end, end)`` at its published ``inference_rps``
      (steps/s per block; :data:`DEFAULT_BLOCK_STEP` per block if unknown).

    A chain that replaces part of another (failover) is priced where it sits: ``after`` is the server
    before ``start`` (its published ping prices the first hop instead of the client's ping; its record
    is looked up in ``servers[start - 1]``) and ``then`` the server after ``end`` (the last server pushes
    to it instead of answering the client).

    Equal costs prefer fewer hops, then smaller peer ids. A hop's cost depends on the server before
    it, so the search runs over (boundary, server that ends there); boundaries only grow, so one pass
    in block order finds the best chain.
    """
    _check_coverage(servers, start, end, banned, min_cache_tokens, model)

    def client_ping(peer_id: str) -> float:
        return pings.get(peer_id, DEFAULT_PING)

    def hop(previous: tuple[str, ServerRecord | None] | None, peer_id: str) -> float:
        if previous is None:
            return client_ping(peer_id) / 2
        published = _published_ping(previous[1], peer_id) if push and previous[1] is not None else None
        if published is not None:
            return published / 2
        return (client_ping(previous[0]) + client_ping(peer_id)) / 2

    first = (after, servers.get(start - 1, {}).get(after)) if after else None
    # arrivals[b][peer] = (cost, hops, path): the best chain covering start:b whose last server is peer
    # ("": the empty chain at start)
    arrivals: dict[int, dict[str, _Option]] = {start: {"": (0.0, 0, ())}}
    for position in range(start, end):
        for previous_id, (cost, hops, path) in sorted(arrivals.get(position, {}).items(),
                                                      key=lambda item: _order(item[1])):
            previous = (previous_id, servers[position - 1][previous_id]) if previous_id else first
            for peer_id in sorted(servers.get(position, {})):
                record = servers[position][peer_id]
                if not _usable(record, peer_id, position, banned, min_cache_tokens):
                    continue
                reach = min(record.end, end)
                per_block = 1.0 / record.inference_rps if record.inference_rps > 0 else DEFAULT_BLOCK_STEP
                new_cost = cost + hop(previous, peer_id) + (reach - position) * per_block
                if reach == end:  # the last server answers the client, or hands over to the server after the chain
                    new_cost += hop((peer_id, record), then) if then else client_ping(peer_id) / 2
                new = (new_cost, hops + 1, (*path, ChainLink(peer_id, position, reach)))
                known = arrivals.setdefault(reach, {}).get(peer_id)
                if known is None or _order(new) < _order(known):
                    arrivals[reach][peer_id] = new
    return list(min(arrivals[end].values(), key=_order)[2])


def _order(option: _Option) -> tuple[float, int, list[str]]:
    cost, hops, path = option
    return cost, hops, [link.peer_id for link in path]


def _published_ping(record: ServerRecord, next_peer: str) -> float | None:
    """The round trip a server published to ``next_peer``, if any (a negative or infinite one counts as none)."""
    value = record.next_pings.get(next_peer)
    return value if value is not None and 0.0 <= value < float("inf") else None


def make_forward_chain(servers: ServersByBlock, start: int, end: int, *, rng: random.Random,
                       banned: Set[str] = frozenset(), model: str = "the model",
                       by_throughput: bool = True) -> list[ChainLink]:
    """A chain for a forward pass: at each block, a usable server drawn with probability ∝ its throughput,
    so that concurrent forward passes spread over the swarm's capacity (``by_throughput=False``: uniformly,
    so that a server claiming a huge throughput is not picked more often, e.g. to check others' work)."""
    _check_coverage(servers, start, end, banned, 0, model)
    chain: list[ChainLink] = []
    position = start
    while position < end:
        options = sorted((peer_id, record) for peer_id, record in servers[position].items()
                         if _usable(record, peer_id, position, banned, 0))
        weights = [max(record.throughput, 1e-3) if by_throughput else 1.0 for _, record in options]
        peer_id, record = rng.choices(options, weights=weights)[0]
        reach = min(record.end, end)
        chain.append(ChainLink(peer_id, position, reach))
        position = reach
    return chain


@dataclasses.dataclass
class Bans:
    """Peers not to use, for three reasons:

    - a failure: until ``now + max(cost, min_backoff * 2**(failures-1))``, the exponential part capped at
      ``max_backoff``: never shorter than what the failure cost the caller (a server that took a whole
      timeout to fail is not retried before as long again), and longer with every failure until a success;
    - dead (:meth:`dead`: it could not be dialed): until the DHT shows a newer record of it (a restarted server
      announces anew, and every live server re-announces each ``--update-period``). A dead server's last
      record outlives it by up to 2.5 update periods; a time ban alone would let it be picked again. Newer,
      not just different: lookups may return older copies of a block's entry for a while; or until it answers
      again (:meth:`revive`: a restarted server whose announcement is late or was not stored);
    - wrong (:meth:`distrust`: its outputs disagreed with another server's recomputation): for good.
    """

    min_backoff: float = 1.0
    max_backoff: float = 60.0
    _until: dict[str, float] = dataclasses.field(default_factory=dict)
    _failures: dict[str, int] = dataclasses.field(default_factory=dict)
    # peer -> (when it last announced, its records) when found dead
    _dead: dict[str, tuple[float, frozenset[bytes]]] = dataclasses.field(default_factory=dict)
    _distrusted: set[str] = dataclasses.field(default_factory=set)
    _served: set[str] = dataclasses.field(default_factory=set)  # peers that answered a request of this client

    def ban(self, peer_id: str, now: float, cost: float = 0.0) -> float:
        """Bans ``peer_id`` after a failure that cost ``cost`` seconds; returns the ban's length."""
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        backoff = min(self.max_backoff, self.min_backoff * 2 ** min(failures - 1, 64))  # no float overflow
        delay = max(backoff, cost) if cost == cost else backoff
        self._until[peer_id] = max(self._until.get(peer_id, now), now + delay)
        return delay

    def dead(self, peer_id: str, servers: ServersByBlock) -> None:
        """``peer_id`` could not be dialed: not used until a lookup shows a record of it announced after those in
        ``servers`` (a lookup of every block)."""
        self._dead[peer_id] = (_announced(servers, peer_id), _records_of(servers, peer_id))

    def distrust(self, peer_id: str) -> None:
        """``peer_id`` computed wrong: never used again."""
        self._distrusted.add(peer_id)

    def succeeded(self, peer_id: str) -> None:
        """``peer_id`` answered a request: its failures are forgotten."""
        self._served.add(peer_id)
        self._forgive(peer_id)

    def is_dead(self, peer_id: str) -> bool:
        return peer_id in self._dead

    def revive(self, peer_id: str) -> None:
        """``peer_id`` was found dead but answers again (a new process, whose announcement has not shown in
        lookups yet): usable at once, its failures forgotten."""
        self._dead.pop(peer_id, None)
        self._forgive(peer_id)

    def served(self) -> frozenset[str]:
        """Peers that answered a request before: one that is dead now was working, so it is most likely restarting."""
        return frozenset(self._served)

    def _forgive(self, peer_id: str) -> None:
        self._failures.pop(peer_id, None)
        self._until.pop(peer_id, None)

    def banned(self, now: float, servers: ServersByBlock | None = None) -> frozenset[str]:
        """Peers not to use now. With ``servers`` (a fresh lookup of every block), a dead peer that announced
        itself since is forgiven, its time ban and failure count too (it is a new process, e.g. restarted with the
        same identity; dead again only if it fails to be dialed again). Records without announcement times
        (older servers) count as new when they differ."""
        if servers is not None:  # a new process: its predecessor's failures do not count against it
            for peer_id in [p for p, then in self._dead.items() if _announced_since(servers, p, *then)]:
                del self._dead[peer_id]
                self._forgive(peer_id)
        timed = (p for p, until in self._until.items() if until > now)
        return frozenset((*timed, *self._dead, *self._distrusted))

    def distrusted(self) -> frozenset[str]:
        return frozenset(self._distrusted)


def _announced(servers: ServersByBlock, peer_id: str) -> float:
    """When ``peer_id`` last announced itself, by its records in a lookup (-inf: it has none)."""
    return max((by_peer[peer_id].announced_at for by_peer in servers.values() if peer_id in by_peer),
               default=-float("inf"))


def _announced_since(servers: ServersByBlock, peer_id: str, announced: float, records: frozenset[bytes]) -> bool:
    latest = _announced(servers, peer_id)
    if latest > 0 or announced > 0:
        return latest > announced
    return latest > -float("inf") and _records_of(servers, peer_id) != records  # unstamped records


def _records_of(servers: ServersByBlock, peer_id: str) -> frozenset[bytes]:
    """Every record ``peer_id`` has in a lookup, encoded: what must change for a dead peer to be tried again."""
    return frozenset(encode_record(by_peer[peer_id]) for by_peer in servers.values() if peer_id in by_peer)
