"""Pure swarm state (swarm/swarm_state.py): observed server states, replica counts, model health."""

from __future__ import annotations

import itertools
import random

import pytest

from swarm.records import ServerRecord, ServerState
from swarm.routing import make_chain, missing_blocks
from swarm.swarm_state import (
    BlockState,
    PeerState,
    block_states,
    merge_servers,
    model_health,
    peer_state,
    replica_counts,
)

ONLINE, JOINING, OFFLINE = ServerState.ONLINE, ServerState.JOINING, ServerState.OFFLINE


def rec(start: int, end: int, state: ServerState = ONLINE, **fields) -> ServerRecord:
    return ServerRecord(state=state, start=start, end=end, **fields)


def by_block(servers: dict[str, ServerRecord], num_blocks: int) -> dict[int, dict[str, ServerRecord]]:
    """``{peer: record}`` -> ``{block: {peer: record}}``, the shape fetch_servers returns."""
    out: dict[int, dict[str, ServerRecord]] = {b: {} for b in range(num_blocks)}
    for peer_id, record in servers.items():
        for b in range(record.start, min(record.end, num_blocks)):
            out[b][peer_id] = record
    return out


# ---------------------------------------------------------------- peer_state


@pytest.mark.parametrize("state, reachable, expected", [
    (ONLINE, None, PeerState.ONLINE),
    (ONLINE, True, PeerState.ONLINE),
    (ONLINE, False, PeerState.UNREACHABLE),
    (JOINING, None, PeerState.JOINING),
    (JOINING, False, PeerState.JOINING),  # a loading server is not expected to answer
    (OFFLINE, None, PeerState.OFFLINE),
    (OFFLINE, False, PeerState.OFFLINE),
    (OFFLINE, True, PeerState.OFFLINE),  # it said it left: believe it
])
def test_peer_state(state, reachable, expected):
    assert peer_state(rec(0, 1, state), reachable) is expected


def test_peer_state_values_are_the_page_words():
    assert [s.value for s in PeerState] == ["online", "joining", "offline", "unreachable"]
    assert [s.value for s in BlockState] == ["served", "joining", "missing"]


# ---------------------------------------------------------------- replica counts and block states


def test_replica_counts_count_only_online_reachable_servers():
    servers = by_block({"a": rec(0, 2), "b": rec(1, 4), "c": rec(2, 4, JOINING), "d": rec(0, 4, OFFLINE),
                        "e": rec(3, 4)}, 4)
    assert replica_counts(servers, 4) == [1, 2, 1, 2]
    assert replica_counts(servers, 4, unreachable={"b"}) == [1, 1, 0, 1]
    assert block_states(servers, 4, unreachable={"b"}) == [BlockState.SERVED, BlockState.SERVED, BlockState.JOINING,
                                                           BlockState.SERVED]


def test_blocks_without_keys_are_missing():
    servers = by_block({"a": rec(0, 2)}, 2)  # the model has 4 blocks; keys 2 and 3 were never stored
    assert replica_counts(servers, 4) == [1, 1, 0, 0]
    assert block_states(servers, 4) == [BlockState.SERVED] * 2 + [BlockState.MISSING] * 2


def test_record_filed_under_a_block_it_does_not_cover_is_not_counted():
    servers = {0: {"a": rec(1, 2)}, 1: {}}
    assert replica_counts(servers, 2) == [0, 0]
    assert block_states(servers, 2) == [BlockState.MISSING, BlockState.MISSING]


# ---------------------------------------------------------------- model_health


def test_healthy_model():
    health = model_health(by_block({"a": rec(0, 2), "b": rec(2, 4), "c": rec(0, 4)}, 4), 4)
    assert health.healthy
    assert health.replicas == (2, 2, 2, 2) and health.min_replicas == 2 and health.missing == []
    assert health.servers_in(PeerState.ONLINE) == 3


def test_model_missing_a_block_is_broken():
    health = model_health(by_block({"a": rec(0, 2), "b": rec(3, 4), "j": rec(2, 3, JOINING)}, 4), 4)
    assert not health.healthy
    assert health.missing == [2] and health.min_replicas == 0
    assert health.blocks == (BlockState.SERVED, BlockState.SERVED, BlockState.JOINING, BlockState.SERVED)
    assert dict(health.states) == {"a": PeerState.ONLINE, "j": PeerState.JOINING, "b": PeerState.ONLINE}


def test_unreachable_server_breaks_the_model_and_is_marked():
    servers = by_block({"a": rec(0, 2), "b": rec(2, 4)}, 4)
    assert model_health(servers, 4, reachable={"a": True, "b": True}).healthy
    health = model_health(servers, 4, reachable={"a": True, "b": False})
    assert not health.healthy and health.missing == [2, 3]
    assert health.states["b"] is PeerState.UNREACHABLE and health.servers_in(PeerState.UNREACHABLE) == 1


def test_model_with_no_servers_at_all():
    health = model_health({}, 3)
    assert not health.healthy and health.replicas == (0, 0, 0) and health.missing == [0, 1, 2]
    assert dict(health.states) == {}


def test_model_health_rejects_a_model_without_blocks():
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        model_health({}, 0)


@pytest.mark.parametrize("seed", range(20))
def test_health_agrees_with_routing(seed):
    """``healthy`` <=> routing can build a chain; ``missing`` == routing's missing blocks (banned = unreachable)."""
    rng = random.Random(seed)
    num_blocks = rng.randint(1, 8)
    servers: dict[str, ServerRecord] = {}
    for i in range(rng.randint(0, 5)):
        start = rng.randrange(num_blocks)
        servers[f"peer{i}"] = rec(start, rng.randint(start + 1, num_blocks), rng.choice([ONLINE, ONLINE, JOINING,
                                                                                          OFFLINE]))
    reachable = {p: rng.random() > 0.3 for p in servers}
    blocks = by_block(servers, num_blocks)
    health = model_health(blocks, num_blocks, reachable)
    banned = {p for p, ok in reachable.items() if not ok}
    assert health.missing == missing_blocks(blocks, 0, num_blocks, banned=banned)
    if health.healthy:
        make_chain(blocks, 0, num_blocks, banned=banned)


# ---------------------------------------------------------------- merge_servers


def test_merge_servers_gives_one_record_per_server_in_span_order():
    servers = by_block({"z": rec(0, 2), "b": rec(2, 4), "a": rec(2, 4), "m": rec(1, 3)}, 4)
    assert list(merge_servers(servers)) == ["z", "m", "a", "b"]


def test_merge_servers_prefers_the_record_seen_under_most_blocks():
    old = rec(0, 4, OFFLINE)
    new = rec(0, 4, ONLINE, throughput=5.0)
    servers = {0: {"a": new}, 1: {"a": new}, 2: {"a": new}, 3: {"a": old}}
    assert merge_servers(servers)["a"] == new
    servers = {0: {"a": old}, 1: {"a": old}, 2: {"a": new}, 3: {"a": new}}  # a tie: the more advanced state
    assert merge_servers(servers)["a"].state == ONLINE


def test_merge_servers_handles_records_with_pings():
    pinged = rec(0, 2, next_pings={"b": 0.01})
    assert merge_servers({0: {"a": pinged}, 1: {"a": pinged}}) == {"a": pinged}


def test_merge_servers_is_independent_of_dict_order():
    records = {"a": rec(0, 2), "b": rec(1, 3, JOINING), "c": rec(0, 3, OFFLINE)}
    expected = merge_servers(by_block(records, 3))
    for order in itertools.permutations(records):
        assert merge_servers(by_block({p: records[p] for p in order}, 3)) == expected
