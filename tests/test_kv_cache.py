"""The paged KV cache's bookkeeping and the batch scheduler: pure logic, no model, milliseconds."""

from __future__ import annotations

import pytest
import torch

from server.kv_cache import PagePool, SessionCache
from server.scheduler import Arrivals, Ticket, chunk_length, next_batch
from swarm.errors import ConfigError, ServerBusy


def test_pool_hands_out_the_lowest_pages_and_refuses_all_or_nothing():
    pool = PagePool(cache_tokens=100, num_blocks=2, bytes_per_token_block=8, page_tokens=16)
    assert (pool.capacity, pool.tokens_left, pool.capacity_bytes) == (6, 96, 6 * 16 * 2 * 8)  # 100 -> 6 whole pages
    first = pool.take(4)
    assert first == [1, 2, 3, 4] and pool.top == 4  # page 0 is never handed out
    with pytest.raises(ServerBusy, match="needs 48 more tokens of cache, 32 are free"):
        pool.take(3)
    assert pool.tokens_left == 32  # a refused request takes nothing
    pool.give([2, 3])
    assert pool.take(3) == [2, 3, 5]
    pool.give([1, 2, 3, 4, 5])
    assert pool.used == 0 and pool.top == 0  # empty: the storage may start small again
    with pytest.raises(ConfigError, match="--cache-tokens 15 is less than one page"):
        PagePool(15, 1, 8, page_tokens=16)


def test_session_cache_grows_by_pages_rolls_back_and_frees():
    pool = PagePool(cache_tokens=16 * 10, num_blocks=1, bytes_per_token_block=8, page_tokens=16)
    cache = SessionCache(pool, batch=2)
    cache.grow(20)  # two rows, two pages each
    assert cache.table.shape == (2, 2) and pool.used == 4
    cache.length = 20
    slots = cache.slots(14, 18)  # positions 14..17 cross a page boundary
    assert slots[0].tolist() == [cache.table[0, 0] * 16 + 14, cache.table[0, 0] * 16 + 15,
                                 cache.table[0, 1] * 16, cache.table[0, 1] * 16 + 1]
    cache.grow(32)
    assert pool.used == 4  # 32 tokens still fit two pages per row
    with pytest.raises(ServerBusy):
        cache.grow(16 * 6)  # six pages per row = 12 in all; 6 are free: nothing taken
    assert pool.used == 4 and cache.table.shape == (2, 2)
    cache.crop(5, keep=6)
    assert cache.length == 5 and cache.table.shape == (2, 1) and pool.used == 2
    cache.close()
    assert pool.used == 0
    with pytest.raises(ServerBusy, match="closed"):
        cache.grow(1)


def test_a_closed_sessions_pages_wait_for_the_running_batch():
    """Closed from the event loop while a batch may still write its pages: they are counted free, but no
    one gets them before the next batch starts (collect)."""
    pool = PagePool(cache_tokens=16 * 4, num_blocks=1, bytes_per_token_block=8, page_tokens=16)
    first, second = SessionCache(pool, batch=1), SessionCache(pool, batch=1)
    first.grow(16 * 3)
    first.close()
    first.crop(0)  # the running batch's own bookkeeping after the close: no double free
    assert pool.tokens_left == 64 and pool.used == 0
    with pytest.raises(ServerBusy):
        second.grow(16 * 2)  # only one page is free until the batch is over
    pool.collect()
    second.grow(16 * 4)
    assert sorted(second.table.reshape(-1).tolist()) == [1, 2, 3, 4]


def test_session_cache_keeps_its_padding_mask_through_rollbacks():
    cache = SessionCache(PagePool(64, 1, 8, page_tokens=16), batch=2)
    cache.append_mask(None, 3)
    assert cache.key_mask is None  # no padding yet: nothing kept
    cache.length = 3
    cache.append_mask(torch.tensor([[True, False], [True, True]]), 2)
    assert cache.key_mask.tolist() == [[True, True, True, True, False], [True] * 5]
    cache.length = 5
    cache.crop(4)
    assert cache.key_mask.shape == (2, 4)


def test_scheduler_batches_the_oldest_steps_group_within_the_token_budget():
    decode = (0, 4, 1)
    tickets = [Ticket(3, decode, 1), Ticket(1, decode, 2), Ticket(2, (0, 4, 7), 7), Ticket(5, decode, 4),
               Ticket(4, (0, 2, 1), 1)]
    assert next_batch(tickets, max_tokens=100) == [1, 0, 3]  # oldest first; other groups wait
    assert next_batch(tickets, max_tokens=3) == [1, 0]  # the budget stops the batch
    assert next_batch(tickets, max_tokens=1) == [1]  # the oldest always runs, even over the budget
    assert next_batch(tickets, max_tokens=100, batching=False) == [1]
    assert next_batch([Ticket(9, (0, 4, 7), 7), *tickets[:2]], max_tokens=100) == [2, 1]
    assert next_batch([], max_tokens=100) == []


def test_long_steps_run_in_chunks_of_the_token_budget():
    assert chunk_length(rows=1, remaining=1000, max_tokens=256) == 256
    assert chunk_length(rows=4, remaining=1000, max_tokens=256) == 64
    assert chunk_length(rows=4, remaining=10, max_tokens=256) == 10
    assert chunk_length(rows=1000, remaining=10, max_tokens=256) == 1  # a wide batch still advances


def test_a_batch_waits_briefly_for_the_sessions_of_the_last_one():
    arrivals = Arrivals(fraction=0.5, max_hold=0.05)
    assert arrivals.hold(now=0.0) == 0  # nothing known: no wait
    arrivals.answered(["a", "b", "far"], now=1.0, duration=0.04)  # a 40 ms batch: wait up to 20 ms
    assert arrivals.hold(now=1.001) == 0  # no turnaround measured yet: nobody is expected
    arrivals.arrived("a", now=1.002)
    arrivals.arrived("b", now=1.003)
    arrivals.arrived("far", now=1.1)  # a client 100 ms away
    arrivals.answered(["a", "b", "far"], now=2.0, duration=0.04)
    arrivals.arrived("a", now=2.002)
    assert arrivals.hold(now=2.002) == pytest.approx(0.018)  # b is 3 ms away: wait for it
    arrivals.arrived("b", now=2.0025)
    assert arrivals.hold(now=2.0025) == 0  # "far" would come long after the window: start now
    arrivals.answered(["a"], now=3.0, duration=0.04)
    arrivals.forget("a")  # its session closed
    assert arrivals.hold(now=3.001) == 0
    arrivals.answered(["b"], now=4.0, duration=1.0)
    assert arrivals.hold(now=4.0) == pytest.approx(0.05)  # never more than max_hold
    assert arrivals.hold(now=4.06) == 0  # b did not come: the window is over
