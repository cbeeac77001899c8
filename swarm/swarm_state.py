"""Pure swarm state: what state each server is in, how many replicas each block has, and whether a
model is healthy. No I/O and no clock; servers, clients and the health service share these.

- :class:`PeerState` / :func:`peer_state` — a server's state as an observer sees it: its announced
  state, corrected by whether the observer could reach it (``online`` but unanswering -> ``unreachable``)
- :func:`merge_servers` — ``{block: {peer: record}}`` -> one record per server
- :func:`replica_counts` — online, reachable servers per block (the same rule routing uses)
- :class:`BlockState` / :func:`block_states` — served, joining (only loading servers) or missing
- :class:`ModelHealth` / :func:`model_health` — all of the above for one model; ``healthy`` means
  every block has at least one online server, i.e. :func:`swarm.routing.make_chain` can cover it
- :func:`claims_to_check` / :func:`pick_model` — which of the model index's claims about one prefix
  to believe: each server signs its own claim, and a claim counts only when a server that made it
  confirms it over ``info`` (a peer that only writes to the DHT cannot make a model appear);
  :func:`likeliest_model` is the unconfirmed guess (the claim most peers made) for readers that ask
  no server
"""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter
from collections.abc import Mapping, Set

from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.routing import ServersByBlock

MAX_MODEL_BLOCKS = 1024  # a claim of more blocks is ignored (the largest models have a few hundred)


class PeerState(str, enum.Enum):
    """A server as an observer sees it (the words used in the health page, JSON and metrics)."""

    ONLINE = "online"  # announced ONLINE and answered (or was not asked)
    JOINING = "joining"  # announced JOINING: loading its blocks
    OFFLINE = "offline"  # announced OFFLINE: shut down cleanly, its record not yet expired
    UNREACHABLE = "unreachable"  # announced ONLINE but did not answer the observer


class BlockState(str, enum.Enum):
    SERVED = "served"  # at least one online server holds it
    JOINING = "joining"  # no online server, but one is loading it
    MISSING = "missing"  # nobody serves it: the model is broken


def peer_state(record: ServerRecord, reachable: bool | None = None) -> PeerState:
    """The observed state of a server. ``reachable`` is the observer's probe result, None if not probed.

    Only an ONLINE record can be unreachable: JOINING and OFFLINE servers are not expected to answer.
    """
    if record.state == ServerState.ONLINE:
        return PeerState.UNREACHABLE if reachable is False else PeerState.ONLINE
    if record.state == ServerState.JOINING:
        return PeerState.JOINING
    return PeerState.OFFLINE


def merge_servers(servers: ServersByBlock) -> dict[str, ServerRecord]:
    """One record per server from the per-block view, sorted by (start, end, peer id).

    A server normally stores the same record under every block of its span. If its records differ
    (a re-announcement only partly stored, or a restart with a new span before the old records
    expired), the record seen under the most blocks wins, ties going to the more advanced state.
    """
    # records hold a dict (next_pings), so they are not hashable: count them by what tells them apart
    counts: dict[str, Counter[tuple[ServerState, int, int]]] = {}
    latest: dict[tuple[str, ServerState, int, int], ServerRecord] = {}
    for block in sorted(servers):
        for peer_id, record in servers[block].items():
            key = (record.state, record.start, record.end)
            counts.setdefault(peer_id, Counter())[key] += 1
            latest[(peer_id, *key)] = record
    merged: dict[str, ServerRecord] = {}
    for peer_id, by_key in counts.items():
        state, start, end = max(by_key, key=lambda k: (by_key[k], k[0], k[2] - k[1]))
        merged[peer_id] = latest[(peer_id, state, start, end)]
    return dict(sorted(merged.items(), key=lambda item: (item[1].start, item[1].end, item[0])))


def _serves(record: ServerRecord, peer_id: str, block: int, unreachable: Set[str]) -> bool:
    # the rule of swarm.routing.missing_blocks with the unreachable peers banned
    return record.state == ServerState.ONLINE and record.start <= block < record.end and peer_id not in unreachable


def replica_counts(servers: ServersByBlock, num_blocks: int, unreachable: Set[str] = frozenset()) -> list[int]:
    """For each block ``0..num_blocks-1``: how many online servers that are not ``unreachable`` hold it."""
    return [sum(_serves(r, p, b, unreachable) for p, r in servers.get(b, {}).items()) for b in range(num_blocks)]


def block_states(servers: ServersByBlock, num_blocks: int, unreachable: Set[str] = frozenset()) -> list[BlockState]:
    """For each block: SERVED if an online server holds it, else JOINING if a server is loading it, else MISSING."""
    states: list[BlockState] = []
    for block, count in enumerate(replica_counts(servers, num_blocks, unreachable)):
        if count:
            states.append(BlockState.SERVED)
        elif any(r.state == ServerState.JOINING and r.start <= block < r.end for r in servers.get(block, {}).values()):
            states.append(BlockState.JOINING)
        else:
            states.append(BlockState.MISSING)
    return states


@dataclasses.dataclass(frozen=True)
class ModelHealth:
    """The health of one model: per-block replica counts and states, and the servers by observed state."""

    num_blocks: int
    replicas: tuple[int, ...]  # online servers per block
    blocks: tuple[BlockState, ...]
    states: Mapping[str, PeerState]  # peer id -> observed state, for every server seen

    @property
    def healthy(self) -> bool:
        """True iff every block has an online server: a client can build a chain through the model."""
        return all(self.replicas)

    @property
    def min_replicas(self) -> int:
        return min(self.replicas, default=0)

    @property
    def missing(self) -> list[int]:
        """Blocks without an online server (equal to :func:`swarm.routing.missing_blocks` over the model)."""
        return [b for b, count in enumerate(self.replicas) if count == 0]

    def servers_in(self, state: PeerState) -> int:
        return sum(1 for s in self.states.values() if s == state)


def model_health(servers: ServersByBlock, num_blocks: int,
                 reachable: Mapping[str, bool] | None = None) -> ModelHealth:
    """Everything the health page says about one model, from its block records and probe results.

    ``reachable`` maps peer id -> whether the observer could reach it; peers not in it count as
    reachable (a server that was not probed is taken at its word).
    """
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")
    reachable = reachable or {}
    unreachable = frozenset(p for p, ok in reachable.items() if not ok)
    states = {p: peer_state(r, reachable.get(p)) for p, r in merge_servers(servers).items()}
    return ModelHealth(num_blocks=num_blocks, replicas=tuple(replica_counts(servers, num_blocks, unreachable)),
                       blocks=tuple(block_states(servers, num_blocks, unreachable)), states=states)


def _claim(record: ModelRecord) -> tuple[str, int, str]:
    return record.name, record.num_blocks, record.family


def claims_to_check(claims: Mapping[str, ModelRecord], served: Mapping[str, tuple[str, int] | None] | None = None,
                    per_claim: int = 3, max_claims: int = 4, max_per_claim: int = 12) -> list[str]:
    """The next peers whose ``info`` decides between the claims about one prefix (``{peer id: claim}``).

    ``served``: what the peers probed so far answered (``(model, num_blocks)``, None for no answer). For
    each of the ``max_claims`` claims most peers made that no probed peer confirms yet: up to ``per_claim``
    claimants not probed yet, at most ``max_per_claim`` probed per claim in all. Call again with the answers
    until it returns nothing: claimants that left (their entries outlive them) cannot hide a claim that a
    live server makes, and many peers making up claims cannot make a crawl probe them all.
    """
    served = served or {}
    by_claim: dict[tuple[str, int, str], list[str]] = {}
    for peer_id, record in sorted(claims.items()):
        if record.num_blocks <= MAX_MODEL_BLOCKS:
            by_claim.setdefault(_claim(record), []).append(peer_id)
    ranked = sorted(by_claim.items(), key=lambda item: (-len(item[1]), item[0][1], item[0]))[:max_claims]
    out = []
    for (name, num_blocks, _), peers in ranked:
        probed = [p for p in peers if p in served]
        if any(served[p] == (name, num_blocks) for p in probed):
            continue  # confirmed
        left = max(0, min(per_claim, max_per_claim - len(probed)))
        out += [p for p in peers if p not in served][:left]
    return out


def pick_model(claims: Mapping[str, ModelRecord], served: Mapping[str, tuple[str, int]]) -> ModelRecord | None:
    """The claim to believe about one prefix, or None if no claim is confirmed.

    ``claims``: ``{peer id: the ModelRecord it signed}``; ``served``: ``{peer id: (model name, num_blocks)}``
    as peers answered ``info``. A claim is confirmed by each peer that made it and serves that model with
    that many blocks. The claim with the most confirmations wins; ties go to the one more peers made, then
    to fewer blocks. Claims over :data:`MAX_MODEL_BLOCKS` blocks are ignored.
    """
    confirmations: Counter[tuple[str, int, str]] = Counter()
    made: Counter[tuple[str, int, str]] = Counter()
    records: dict[tuple[str, int, str], ModelRecord] = {}
    for peer_id, record in claims.items():
        if record.num_blocks > MAX_MODEL_BLOCKS:
            continue
        claim = _claim(record)
        records.setdefault(claim, record)
        made[claim] += 1
        if served.get(peer_id) == (record.name, record.num_blocks):
            confirmations[claim] += 1
    if not confirmations:
        return None
    best = max(confirmations, key=lambda c: (confirmations[c], made[c], -c[1], c))
    return records[best]


def likeliest_model(claims: Mapping[str, ModelRecord]) -> ModelRecord | None:
    """The claim about one prefix that the most peers made (ties: fewer blocks), claims over
    :data:`MAX_MODEL_BLOCKS` ignored; None if none is left. Unconfirmed: identities cost nothing, so a
    reader that can ask servers uses :func:`pick_model`."""
    made: Counter[tuple[str, int, str]] = Counter()
    records: dict[tuple[str, int, str], ModelRecord] = {}
    for record in claims.values():
        if record.num_blocks <= MAX_MODEL_BLOCKS:
            made[_claim(record)] += 1
            records.setdefault(_claim(record), record)
    if not made:
        return None
    return records[max(made, key=lambda c: (made[c], -c[1], c))]
