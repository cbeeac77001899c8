"""Pure routing over synthetic swarms (swarm/routing.py)."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from swarm.errors import FatalError, MissingBlocksError
from swarm.records import ServerRecord, ServerState
from swarm.routing import (
    Bans,
    ChainLink,
    allowed_servers,
    format_blocks,
    make_chain,
    make_forward_chain,
    make_latency_chain,
    missing_blocks,
    quant_excluded,
)


def rec(start: int, end: int, *, state: ServerState = ServerState.ONLINE, throughput: float = 1.0,
        cache: int = 1000, quant: str = "none", adapters: tuple[str, ...] = ()) -> ServerRecord:
    return ServerRecord(state=state, start=start, end=end, throughput=throughput, cache_tokens_left=cache,
                        quant=quant, adapters=adapters)


def swarm_of(servers: dict[str, ServerRecord], num_blocks: int | None = None) -> dict[int, dict[str, ServerRecord]]:
    """``{peer_id: record}`` -> ``{block: {peer_id: record}}``, the shape fetch_servers returns."""
    num_blocks = num_blocks if num_blocks is not None else max(r.end for r in servers.values())
    out: dict[int, dict[str, ServerRecord]] = {b: {} for b in range(num_blocks)}
    for peer_id, record in servers.items():
        for b in range(record.start, record.end):
            out[b][peer_id] = record
    return out


def links(chain: list[ChainLink]) -> list[tuple[str, int, int]]:
    return [(link.peer_id, link.start, link.end) for link in chain]


def assert_covers(chain: list[ChainLink], start: int, end: int) -> None:
    assert chain[0].start == start and chain[-1].end == end
    for a, b in zip(chain, chain[1:]):
        assert a.end == b.start


# ---------------------------------------------------------------- make_chain


def test_single_server_covers_all():
    servers = swarm_of({"A": rec(0, 8)})
    assert links(make_chain(servers, 0, 8)) == [("A", 0, 8)]


def test_two_servers_split():
    servers = swarm_of({"A": rec(0, 3), "B": rec(3, 8)})
    assert links(make_chain(servers, 0, 8)) == [("A", 0, 3), ("B", 3, 8)]


def test_overlapping_servers_fewest_hops():
    # greedy-farthest: A(0:4) then C(2:8) is 2 hops; B(0:2)->D(2:5)->... would be more
    servers = swarm_of({"A": rec(0, 4), "B": rec(0, 2, throughput=100), "C": rec(2, 8), "D": rec(2, 5, throughput=100),
                        "E": rec(4, 6, throughput=100)})
    chain = make_chain(servers, 0, 8)
    assert links(chain) == [("A", 0, 4), ("C", 4, 8)]
    assert_covers(chain, 0, 8)


def test_longest_reach_beats_throughput():
    servers = swarm_of({"fast": rec(0, 4, throughput=1000.0), "slow": rec(0, 8, throughput=1.0)})
    assert links(make_chain(servers, 0, 8)) == [("slow", 0, 8)]


def test_tie_on_reach_goes_to_higher_throughput():
    servers = swarm_of({"A": rec(0, 4, throughput=5.0), "B": rec(0, 4, throughput=9.0), "C": rec(0, 4, throughput=7.0)})
    assert links(make_chain(servers, 0, 4)) == [("B", 0, 4)]


def test_tie_on_throughput_goes_to_smaller_peer_id():
    records = {"QmZ": rec(0, 4), "QmB": rec(0, 4), "QmC": rec(0, 4)}
    assert links(make_chain(swarm_of(records), 0, 4)) == [("QmB", 0, 4)]


def test_tie_break_with_peer_id_prefix():
    # "Qm1" < "Qm12": the smaller id must win even when one id is a prefix of the other
    records = {"Qm12": rec(0, 4), "Qm1": rec(0, 4)}
    assert links(make_chain(swarm_of(records), 0, 4)) == [("Qm1", 0, 4)]
    records = {"Qm1": rec(0, 4), "Qm12": rec(0, 4)}
    assert links(make_chain(swarm_of(records), 0, 4)) == [("Qm1", 0, 4)]


def test_chain_is_deterministic_regardless_of_dict_order():
    records = {"A": rec(0, 3), "B": rec(0, 3), "C": rec(2, 6, throughput=2.0), "D": rec(3, 6, throughput=2.0),
               "E": rec(1, 6, throughput=0.5)}
    results = set()
    for order in itertools.permutations(records):
        servers = swarm_of({p: records[p] for p in order})
        results.add(tuple(links(make_chain(servers, 0, 6))))
    assert results == {(("A", 0, 3), ("C", 3, 6))}


def test_joining_and_offline_servers_are_ignored():
    servers = swarm_of({"joining": rec(0, 8, state=ServerState.JOINING),
                        "offline": rec(0, 8, state=ServerState.OFFLINE),
                        "A": rec(0, 4), "B": rec(4, 8)})
    assert links(make_chain(servers, 0, 8)) == [("A", 0, 4), ("B", 4, 8)]


def test_only_joining_servers_means_missing():
    servers = swarm_of({"joining": rec(0, 4, state=ServerState.JOINING)})
    with pytest.raises(MissingBlocksError, match="blocks 0:4 "):
        make_chain(servers, 0, 4)


def test_banned_peers_are_ignored():
    servers = swarm_of({"big": rec(0, 8, throughput=100), "A": rec(0, 4), "B": rec(4, 8)})
    assert links(make_chain(servers, 0, 8)) == [("big", 0, 8)]
    assert links(make_chain(servers, 0, 8, banned={"big"})) == [("A", 0, 4), ("B", 4, 8)]
    with pytest.raises(MissingBlocksError, match=r"blocks 4:8 .*3 server\(s\) seen, 2 temporarily banned"):
        make_chain(servers, 0, 8, banned={"big", "B"})


def test_min_cache_tokens_respected():
    servers = swarm_of({"small": rec(0, 8, cache=100, throughput=100), "A": rec(0, 4, cache=500),
                        "B": rec(4, 8, cache=500)})
    assert links(make_chain(servers, 0, 8, min_cache_tokens=100)) == [("small", 0, 8)]
    assert links(make_chain(servers, 0, 8, min_cache_tokens=101)) == [("A", 0, 4), ("B", 4, 8)]
    with pytest.raises(MissingBlocksError, match="blocks 0:8 .* with 501 free cache tokens"):
        make_chain(servers, 0, 8, min_cache_tokens=501)


def test_missing_blocks_error_names_the_spans():
    servers = swarm_of({"A": rec(0, 2), "B": rec(4, 5), "C": rec(7, 8)}, num_blocks=8)
    with pytest.raises(MissingBlocksError) as info:
        make_chain(servers, 0, 8, model="tiny-llama")
    message = str(info.value)
    assert "blocks 2:4, 5:7 of tiny-llama have no online server" in message
    assert "3 server(s) seen, 0 temporarily banned" in message
    assert "--blocks 2:7" in message  # the span a new server should cover
    assert isinstance(info.value, FatalError)


@pytest.mark.parametrize("chain", [make_chain, make_latency_chain, make_forward_chain])
def test_missing_blocks_blame_cache_only_when_it_is_the_cause(chain):
    kwargs = {"pings": {}} if chain is make_latency_chain else {"rng": random.Random(0)} \
        if chain is make_forward_chain else {}
    cache = {} if chain is make_forward_chain else {"min_cache_tokens": 300}
    # a dead server: its ONLINE record is still in the DHT, it failed and is banned
    dead = swarm_of({"A": rec(0, 2, cache=1000), "B": rec(2, 4, cache=1000)})
    with pytest.raises(MissingBlocksError) as info:
        chain(dead, 0, 4, banned={"B"}, **cache, **kwargs)
    assert "free cache" not in str(info.value) and "did not answer or failed" in str(info.value)
    # an absent server: nobody announced blocks 2:4 at all
    with pytest.raises(MissingBlocksError) as info:
        chain(swarm_of({"A": rec(0, 2, cache=1000)}, num_blocks=4), 0, 4, **cache, **kwargs)
    assert "blocks 2:4" in str(info.value) and "free cache" not in str(info.value)
    assert "did not answer" not in str(info.value)
    if chain is make_forward_chain:
        return
    # servers there, alive, with too little room: that, and only that, is the cache's fault
    full = swarm_of({"A": rec(0, 2, cache=1000), "B": rec(2, 4, cache=100)})
    with pytest.raises(MissingBlocksError, match="blocks 2:4 .* with 300 free cache tokens: their servers have at "
                                                 "most 100 free .* shorter session"):
        chain(full, 0, 4, **cache, **kwargs)


def test_missing_blocks_beyond_known_keys():
    # blocks the lookup did not even return (no key at all) count as missing
    servers = {0: {"A": rec(0, 2)}, 1: {"A": rec(0, 2)}}
    with pytest.raises(MissingBlocksError, match="blocks 2:4 "):
        make_chain(servers, 0, 4)


def test_sub_range_start_end():
    servers = swarm_of({"A": rec(0, 5), "B": rec(3, 10), "C": rec(8, 12)})
    assert links(make_chain(servers, 2, 4)) == [("A", 2, 4)]  # link end clipped to the request
    assert links(make_chain(servers, 4, 9)) == [("B", 4, 9)]
    assert links(make_chain(servers, 6, 12)) == [("B", 6, 10), ("C", 10, 12)]
    # a missing block outside the requested range does not matter
    servers = swarm_of({"A": rec(0, 3), "B": rec(5, 8)})
    assert links(make_chain(servers, 5, 7)) == [("B", 5, 7)]
    with pytest.raises(MissingBlocksError, match="blocks 3:5 "):
        make_chain(servers, 2, 7)


def test_empty_range_gives_empty_chain():
    assert make_chain({}, 3, 3) == []


# ---------------------------------------------------------------- missing_blocks / format_blocks


def test_missing_blocks():
    servers = swarm_of({"A": rec(0, 2), "B": rec(3, 4, state=ServerState.JOINING), "C": rec(4, 6, cache=10)},
                       num_blocks=7)
    assert missing_blocks(servers, 0, 7) == [2, 3, 6]
    assert missing_blocks(servers, 0, 7, banned={"A"}) == [0, 1, 2, 3, 6]
    assert missing_blocks(servers, 0, 7, min_cache_tokens=11) == [2, 3, 4, 5, 6]
    assert missing_blocks(servers, 4, 6) == []
    assert missing_blocks({}, 0, 3) == [0, 1, 2]


@pytest.mark.parametrize("blocks, text", [
    ([], ""),
    ([2], "2:3"),
    ([2, 3], "2:4"),
    ([0, 1, 2, 5], "0:3, 5:6"),
    ([0, 2, 4], "0:1, 2:3, 4:5"),
    ([9, 10, 11, 12, 20, 21], "9:13, 20:22"),
])
def test_format_blocks(blocks, text):
    assert format_blocks(blocks) == text


# ---------------------------------------------------------------- Bans


def test_bans_exponential_backoff():
    bans = Bans(min_backoff=1.0, max_backoff=60.0)
    assert bans.banned(now=0.0) == frozenset()
    assert bans.ban("A", now=100.0) == 1.0
    assert bans.banned(now=100.5) == {"A"}
    assert bans.banned(now=101.0) == frozenset()  # banned until now + delay, exclusive
    assert bans.ban("A", now=200.0) == 2.0  # the second failure waits longer
    assert bans.banned(now=201.5) == {"A"}
    assert bans.banned(now=202.0) == frozenset()
    assert [bans.ban("A", now=300.0) for _ in range(3)] == [4.0, 8.0, 16.0]


def test_bans_capped_at_max_backoff():
    bans = Bans(min_backoff=0.5, max_backoff=10.0)
    delays = [bans.ban("A", now=0.0) for _ in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert bans.banned(now=9.9) == {"A"} and bans.banned(now=10.0) == frozenset()


def test_bans_survive_many_failures():
    bans = Bans(min_backoff=1.0, max_backoff=60.0)
    for _ in range(5000):  # a long-running client and a peer that keeps failing
        delay = bans.ban("A", now=0.0)
    assert delay == 60.0


def test_bans_succeeded_clears():
    bans = Bans(min_backoff=1.0, max_backoff=60.0)
    for _ in range(4):
        bans.ban("A", now=0.0)
    bans.ban("B", now=0.0)
    assert bans.banned(now=0.5) == {"A", "B"}
    bans.succeeded("A")
    assert bans.banned(now=0.5) == {"B"}
    assert bans.ban("A", now=10.0) == 1.0  # failure count reset
    bans.succeeded("never-banned")  # no error


def test_bans_are_per_peer():
    bans = Bans(min_backoff=1.0, max_backoff=60.0)
    bans.ban("A", now=0.0)
    bans.ban("A", now=0.0)
    assert bans.ban("B", now=0.0) == 1.0
    assert bans.banned(now=1.5) == {"A"}


def test_bans_feed_make_chain():
    servers = swarm_of({"A": rec(0, 4, throughput=10), "B": rec(0, 4)})
    bans = Bans()
    bans.ban("A", now=0.0)
    assert links(make_chain(servers, 0, 4, banned=bans.banned(now=0.5))) == [("B", 0, 4)]
    assert links(make_chain(servers, 0, 4, banned=bans.banned(now=5.0))) == [("A", 0, 4)]


def test_record_filed_under_a_block_it_does_not_cover_is_ignored():
    # a hand-built or hostile map: "bad" claims 0:1 but sits under block 1 too; it must neither be
    # chosen for block 1 nor stall the chain
    servers = {0: {"bad": rec(0, 1)}, 1: {"bad": rec(0, 1), "good": rec(1, 2)}}
    assert links(make_chain(servers, 0, 2)) == [("bad", 0, 1), ("good", 1, 2)]
    with pytest.raises(MissingBlocksError, match="blocks 1:2"):
        make_chain({0: {"bad": rec(0, 1)}, 1: {"bad": rec(0, 1)}}, 0, 2)


# ---------------------------------------------------------------- make_latency_chain / make_forward_chain

def fast(start: int, end: int, rps: float, **kwargs) -> ServerRecord:
    return ServerRecord(state=ServerState.ONLINE, start=start, end=end, inference_rps=rps, cache_tokens_left=1000,
                        throughput=kwargs.get("throughput", 1.0))


def test_latency_chain_prefers_the_faster_route_over_fewer_hops():
    servers = swarm_of({"slow_all": fast(0, 4, rps=10), "a": fast(0, 2, rps=1000), "b": fast(2, 4, rps=1000)})
    pings = {"slow_all": 0.001, "a": 0.001, "b": 0.001}
    # slow_all: 0.001 + 4 * 0.1 = 0.401 s; a + b: 2 * (0.001 + 2 * 0.001) = 0.006 s
    assert links(make_latency_chain(servers, 0, 4, pings=pings)) == [("a", 0, 2), ("b", 2, 4)]


def test_latency_chain_avoids_a_far_away_server():
    servers = swarm_of({"near": fast(0, 4, rps=100), "far": fast(0, 4, rps=100)})
    assert links(make_latency_chain(servers, 0, 4, pings={"near": 0.002, "far": 0.3})) == [("near", 0, 4)]
    # an unknown ping counts as DEFAULT_PING, worse than a measured near one
    assert links(make_latency_chain(servers, 0, 4, pings={"far": 0.002})) == [("far", 0, 4)]


def test_latency_chain_equal_costs_prefer_fewer_hops_then_smaller_peer_id():
    servers = swarm_of({"z": fast(0, 4, rps=100), "y": fast(0, 4, rps=100), "a": fast(0, 2, rps=100),
                        "b": fast(2, 4, rps=100)})
    pings = dict.fromkeys("zyab", 0.0)
    assert links(make_latency_chain(servers, 0, 4, pings=pings)) == [("y", 0, 4)]


def test_latency_chain_respects_bans_cache_and_missing_blocks():
    servers = swarm_of({"a": fast(0, 4, rps=100), "b": fast(0, 2, rps=10), "c": fast(2, 4, rps=10)})
    pings = dict.fromkeys("abc", 0.01)
    assert links(make_latency_chain(servers, 0, 4, pings=pings, banned={"a"})) == [("b", 0, 2), ("c", 2, 4)]
    with pytest.raises(MissingBlocksError, match="blocks 2:4"):
        make_latency_chain(servers, 0, 4, pings=pings, banned={"a", "c"})
    assert_covers(make_latency_chain(servers, 1, 3, pings=pings), 1, 3)


def test_forward_chain_spreads_by_throughput_and_is_reproducible():
    import random

    servers = swarm_of({"big": fast(0, 4, rps=1, throughput=300.0), "small": fast(0, 4, rps=1, throughput=100.0)})
    rng = random.Random(0)
    picks = [make_forward_chain(servers, 0, 4, rng=rng)[0].peer_id for _ in range(2000)]
    share = picks.count("big") / len(picks)
    assert 0.7 < share < 0.8  # 300 / (300 + 100) = 0.75
    again = random.Random(0)
    assert picks[:50] == [make_forward_chain(servers, 0, 4, rng=again)[0].peer_id for _ in range(50)]
    with pytest.raises(MissingBlocksError):
        make_forward_chain(servers, 0, 4, rng=rng, banned={"big", "small"})


# ---------------------------------------------------------------- make_latency_chain with server-published pings


def pinging(start: int, end: int, next_pings: dict[str, float], rps: float = 1000.0) -> ServerRecord:
    return ServerRecord(state=ServerState.ONLINE, start=start, end=end, inference_rps=rps, cache_tokens_left=1000,
                        throughput=1.0, next_pings=next_pings)


def test_latency_chain_prefers_a_fast_published_hop_to_the_next_server():
    # same compute and client pings everywhere: only the server-to-server round trip tells a1 and a2 apart
    pings = dict.fromkeys(["a1", "a2", "b"], 0.01)
    fast_a2 = swarm_of({"a1": pinging(0, 2, {"b": 0.3}), "a2": pinging(0, 2, {"b": 0.001}), "b": pinging(2, 4, {})})
    assert links(make_latency_chain(fast_a2, 0, 4, pings=pings)) == [("a2", 0, 2), ("b", 2, 4)]
    fast_a1 = swarm_of({"a1": pinging(0, 2, {"b": 0.001}), "a2": pinging(0, 2, {"b": 0.3}), "b": pinging(2, 4, {})})
    assert links(make_latency_chain(fast_a1, 0, 4, pings=pings)) == [("a1", 0, 2), ("b", 2, 4)]


def test_latency_chain_picks_the_next_server_its_predecessor_reaches_fastest():
    pings = dict.fromkeys(["a", "b1", "b2"], 0.01)
    servers = swarm_of({"a": pinging(0, 2, {"b1": 0.2, "b2": 0.001}), "b1": pinging(2, 4, {}), "b2": pinging(2, 4, {})})
    # a -> b1: 0.005 + 0.1 + 0.005; a -> b2: 0.005 + 0.0005 + 0.005 (+ the same compute)
    assert links(make_latency_chain(servers, 0, 4, pings=pings)) == [("a", 0, 2), ("b2", 2, 4)]
    # without push every hop goes through the client: published pings do not matter, equal costs -> smaller id
    assert links(make_latency_chain(servers, 0, 4, pings=pings, push=False)) == [("a", 0, 2), ("b1", 2, 4)]
    # a banned next server is skipped however fast its hop
    assert links(make_latency_chain(servers, 0, 4, pings=pings, banned={"b2"})) == [("a", 0, 2), ("b1", 2, 4)]


def test_latency_chain_keeps_a_slower_start_that_reaches_the_next_server_faster():
    # a1 computes faster (0.002 vs 0.02 s for blocks 0:2) but its hop to c is slow: the best chain to
    # boundary 2 is not the start of the best chain to 4, so the search must keep both
    pings = dict.fromkeys(["a1", "a2", "c"], 0.01)
    servers = swarm_of({"a1": pinging(0, 2, {"c": 0.5}, rps=1000), "a2": pinging(0, 2, {"c": 0.001}, rps=100),
                        "c": pinging(2, 4, {})})
    assert links(make_latency_chain(servers, 0, 4, pings=pings)) == [("a2", 0, 2), ("c", 2, 4)]


def test_latency_chain_falls_back_to_client_pings_for_hops_without_a_published_ping():
    pings = dict.fromkeys(["a", "b1", "b2"], 0.001)
    # a published nothing for b1: its hop counts as going through the client (0.001), better than b2's 0.05
    servers = swarm_of({"a": pinging(0, 2, {"b2": 0.05}), "b1": pinging(2, 4, {}), "b2": pinging(2, 4, {})})
    assert links(make_latency_chain(servers, 0, 4, pings=pings)) == [("a", 0, 2), ("b1", 2, 4)]
    # a negative, infinite or NaN ping counts as none published
    for bad in (-1.0, float("inf"), float("nan")):
        servers = swarm_of({"a": pinging(0, 2, {"b1": 0.05, "b2": bad}), "b1": pinging(2, 4, {}),
                            "b2": pinging(2, 4, {})})
        assert links(make_latency_chain(servers, 0, 4, pings=pings)) == [("a", 0, 2), ("b2", 2, 4)]


def test_latency_chain_counts_the_answer_back_to_the_client():
    # b2 is a fast hop from a, but far from the client, which must get the last server's output
    pings = {"a": 0.01, "b1": 0.01, "b2": 0.5}
    servers = swarm_of({"a": pinging(0, 2, {"b1": 0.01, "b2": 0.001}), "b1": pinging(2, 4, {}),
                        "b2": pinging(2, 4, {})})
    assert links(make_latency_chain(servers, 0, 4, pings=pings)) == [("a", 0, 2), ("b1", 2, 4)]


def test_latency_chain_without_published_pings_costs_the_sum_of_client_pings():
    # a 3-hop chain of near servers beats one far server, as before servers published pings
    servers = swarm_of({"far": pinging(0, 3, {}), "x": pinging(0, 1, {}), "y": pinging(1, 2, {}),
                        "z": pinging(2, 3, {})})
    pings = {"far": 0.031, "x": 0.01, "y": 0.01, "z": 0.01}
    assert [p for p, _, _ in links(make_latency_chain(servers, 0, 3, pings=pings))] == ["x", "y", "z"]
    pings["far"] = 0.029
    assert links(make_latency_chain(servers, 0, 3, pings=pings)) == [("far", 0, 3)]


# ---------------------------------------------------------------- what a client allows


def test_allowed_quant_filters_servers_for_every_kind_of_chain():
    servers = swarm_of({"float": rec(0, 4, throughput=1.0), "nf4": rec(0, 4, throughput=100.0, quant="nf4"),
                        "int8a": rec(0, 2, quant="int8", adapters=("chat",)), "int8b": rec(2, 4, quant="int8")})
    assert allowed_servers(servers) == servers
    only_float = allowed_servers(servers, allowed_quant=("none",))
    assert links(make_chain(only_float, 0, 4)) == [("float", 0, 4)]  # although nf4 is 100x faster
    assert links(make_latency_chain(only_float, 0, 4, pings={})) == [("float", 0, 4)]
    assert all(link.peer_id == "float" for _ in range(20)
               for link in make_forward_chain(only_float, 0, 4, rng=random.Random(_)))
    assert links(make_chain(allowed_servers(servers, allowed_quant=("int8",)), 0, 4)) == [("int8a", 0, 2),
                                                                                           ("int8b", 2, 4)]
    assert allowed_servers(servers, adapter="chat", allowed_quant=("int8", "nf4")) == {
        0: {"int8a": servers[0]["int8a"]}, 1: {"int8a": servers[1]["int8a"]}, 2: {}, 3: {}}


def test_missing_blocks_say_when_the_quant_filter_excluded_servers():
    servers = swarm_of({"a": rec(0, 2), "b": rec(2, 4, quant="nf4"), "c": rec(3, 4, quant="int8"),
                        "gone": rec(2, 4, quant="int8", state=ServerState.OFFLINE)})
    allowed = ("none",)
    filtered = allowed_servers(servers, allowed_quant=allowed)
    with pytest.raises(MissingBlocksError, match="blocks 2:4"):
        make_chain(filtered, 0, 4)
    note = quant_excluded(servers, missing_blocks(filtered, 0, 4), allowed)
    assert note == ("; the client's quant filter (allowed_quant=('none',)) excluded 2 online server(s) of these "
                    "blocks that serve quant int8, nf4: allow it, or start a server with --quant none")
    assert quant_excluded(servers, [0, 1], allowed) == ""  # nothing was excluded there
    assert quant_excluded(servers, [2, 3], None) == ""  # no filter
    assert quant_excluded(servers, [3], ("fp8",)).endswith("serve quant int8, nf4: allow it")  # nothing to start


def test_bans_last_at_least_what_the_failure_cost():
    bans = Bans(min_backoff=1.0, max_backoff=60.0)
    assert bans.ban("A", now=0.0, cost=20.0) == 20.0  # a timeout of 20 s: out for 20 s, not 1 s
    assert bans.banned(now=19.0) == {"A"} and bans.banned(now=20.0) == frozenset()
    assert bans.ban("A", now=100.0, cost=0.5) == 2.0  # the exponential part when it is longer
    assert bans.ban("B", now=0.0, cost=float("nan")) == 1.0  # a broken clock does not ban for ever
    bans.ban("C", now=0.0, cost=50.0)
    bans.ban("C", now=1.0, cost=0.0)  # a later, shorter ban does not shorten the running one
    assert "C" in bans.banned(now=49.0)


def test_a_dead_server_stays_out_until_its_record_changes():
    record = rec(0, 4, throughput=10)
    servers = swarm_of({"A": record, "B": rec(0, 4)})
    bans = Bans()
    bans.dead("A", servers)
    # its ONLINE record outlives it in the DHT; time alone does not bring it back
    assert bans.banned(now=10_000.0, servers=servers) == {"A"}
    assert links(make_chain(servers, 0, 4, banned=bans.banned(now=10_000.0, servers=servers))) == [("B", 0, 4)]
    # a restart with the same identity announces again: a new record, and it is tried again
    restarted = swarm_of({"A": dataclasses.replace(record, announced_at=record.announced_at + 60), "B": rec(0, 4)})
    assert bans.banned(now=10_000.0, servers=restarted) == frozenset()
    assert bans.banned(now=10_000.0, servers=servers) == frozenset()  # forgiven for good, until it fails again
    bans.dead("A", restarted)
    assert bans.banned(now=0.0) == {"A"}  # without a lookup, a dead peer stays dead


def test_an_older_copy_of_a_dead_servers_record_does_not_revive_it():
    """Lookups may return older copies of a block's entry for a while (another DHT node's): a dead server is
    tried again only for a record announced after the one it was found dead with."""
    record = dataclasses.replace(rec(0, 4), announced_at=100.0)
    bans = Bans()
    bans.dead("A", swarm_of({"A": record}))
    older = swarm_of({"A": dataclasses.replace(record, announced_at=40.0, throughput=3.0)})
    assert bans.banned(now=0.0, servers=older) == {"A"}
    assert bans.banned(now=0.0, servers=swarm_of({"A": record})) == {"A"}
    assert bans.banned(now=0.0, servers=swarm_of({"A": dataclasses.replace(record, announced_at=160.0)})) == set()
    unstamped = rec(0, 4)  # an older server's records carry no time: a different record counts as new
    bans.dead("B", swarm_of({"B": unstamped}))
    assert bans.banned(now=0.0, servers=swarm_of({"B": unstamped})) == {"B"}
    assert bans.banned(now=0.0, servers=swarm_of({"B": dataclasses.replace(unstamped, throughput=3.0)})) == set()


def test_a_restarted_server_starts_afresh():
    """Killed again and again (each time banned for longer), then restarted: the new process is not held to
    its predecessor's bans."""
    record = rec(0, 4)
    servers = swarm_of({"A": record})
    bans = Bans(min_backoff=1.0, max_backoff=60.0)
    for _ in range(6):
        bans.ban("A", now=0.0)
    bans.dead("A", servers)
    assert bans.banned(now=30.0) == {"A"}
    restarted = swarm_of({"A": dataclasses.replace(record, announced_at=record.announced_at + 10)})
    assert bans.banned(now=30.0, servers=restarted) == frozenset()
    assert bans.ban("A", now=31.0) == 1.0  # its first failure: the shortest ban


def test_servers_that_answered_are_remembered_a_restart_alone_is_not_an_answer():
    record = rec(0, 4)
    bans = Bans()
    bans.succeeded("A")
    bans.dead("B", swarm_of({"B": record}))
    assert bans.banned(now=0.0, servers=swarm_of({"B": dataclasses.replace(record, announced_at=10.0)})) == frozenset()
    assert bans.served() == {"A"}  # B announced itself again but never answered


def test_a_wrong_server_is_distrusted_for_good():
    bans = Bans()
    bans.distrust("A")
    bans.succeeded("A")
    assert bans.banned(now=1e9, servers=swarm_of({"A": rec(0, 4)})) == {"A"} and bans.distrusted() == {"A"}
def test_latency_chain_after_a_server_prices_the_first_hop_from_its_published_pings():
    # replacing blocks 2:4 behind a: a's published ping to b2 beats b1, which the client sees as equal
    pings = dict.fromkeys(["a", "b1", "b2"], 0.01)
    servers = swarm_of({"a": pinging(0, 2, {"b1": 0.2, "b2": 0.001}), "b1": pinging(2, 4, {}), "b2": pinging(2, 4, {})})
    assert links(make_latency_chain(servers, 2, 4, pings=pings)) == [("b1", 2, 4)]  # priced from the client
    assert links(make_latency_chain(servers, 2, 4, pings=pings, after="a")) == [("b2", 2, 4)]
    # a predecessor without a record (it left) prices the hop through the client
    assert links(make_latency_chain(servers, 2, 4, pings=pings, after="gone")) == [("b1", 2, 4)]


def test_latency_chain_then_a_server_prices_the_last_hop_to_it():
    # replacing blocks 0:2 before c: b2 pushes to c fast, b1 slowly; the client sees b1 as nearer
    pings = {"b1": 0.01, "b2": 0.02, "c": 0.01}
    servers = swarm_of({"b1": pinging(0, 2, {"c": 0.3}), "b2": pinging(0, 2, {"c": 0.001}), "c": pinging(2, 4, {})})
    assert links(make_latency_chain(servers, 0, 2, pings=pings)) == [("b1", 0, 2)]
    assert links(make_latency_chain(servers, 0, 2, pings=pings, then="c")) == [("b2", 0, 2)]
    # without push the hand-over goes through the client: b1 is nearer again
    assert links(make_latency_chain(servers, 0, 2, pings=pings, then="c", push=False)) == [("b1", 0, 2)]
