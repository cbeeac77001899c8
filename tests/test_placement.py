"""Pure block placement over synthetic swarms (swarm/placement.py)."""

from __future__ import annotations

import pytest

from swarm.placement import (
    SwarmScore,
    block_totals,
    choose_span,
    improves,
    settle_span,
    should_move,
    swarm_score,
    typical_throughput,
)
from swarm.records import ServerRecord, ServerState

JOINING, ONLINE, OFFLINE = ServerState.JOINING, ServerState.ONLINE, ServerState.OFFLINE


def rec(start: int, end: int, throughput: float = 10.0, state: ServerState = ONLINE) -> ServerRecord:
    return ServerRecord(state=state, start=start, end=end, throughput=throughput)


def swarm_of(servers: dict[str, ServerRecord], num_blocks: int = 8) -> dict[int, dict[str, ServerRecord]]:
    """``{peer_id: record}`` -> ``{block: {peer_id: record}}``, the shape fetch_servers returns."""
    out: dict[int, dict[str, ServerRecord]] = {b: {} for b in range(num_blocks)}
    for peer_id, record in servers.items():
        for b in range(record.start, record.end):
            out[b][peer_id] = record
    return out


def join_one_by_one(count: int, length: int, num_blocks: int, throughput: float = 10.0,
                    existing: dict[str, ServerRecord] | None = None) -> dict[str, ServerRecord]:
    """Servers starting at once: each sees the JOINING records of those that chose before it."""
    servers = dict(existing or {})
    for i in range(count):
        totals = block_totals(swarm_of(servers, num_blocks), num_blocks, unknown_throughput=throughput)
        start = choose_span(totals, length)
        servers[f"new{i}"] = rec(start, start + length, throughput, JOINING)
    return servers


# ---------------------------------------------------------------- block_totals


def test_totals_count_joining_and_online_but_not_offline():
    servers = swarm_of({"a": rec(0, 4, 10), "b": rec(2, 6, 5, JOINING), "c": rec(0, 8, 100, OFFLINE)})
    assert block_totals(servers, 8) == [10, 10, 15, 15, 5, 5, 0, 0]


def test_totals_exclude_peers_and_fill_in_unknown_throughput():
    servers = swarm_of({"a": rec(0, 4, 10), "b": rec(2, 6, 0.0, JOINING), "me": rec(4, 8, 7)})
    assert block_totals(servers, 8, exclude={"me"}, unknown_throughput=3) == [10, 10, 13, 13, 3, 3, 0, 0]


def test_totals_ignore_stale_entries_and_blocks_outside_the_model():
    servers = swarm_of({"a": rec(0, 4, 10)})
    servers[6] = {"moved": rec(0, 2, 50)}  # an old record under a block its span no longer holds
    servers[12] = {"x": rec(12, 13, 1)}
    assert block_totals(servers, 8) == [10, 10, 10, 10, 0, 0, 0, 0]


def test_typical_throughput_is_the_median_of_published_ones():
    assert typical_throughput({}) == 1.0
    assert typical_throughput(swarm_of({"a": rec(0, 2, 0.0, JOINING)})) == 1.0
    assert typical_throughput(swarm_of({"a": rec(0, 4, 10), "b": rec(0, 4, 30), "c": rec(4, 8, 20)})) == 20
    assert typical_throughput(swarm_of({"a": rec(0, 4, 10), "b": rec(4, 8, 30), "z": rec(0, 8, 99, OFFLINE)})) == 20


# ---------------------------------------------------------------- choose_span


def test_empty_swarm_starts_at_block_zero():
    assert choose_span([0.0] * 8, 4) == 0
    assert choose_span([0.0] * 8, 8) == 0


def test_one_gap_is_filled():
    assert choose_span([10, 10, 10, 10, 10, 0, 0, 10], 2) == 5
    assert choose_span([10, 10, 10, 10, 10, 0, 0, 10], 4) == 3  # the lowest start among windows covering the gap


def test_duplicate_coverage_goes_to_the_weaker_half():
    totals = block_totals(swarm_of({"a": rec(0, 8, 10), "b": rec(0, 4, 10)}), 8)
    assert choose_span(totals, 4) == 4


def test_the_weakest_block_beats_the_weakest_sum():
    # the window 4:8 has the smallest sum, but block 0 has nothing at all
    assert choose_span([0, 10, 10, 10, 1, 1, 1, 1], 4) == 0


def test_equal_windows_keep_the_current_start_then_the_lowest():
    totals = [10.0] * 8
    assert choose_span(totals, 4) == 0
    assert choose_span(totals, 4, current=3) == 3
    # within the tolerance of noisy measurements counts as equal too
    assert choose_span([10.0, 10.0, 10.0, 10.0, 10.0001, 10.0001, 10.0001, 10.0001], 4, current=4) == 4


def test_choose_span_checks_its_arguments():
    with pytest.raises(ValueError, match="does not fit"):
        choose_span([0.0] * 4, 5)
    with pytest.raises(ValueError, match="not a valid start"):
        choose_span([0.0] * 8, 4, current=5)


def test_many_servers_starting_at_once_spread_over_the_model():
    servers = join_one_by_one(count=4, length=4, num_blocks=8)
    assert sorted((r.start, r.end) for r in servers.values()) == [(0, 4), (0, 4), (4, 8), (4, 8)]
    servers = join_one_by_one(count=3, length=3, num_blocks=8)
    assert sorted((r.start, r.end) for r in servers.values()) == [(0, 3), (3, 6), (5, 8)]
    assert min(block_totals(swarm_of(servers), 8)) > 0


def test_many_servers_joining_a_lopsided_swarm_fill_it_evenly():
    existing = {"big": rec(0, 8, 10), "left": rec(0, 4, 10)}
    servers = join_one_by_one(count=3, length=4, num_blocks=8, existing=existing)
    assert [(r.start, r.end) for r in servers.values()][2:] == [(4, 8), (0, 4), (4, 8)]
    assert block_totals(swarm_of(servers), 8) == [30.0] * 8


# ---------------------------------------------------------------- scores


def test_swarm_score_and_improves():
    assert swarm_score([0, 5, 0, 7]) == SwarmScore(gaps=2, bottleneck=0)
    assert swarm_score([3, 5, 4]) == SwarmScore(gaps=0, bottleneck=3)
    assert improves(SwarmScore(1, 0), SwarmScore(2, 0), 1.3)  # fewer gaps always wins
    assert not improves(SwarmScore(2, 0), SwarmScore(1, 0), 1.3)
    assert not improves(SwarmScore(1, 0), SwarmScore(1, 0), 1.3)
    assert improves(SwarmScore(0, 13), SwarmScore(0, 10), 1.3)
    assert not improves(SwarmScore(0, 12.9), SwarmScore(0, 10), 1.3)
    assert not improves(SwarmScore(0, 10), SwarmScore(0, 10), 1.0)  # equal is never a reason to move


# ---------------------------------------------------------------- should_move


def test_a_lone_server_never_moves_away_from_its_blocks():
    servers = swarm_of({"me": rec(0, 4)})
    decision = should_move(servers, 8, peer_id="me", start=0, end=4, throughput=10, balance_quality=1.3)
    assert not decision.move and (decision.start, decision.end) == (0, 4)


def test_moves_to_blocks_a_stopped_server_left_uncovered():
    servers = swarm_of({"a": rec(0, 4), "me": rec(0, 4), "b": rec(4, 8, state=OFFLINE)})
    decision = should_move(servers, 8, peer_id="me", start=0, end=4, throughput=10, balance_quality=1.3)
    assert decision.move and (decision.start, decision.end) == (4, 8)
    assert decision.current.gaps == 4 and decision.proposed.gaps == 0
    assert "without a server" in decision.reason


def test_never_moves_if_that_opens_a_gap():
    servers = swarm_of({"me": rec(0, 4), "a": rec(4, 8), "b": rec(4, 8), "c": rec(4, 8)})
    decision = should_move(servers, 8, peer_id="me", start=0, end=4, throughput=10, balance_quality=1.3)
    assert not decision.move


def test_moves_only_for_a_clear_improvement():
    # blocks 0:4 have 10 tokens/s, 4:8 have 40 with me: moving to 0:4 doubles the bottleneck
    servers = swarm_of({"a": rec(0, 4), "b": rec(4, 8, 30), "me": rec(4, 8)})
    decision = should_move(servers, 8, peer_id="me", start=4, end=8, throughput=10, balance_quality=1.3)
    assert decision.move and (decision.start, decision.end) == (0, 4)
    assert decision.current.bottleneck == 10 and decision.proposed.bottleneck == 20
    assert "2.00x" in decision.reason
    decision = should_move(servers, 8, peer_id="me", start=4, end=8, throughput=10, balance_quality=2.5)
    assert not decision.move and "--balance-quality 2.5" in decision.reason


def test_no_flapping_on_equal_options():
    # two servers side by side, equal speeds: neither moves, whatever the order they check in
    servers = swarm_of({"a": rec(0, 4), "b": rec(4, 8)})
    for peer_id, record in (("a", rec(0, 4)), ("b", rec(4, 8))):
        decision = should_move(servers, 8, peer_id=peer_id, start=record.start, end=record.end, throughput=10,
                               balance_quality=1.0)
        assert not decision.move, decision.reason
    # three equal servers over 6 blocks (2 each): any shuffle is equal, so nobody moves
    servers = swarm_of({"a": rec(0, 2), "b": rec(2, 4), "c": rec(4, 6)}, 6)
    for peer_id in "abc":
        r = servers[{"a": 0, "b": 2, "c": 4}[peer_id]][peer_id]
        assert not should_move(servers, 6, peer_id=peer_id, start=r.start, end=r.end, throughput=10,
                               balance_quality=1.0).move


def test_after_a_move_the_swarm_is_stable():
    servers = {"a": rec(0, 4), "b": rec(4, 8, 30), "me": rec(4, 8)}
    decision = should_move(swarm_of(servers), 8, peer_id="me", start=4, end=8, throughput=10, balance_quality=1.3)
    assert decision.move
    servers["me"] = rec(decision.start, decision.end, state=JOINING)
    for peer_id, record in servers.items():
        again = should_move(swarm_of(servers), 8, peer_id=peer_id, start=record.start, end=record.end,
                            throughput=record.throughput, balance_quality=1.3)
        assert not again.move, (peer_id, again.reason)


def test_own_records_never_count_twice():
    # a stale record of this server at other blocks must not make those blocks look served
    servers = swarm_of({"a": rec(0, 4), "me": rec(0, 4)})
    servers[5]["me"] = rec(4, 8)  # e.g. announced before a restart with the same identity
    decision = should_move(servers, 8, peer_id="me", start=0, end=4, throughput=10, balance_quality=1.3)
    assert decision.move and (decision.start, decision.end) == (4, 8)


def test_should_move_checks_the_span():
    with pytest.raises(ValueError, match="outside the model"):
        should_move({}, 8, peer_id="me", start=6, end=10, throughput=1, balance_quality=1.3)


# ---------------------------------------------------------------- settle_span: servers started at the same moment


def test_servers_that_chose_the_same_span_settle_on_different_ones():
    # both saw an empty swarm and announced JOINING at 0:2 of 4 blocks; then each looks again
    seen = swarm_of({"peerA": rec(0, 2, 10, JOINING), "peerB": rec(0, 2, 10, JOINING)}, num_blocks=4)
    a = settle_span(seen, 4, peer_id="peerA", start=0, end=2, throughput=10)
    b = settle_span(seen, 4, peer_id="peerB", start=0, end=2, throughput=10)
    assert (a, b) == (0, 2)  # the smaller peer id keeps its choice, the other takes the free blocks


def test_a_server_that_saw_part_of_an_announcement_settles_where_it_belongs():
    # B chose while only block 0 of A's JOINING record was stored: it took 1:3 and left block 3 unserved
    partial = {0: {"peerA": rec(0, 2, 10, JOINING)}, 1: {}, 2: {}, 3: {}}
    assert choose_span(block_totals(partial, 4, unknown_throughput=10), 2) == 1
    seen = swarm_of({"peerA": rec(0, 2, 10, JOINING), "peerB": rec(1, 3, 10, JOINING)}, num_blocks=4)
    assert settle_span(seen, 4, peer_id="peerB", start=1, end=3, throughput=10) == 2
    assert settle_span(seen, 4, peer_id="peerA", start=0, end=2, throughput=10) == 0


@pytest.mark.parametrize("count", [2, 3, 4, 6])
def test_settling_covers_the_model_whatever_each_saw_first(count):
    # every server first chose blocks 0:2 (none saw the others); one look each, smallest peer id first or last
    first = {f"p{i}": rec(0, 2, 10, JOINING) for i in range(count)}
    for order in (sorted(first), sorted(first, reverse=True)):
        servers = dict(first)
        for peer in order:
            start = settle_span(swarm_of(servers, 4), 4, peer_id=peer, start=servers[peer].start,
                                end=servers[peer].end, throughput=10)
            servers[peer] = rec(start, start + 2, 10, JOINING)
        assert all(block_totals(swarm_of(servers, 4), 4)), (order, servers)


def test_settling_never_moves_for_online_servers_or_ties():
    seen = swarm_of({"p1": rec(0, 2, 10, ONLINE), "p9": rec(2, 4, 10, JOINING)}, num_blocks=4)
    assert settle_span(seen, 4, peer_id="p9", start=2, end=4, throughput=10) == 2
    assert settle_span(swarm_of({"p9": rec(0, 4, 10, JOINING)}, 4), 4, peer_id="p9", start=0, end=4,
                       throughput=10) == 0
