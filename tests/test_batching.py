"""Batched steps over the paged cache equal each session's step alone (in process, no peers).

The reference is the span run one session at a time over transformers' own ``DynamicCache``, with
the session's LoRA adapter (``swarm.lora.applied``), deep prompts, padding, beam reorders and
rollbacks. Tolerance: float32, hidden states within 1e-5 (measured: at most 2.4e-7 on the tiny
Llama; rows of different lengths run at another shape than alone, so the batched matmuls and the
padded attention may round differently, never by more). bfloat16: within 1e-2 of the largest output
(measured 2.9e-3: one bfloat16 rounding step).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch

from server.batching import Part, StepBatcher, run_rows
from server.compute import ComputeExecutor
from server.handler import HandlerLimits, SpanHandler
from server.handler import Session as HandlerSession
from server.kv_cache import PagedKV, PagePool, SessionCache
from server.loading import load_span
from swarm.errors import ServerBusy
from swarm.lora import AppliedLora, applied
from swarm.models import load_config
from swarm.weights import Checkpoint
from swarm.wire import InferenceStep, StepOutput, encode, expect, read_message

TOL = 1e-5
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def span(tiny_llama):
    return load_span(Checkpoint(tiny_llama), load_config(tiny_llama), 0, 4, torch.float32, CPU)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclasses.dataclass
class Session:
    """A session as the batcher sees it, with its reference run alone over a DynamicCache."""

    span: object
    cache: SessionCache
    reference: object
    start: int = 0
    end: int = 4
    lora: AppliedLora | None = None
    prompts: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None  # the reference's padding mask

    def alone(self, hidden, position, hypo_ids=None, mask=None, position_ids=None) -> torch.Tensor:
        if position < self.reference.get_seq_length():
            self.reference.crop(position - self.reference.get_seq_length())
            self.key_mask = None if self.key_mask is None else self.key_mask[:, :position]
        if hypo_ids is not None:
            self.reference.reorder_cache(hypo_ids)
            self.key_mask = None if self.key_mask is None else self.key_mask[hypo_ids]
        if mask is not None or self.key_mask is not None:
            kept = self.key_mask if self.key_mask is not None else torch.ones(hidden.shape[0], position, dtype=torch.bool)
            own = torch.ones(hidden.shape[:2], dtype=torch.bool) if mask is None else mask
            self.key_mask = torch.cat([kept, own], dim=1)
        with torch.no_grad(), applied(self.lora):
            return self.span(hidden, self.reference, position, prompts=self.prompts, key_mask=self.key_mask,
                             position_ids=position_ids)

    def part(self, hidden, position, **fields) -> Part:
        return Part(self.cache, hidden, position, lora=self.lora, prompts=self.prompts, **fields)


def _open(span, pool: PagePool, batch: int, **fields) -> Session:
    return Session(span, SessionCache(pool, batch), span.new_cache(), **fields)


def _lora(span, seed: int) -> AppliedLora:
    attn = span.blocks[1].self_attn
    return AppliedLora([(attn.q_proj, _randn(4, 64, seed=seed) * 0.1, _randn(64, 4, seed=seed + 1) * 0.1),
                        (attn.v_proj, _randn(4, 64, seed=seed + 2) * 0.1, _randn(32, 4, seed=seed + 3) * 0.1)], 2.0)


def test_sessions_at_different_lengths_and_batch_sizes_batch_exactly(span):
    pool = PagePool(4096, 4, 8)
    kv = PagedKV(pool, 0, 4, CPU)
    sizes, prompts = (1, 2, 1, 3), (5, 17, 1, 9)
    sessions = [_open(span, pool, b) for b in sizes]
    inputs = [_randn(b, 40, 64, seed=i) for i, b in enumerate(sizes)]
    worst = 0.0
    for session, x, n in zip(sessions, inputs, prompts):  # prefills alone
        (out,) = run_rows(span, kv, [session.part(x[:, :n], 0)], 0, 4, torch.float32)
        worst = max(worst, (out - session.alone(x[:, :n], 0)).abs().max().item())
    for t in range(6):  # decode steps, batched; inputs are indexed by position
        if t == 3:  # a session joins, with its own prefill
            sessions.append(_open(span, pool, 2))
            inputs.append(_randn(2, 20, 64, seed=9))
            run_rows(span, kv, [sessions[-1].part(inputs[-1][:, :12], 0)], 0, 4, torch.float32)
            sessions[-1].alone(inputs[-1][:, :12], 0)
        if t == 4:  # the 2-row session leaves: its pages go back
            used = pool.used
            sessions[1].cache.close()
            assert pool.used == used - 2 * 2
            del sessions[1], inputs[1]
        positions = [s.cache.length for s in sessions]
        steps = [x[:, p:p + 1] for x, p in zip(inputs, positions)]
        outs = run_rows(span, kv, [s.part(h, p) for s, h, p in zip(sessions, steps, positions)], 0, 4, torch.float32)
        for session, out, h, p in zip(sessions, outs, steps, positions):
            worst = max(worst, (out - session.alone(h, p)).abs().max().item())
    assert worst <= TOL, worst
    assert [s.cache.length for s in sessions] == [5 + 6, 1 + 6, 9 + 6, 12 + 3]


def test_bfloat16_sessions_batch_within_one_rounding_of_alone(tiny_llama):
    # bfloat16 (a server's usual --dtype): batched rows round differently from one row alone; measured at most
    # 7.8e-3 on outputs of magnitude ~2.2 (one bfloat16 step at that size, 2.9e-3 of the largest output)
    span16 = load_span(Checkpoint(tiny_llama), load_config(tiny_llama), 0, 4, torch.bfloat16, CPU)
    pool = PagePool(4096, 4, 8)
    kv = PagedKV(pool, 0, 4, CPU)
    prefills = (5, 17, 1, 9, 30)
    sessions = [_open(span16, pool, 1) for _ in prefills]
    inputs = [_randn(1, 40, 64, seed=i).to(torch.bfloat16) for i in range(len(prefills))]
    worst = 0.0
    for session, x, n in zip(sessions, inputs, prefills):
        (out,) = run_rows(span16, kv, [session.part(x[:, :n], 0)], 0, 4, torch.bfloat16)
        assert out.dtype == torch.bfloat16
        worst = max(worst, ((out - session.alone(x[:, :n], 0)).abs().max() / out.abs().max()).item())
    for _ in range(6):
        positions = [s.cache.length for s in sessions]
        steps = [x[:, p:p + 1] for x, p in zip(inputs, positions)]
        outs = run_rows(span16, kv, [s.part(h, p) for s, h, p in zip(sessions, steps, positions)], 0, 4,
                        torch.bfloat16)
        for session, out, h, p in zip(sessions, outs, steps, positions):
            worst = max(worst, ((out - session.alone(h, p)).abs().max() / out.abs().max()).item())
    assert worst <= 1e-2, worst


def test_a_session_that_cannot_grow_fails_alone_and_others_run(span):
    pool = PagePool(16 * 3, 4, 8)  # three pages in all
    kv = PagedKV(pool, 0, 4, CPU)
    small, big = _open(span, pool, 1), _open(span, pool, 1)
    a, b = _randn(1, 20, 64, seed=1), _randn(1, 40, 64, seed=2)
    run_rows(span, kv, [small.part(a[:, :15], 0)], 0, 4, torch.float32)  # one page
    small.alone(a[:, :15], 0)
    run_rows(span, kv, [big.part(b[:, :32], 0)], 0, 4, torch.float32)  # two pages: the pool is full
    big.alone(b[:, :32], 0)
    outs = run_rows(span, kv, [small.part(a[:, 15:16], 15), big.part(b[:, 32:33], 32)], 0, 4, torch.float32)
    assert (outs[0] - small.alone(a[:, 15:16], 15)).abs().max().item() <= TOL  # fits its page
    assert isinstance(outs[1], ServerBusy) and "KV cache is full" in str(outs[1])
    assert (big.cache.length, big.cache.table.shape[1]) == (32, 2)  # untouched: it may retry later
    small.cache.close()
    pool.collect()  # what the batcher does before each batch
    (out,) = run_rows(span, kv, [big.part(b[:, 32:33], 32)], 0, 4, torch.float32)
    assert (out - big.alone(b[:, 32:33], 32)).abs().max().item() <= TOL


def test_lora_prompts_padding_beams_and_rollbacks_in_one_batch(span):
    pool = PagePool(4096, 4, 8)
    kv = PagedKV(pool, 0, 4, CPU)
    shared = _lora(span, seed=10)  # two sessions with the same (preloaded) adapter, one with its own
    sessions = [_open(span, pool, 1, lora=shared), _open(span, pool, 2, lora=shared), _open(span, pool, 1),
                _open(span, pool, 3, lora=_lora(span, seed=20)),
                _open(span, pool, 2, prompts=_randn(4, 1, 6, 64, seed=30))]
    inputs = [_randn(s.cache.batch, 30, 64, seed=40 + i) for i, s in enumerate(sessions)]
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :3] = False  # the prompted session is a padded batch with its own positions
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 1, 2, 9, 10]])  # not one shift: rotary sees it
    worst = 0.0

    def batch(steps):  # steps: (session, hidden, position, fields)
        nonlocal worst
        outs = run_rows(span, kv, [s.part(h, p, **f) for s, h, p, f in steps], 0, 4, torch.float32)
        for (s, h, p, f), out in zip(steps, outs):
            worst = max(worst, (out - s.alone(h, p, **f)).abs().max().item())

    # prefill all at once (same length: one batch), with the prompted one's padding
    batch([(s, x[:, :8], 0, dict(mask=mask, position_ids=positions) if s is sessions[4] else {})
           for s, x in zip(sessions, inputs)])
    beams = torch.tensor([2, 0, 0])
    for t in range(8, 12):
        batch([(s, x[:, t:t + 1], t, dict(hypo_ids=beams) if s is sessions[3] and t == 9 else
                dict(position_ids=torch.tensor([[t], [t + 3]])) if s is sessions[4] else {})
               for s, x in zip(sessions, inputs)])
    # a rollback of two tokens re-sent in a two-token step, batched with another session's
    batch([(sessions[0], inputs[0][:, 10:12], 10, {}), (sessions[2], inputs[2][:, 12:14], 12, {})])
    assert worst <= TOL, worst


def test_batcher_runs_concurrent_steps_together_and_chunks_long_prefills(span):
    async def scenario():
        executor = ComputeExecutor(num_threads=1, inline_max_s=0.0)  # every batch on the thread
        pool = PagePool(4096, 4, 8)
        batcher = StepBatcher(span, PagedKV(pool, 0, 4, CPU), executor, torch.float32, max_tokens=64)
        sizes = (1, 2, 1, 1)
        sessions = [_open(span, pool, b) for b in sizes]
        inputs = [_randn(b, 10, 64, seed=i) for i, b in enumerate(sizes)]

        def step(i: int, t: int) -> InferenceStep:
            return InferenceStep(session_id=str(i), hidden=inputs[i][:, t:t + 1], start_position=t)

        try:
            for t in range(6):
                outs = await asyncio.gather(*(batcher.run(s, step(i, t)) for i, s in enumerate(sessions)))
                for i, (session, out) in enumerate(zip(sessions, outs)):
                    assert (out - session.alone(inputs[i][:, t:t + 1], t)).abs().max().item() <= TOL
            assert batcher.rows_run == 6 * sum(sizes) and batcher.batches_run < 6 * len(sizes)

            # a 400-token prefill runs in chunks of 64; decode steps sent meanwhile do not wait for all of it
            long = _open(span, pool, 1)
            prompt = _randn(1, 400, 64, seed=7)
            order: list[str] = []

            async def prefill():
                out = await batcher.run(long, InferenceStep(session_id="long", hidden=prompt, start_position=0))
                order.append("prefill")
                return out

            async def decode():
                await asyncio.sleep(0)  # sent after the prefill
                outs = await asyncio.gather(*(batcher.run(s, step(i, 6)) for i, s in enumerate(sessions)))
                order.append("decode")
                return outs

            out, outs = await asyncio.gather(prefill(), decode())
            assert order == ["decode", "prefill"]
            assert (out - long.alone(prompt, 0)).abs().max().item() <= TOL
            for i, (session, o) in enumerate(zip(sessions, outs)):
                assert (o - session.alone(inputs[i][:, 6:7], 6)).abs().max().item() <= TOL
        finally:
            batcher.close()
            executor.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 60))


class _Writer:
    """A session's stream as the handler writes to it: keeps the frames."""

    def __init__(self):
        self.data = bytearray()

    def write(self, data) -> None:
        self.data += data

    def writelines(self, parts) -> None:
        for part in parts:
            self.data += part

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def outputs(self) -> list[torch.Tensor]:
        reader = asyncio.StreamReader()
        reader.feed_data(bytes(self.data))
        reader.feed_eof()
        found = []
        while not reader.at_eof():
            found.append(expect(await read_message(reader), StepOutput).hidden)
        return found


def test_pushed_steps_of_concurrent_sessions_batch(span):
    """The previous server pushes every session's steps through one stream; they still share a forward."""
    from server.quotas import StreamSlot
    from swarm.push_tokens import new_push_key, push_token

    KEY = new_push_key()
    async def scenario():
        executor = ComputeExecutor(num_threads=1)
        pool = PagePool(4096, 4, 8)
        handler = SpanHandler(span, model_name="tiny", dtype=torch.float32, device=CPU, pool=pool,
                              limits=HandlerLimits(256, 8, 4096, 60.0), executor=executor)
        sizes, prefills = (1, 2, 1), (3, 5, 7)
        inputs = [_randn(b, 12, 64, seed=50 + i) for i, b in enumerate(sizes)]
        references = [_open(span, PagePool(4096, 4, 8), b) for b in sizes]
        writers = [_Writer() for _ in sizes]
        for i, (b, writer) in enumerate(zip(sizes, writers)):
            handler.sessions[str(i)] = HandlerSession(str(i), 0, 4, 256, b, SessionCache(pool, b), writer,
                                                      push_key=KEY)

        async def push(steps: list[InferenceStep]) -> None:
            reader = asyncio.StreamReader()
            for step in steps:  # each with the token its client gave the pushing server
                step = dataclasses.replace(step, push_token=push_token(KEY, "pusher", step.step_id, step.start_position,
                                                                       step.hidden.shape[1], None))
                reader.feed_data(b"".join(bytes(part) for part in encode(step)))
            reader.feed_eof()
            with pytest.raises(EOFError):
                await handler._handle_push(StreamSlot("pusher", None), reader, None)
            if handler._streams:  # the pushed steps still running
                await asyncio.wait(list(handler._streams), timeout=30)

        try:
            # prefills (of different lengths: separate forwards), then two one-token steps of every session
            await push([InferenceStep(session_id=str(i), hidden=x[:, :n], start_position=0, step_id=1)
                        for i, (x, n) in enumerate(zip(inputs, prefills))])
            before = handler.batcher.batches_run
            for t in range(2):
                await push([InferenceStep(session_id=str(i), hidden=x[:, n + t:n + t + 1], start_position=n + t,
                                          step_id=2 + t) for i, (x, n) in enumerate(zip(inputs, prefills))])
            assert handler.batcher.batches_run - before == 2  # one forward for the three sessions, per step
            for i, (x, n) in enumerate(zip(inputs, prefills)):
                expected = [references[i].alone(x[:, :n], 0)] + [references[i].alone(x[:, n + t:n + t + 1], n + t)
                                                                   for t in range(2)]
                got = await writers[i].outputs()
                assert len(got) == 3
                for g, e in zip(got, expected):
                    assert (g - e).abs().max().item() <= TOL
        finally:
            await handler.close_all()
            executor.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_executor_runs_waiting_inference_before_queued_jobs():
    """A forward queued behind a running job waits for the inference batch that came after it."""
    import threading

    from server.compute import PRIORITY_FORWARD

    order: list[str] = []
    release = threading.Event()

    class Source:
        waiting = False

        def ready(self) -> bool:
            return self.waiting

        def run_next(self, inline: bool) -> None:
            self.waiting = False
            order.append("inference")

    async def scenario():
        executor = ComputeExecutor(num_threads=1, inline_max_s=0.0)
        source = Source()
        executor.add_source(source)
        try:
            running = asyncio.ensure_future(executor.run(PRIORITY_FORWARD, lambda: release.wait(10) and
                                                         order.append("first job"), kind="forward"))
            await asyncio.sleep(0.05)  # the thread is busy with it
            queued = asyncio.ensure_future(executor.run(PRIORITY_FORWARD, lambda: order.append("queued job"),
                                                        kind="forward"))
            await asyncio.sleep(0.01)
            source.waiting = True
            executor.wake()
            release.set()
            await asyncio.gather(running, queued)
        finally:
            executor.shutdown()
        assert order == ["first job", "inference", "queued job"]

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_step_held_for_a_session_that_never_comes_back_still_runs(span, monkeypatch):
    """After each batch the next one waits briefly for that batch's sessions; one that stops sending must
    not keep a step that arrived meanwhile waiting for ever."""
    import server.batching

    real = server.batching.run_rows

    def slow(*args, **kwargs):  # a batch long enough for another step to arrive while it runs
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(server.batching, "run_rows", slow)

    async def scenario():
        executor = ComputeExecutor(num_threads=1, inline_max_s=0.0)
        pool = PagePool(4096, 4, 8)
        batcher = StepBatcher(span, PagedKV(pool, 0, 4, CPU), executor, torch.float32, max_tokens=64)
        a, b = _open(span, pool, 1), _open(span, pool, 1)
        x = _randn(1, 8, 64, seed=3)

        def step(t: int) -> InferenceStep:
            return InferenceStep(session_id="", hidden=x[:, t:t + 1], start_position=t)

        try:
            for t in range(3):  # a's turnaround is known: the next batch would wait for it
                await batcher.run(a, step(t))
            last = asyncio.ensure_future(batcher.run(a, step(3)))  # a's last step
            await asyncio.sleep(0.01)
            await asyncio.wait_for(asyncio.gather(last, batcher.run(b, step(0))), 5)
        finally:
            batcher.close()
            executor.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_beam_step_pushed_and_then_sent_by_the_client_reorders_once(span):
    """After a hedge the client sends a span its own copy of a beam step that the slow server before it may
    have pushed here already (same position, same ``hypo_ids``, a newer step id). The rows move once: the
    outputs, the cache and the outputs a session without echo keeps equal one reorder."""
    from server.quotas import StreamSlot
    from swarm.push_tokens import new_push_key, push_token

    key, beams = new_push_key(), torch.tensor([2, 0, 0])

    async def scenario():
        executor = ComputeExecutor(num_threads=1)
        pool = PagePool(4096, 4, 8)
        handler = SpanHandler(span, model_name="tiny", dtype=torch.float32, device=CPU, pool=pool,
                              limits=HandlerLimits(256, 8, 4096, 60.0), executor=executor)
        writer, reference = _Writer(), _open(span, PagePool(4096, 4, 8), 3)
        session = handler.sessions["s"] = HandlerSession("s", 0, 4, 256, 3, SessionCache(pool, 3), writer,
                                                         push_key=key, echo=False)
        x = _randn(3, 8, 64, seed=60)

        def step(t: int, n: int, step_id: int, hypo_ids=None) -> InferenceStep:
            return InferenceStep(session_id="s", hidden=x[:, t:t + n], start_position=t, step_id=step_id,
                                 hypo_ids=hypo_ids)

        async def push(msg: InferenceStep) -> None:
            token = push_token(key, "pusher", msg.step_id, msg.start_position, msg.hidden.shape[1], msg.hypo_ids)
            reader = asyncio.StreamReader()
            reader.feed_data(b"".join(bytes(part) for part in encode(dataclasses.replace(msg, push_token=token))))
            reader.feed_eof()
            with pytest.raises(EOFError):
                await handler._handle_push(StreamSlot("pusher", None), reader, None)
            await asyncio.wait(list(handler._streams), timeout=30)

        try:
            await handler._process_step(session, step(0, 5, 1))
            await handler._process_step(session, step(5, 1, 2))
            await push(step(6, 1, 3, beams))  # the slow server pushed the step on after all
            await handler._process_step(session, step(6, 1, 4, beams))  # and the client sent it too
            await handler._process_step(session, step(7, 1, 5))
            expected = [reference.alone(x[:, :5], 0), reference.alone(x[:, 5:6], 5),
                        reference.alone(x[:, 6:7], 6, hypo_ids=beams)]
            expected += [expected[-1], reference.alone(x[:, 7:8], 7)]
            got = await writer.outputs()
            assert len(got) == 5
            for g, e in zip(got, expected):
                assert (g - e).abs().max().item() <= TOL
            kept = torch.cat([torch.cat(expected[:2], dim=1)[beams], expected[2], expected[4]], dim=1)
            assert (session.outputs - kept).abs().max().item() <= TOL
        finally:
            await handler.close_all()
            executor.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 60))
