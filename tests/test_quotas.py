"""Per-peer shares of a server, what a session is charged, and long forwards in chunks (in process).

Quotas and charging are pure bookkeeping (milliseconds). The chunked forward runs the tiny Llama
block by block in chunks of tokens and must equal the single pass: float32, within 1e-5 (measured
at most 2.4e-7; chunks attend to cached keys in other matmul shapes, which round differently).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.chunked_forward import chunk_length, chunked_forward
from server.compute import ComputeExecutor
from server.kv_cache import PagePool, SessionCache
from server.loading import load_span
from server.quotas import QuotaLimits, Quotas
from server.streams import ClientGone, until_gone
from swarm.errors import BadRequest, ServerBusy
from swarm.lora import AppliedLora
from swarm.models import load_config
from swarm.weights import Checkpoint

TOL = 1e-5
CPU = torch.device("cpu")


def test_each_peer_gets_its_share_of_streams_sessions_and_jobs():
    quotas = Quotas(QuotaLimits(streams_per_peer=2, sessions_per_peer=1, jobs_per_peer=1, max_streams=100), 10)
    a1, _ = quotas.open_stream("A", "a1")
    quotas.open_stream("A", "a2")
    with pytest.raises(ServerBusy, match="peer A has 2 streams open here.*--max-streams-per-peer 2"):
        quotas.open_stream("A", "a3")
    quotas.open_stream("B", "b1")  # another peer is not affected
    quotas.close_stream(a1)
    quotas.close_stream(a1)  # closing twice changes nothing
    quotas.open_stream("A", "a3")
    quotas.open_session("A")
    with pytest.raises(ServerBusy, match="--max-sessions-per-peer 1"):
        quotas.open_session("A")
    quotas.open_session("B")
    quotas.close_session("A")
    quotas.open_session("A")
    quotas.start_job("A")
    with pytest.raises(ServerBusy, match="--max-jobs-per-peer 1"):
        quotas.start_job("A")
    quotas.end_job("A")
    quotas.start_job("A")


def test_when_all_streams_are_taken_the_idlest_makes_room_unless_all_are_busy():
    quotas = Quotas(QuotaLimits(max_streams=2), 10)
    old, _ = quotas.open_stream("A", "old", now=0.0)
    quotas.open_stream("B", "new", now=5.0)
    slot, evicted = quotas.open_stream("C", "c", now=5.5)
    assert evicted is old and quotas.open_streams == 2  # idle 5.5 s: closed for the newcomer
    with pytest.raises(ServerBusy, match="all are busy"):
        quotas.open_stream("D", "d", now=5.6)  # every open stream did something within the last second
    slot.touch()


def test_a_sessions_pages_count_against_its_peer_and_everything_it_holds_is_charged():
    pool = PagePool(cache_tokens=16 * 10, num_blocks=2, bytes_per_token_block=8, page_tokens=16)
    quotas = Quotas(QuotaLimits(cache_share=0.5), pool.capacity)  # 5 pages per peer
    first = SessionCache(pool, batch=1, account=quotas.account("A"))
    first.grow(16 * 3)
    second = SessionCache(pool, batch=1, account=quotas.account("A"))
    with pytest.raises(ServerBusy, match="peer A's sessions hold 3 pages.*need 3 more; one peer may hold 5"):
        second.grow(16 * 3)
    assert quotas.pages_of("A") == 3 and pool.used == 3  # refused: nothing taken from the peer nor the pool
    other = SessionCache(pool, batch=1, account=quotas.account("B"))
    other.charge(pool.page_bytes + 1, "deep prompts")  # a page and a byte: two pages, from the top
    assert other.charged == [10, 9] and quotas.pages_of("B") == 2 and pool.top < 9  # storage need not grow
    with pytest.raises(ServerBusy, match="LoRA weights"):
        other.charge(4 * pool.page_bytes, "LoRA weights")  # B may hold 5 pages
    first.crop(0)
    assert quotas.pages_of("A") == 0 and pool.used == 2
    other.close()
    first.close()
    pool.collect()
    assert pool.used == 0 and quotas.pages_of("B") == 0


def test_until_gone_cancels_the_work_of_a_client_that_left():
    async def scenario():
        reader = asyncio.StreamReader()
        cancelled = asyncio.Event()

        async def work():
            try:
                await asyncio.sleep(30)
            finally:
                cancelled.set()

        reader.feed_eof()  # the client closed its stream
        with pytest.raises(ClientGone):
            await until_gone(reader, work())
        assert cancelled.is_set()
        talkative = asyncio.StreamReader()
        talkative.feed_data(b"x")
        with pytest.raises(BadRequest, match="one request"):
            await until_gone(talkative, asyncio.sleep(30))
        quiet = asyncio.StreamReader()
        assert await until_gone(quiet, asyncio.sleep(0, result=7)) == 7

    asyncio.run(asyncio.wait_for(scenario(), 10))


@pytest.fixture(scope="module")
def span(tiny_llama):
    return load_span(Checkpoint(tiny_llama), load_config(tiny_llama), 0, 4, torch.float32, CPU)


def test_a_chunked_forward_equals_the_single_pass(span):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 64, generator=gen)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, :5] = False  # left padding
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    prompts = torch.randn(3, 1, 4, 64, generator=gen)
    module = span.blocks[1].self_attn.q_proj
    lora = AppliedLora([(module, torch.randn(4, 64, generator=gen) * 0.1, torch.randn(64, 4, generator=gen) * 0.1)],
                       scaling=2.0)
    assert chunk_length(2, 37, 16) == 8 and chunk_length(2, 37, 4096) == 37 and chunk_length(64, 5, 16) == 1
    from swarm.lora import applied

    with torch.inference_mode(), applied(lora):
        expected = span(hidden, None, 0, 1, 4, prompts=prompts, key_mask=mask, position_ids=positions)

    async def chunked():
        executor = ComputeExecutor(num_threads=1, inline_max_s=0.0)
        try:
            return await chunked_forward(executor, span, hidden, 1, 4, prompts, lora, (mask, positions), 8, CPU,
                                         torch.float32)
        finally:
            executor.shutdown()

    out = asyncio.run(asyncio.wait_for(chunked(), 60))
    assert out.shape == expected.shape
    assert (out - expected)[mask].abs().max() < TOL  # padding rows' outputs are never read
