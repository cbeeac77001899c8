"""Continuous batching: concurrent sessions' steps over the same blocks run as one forward.

A handler gives each checked step to :meth:`StepBatcher.run` and awaits its output. Steps wait in
the batcher until the compute executor is free (:mod:`server.compute`); then the scheduler
(:mod:`server.scheduler`) picks the oldest step and every waiting step that can share its forward,
:func:`run_rows` runs them as one ``[rows, new tokens, hidden]`` batch over the sessions' own pages
(:mod:`server.kv_cache`), and each session gets its rows back. Sessions stay independent: each
keeps its cache, adapter and deep prompts, joins and leaves at any step, and one that cannot get
pages fails alone (``ServerBusy``) while the rest of its batch runs.

Rows of different lengths: every row's keys are gathered left-padded to the longest, with a padding
mask, and its own positions, which is a left-padded batch as transformers runs it (``Span.step``).
The results equal each session's step alone up to float rounding of the batched matmuls
(``tests/test_batching.py`` states the tolerance).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from typing import Any, Protocol

import torch

from swarm.blocks import RowPrompts, Span
from swarm.errors import ServerBusy, SwarmError
from swarm.lora import AppliedLora, applied_to_rows
from swarm.wire import InferenceStep

from server import faults
from server.compute import ComputeExecutor
from server.kv_cache import PagedKV, SessionCache
from server.scheduler import Arrivals, Ticket, chunk_length, next_batch


class StepSession(Protocol):
    """What the batcher reads of a handler's session."""

    start: int
    end: int
    cache: SessionCache
    lora: AppliedLora | None
    prompts: torch.Tensor | None  # [blocks, batch or 1, prompt tokens, hidden]


@dataclasses.dataclass
class Part:
    """One session's rows in a batched forward: ``hidden`` [batch, new, hidden] at ``start_position``."""

    cache: SessionCache
    hidden: torch.Tensor
    start_position: int
    hypo_ids: torch.Tensor | None = None  # [batch]: reorder the cached rows first (beam search)
    mask: torch.Tensor | None = None  # [batch, new] bool, False for padding
    position_ids: torch.Tensor | None = None  # [batch, new]
    lora: AppliedLora | None = None
    prompts: torch.Tensor | None = None


@torch.inference_mode()
def run_rows(span: Span, kv: PagedKV, parts: list[Part], start: int, end: int,
             dtype: torch.dtype) -> list[torch.Tensor | SwarmError]:
    """Runs blocks ``start:end`` over every part's rows in one forward; returns each part's output
    ([batch, new, hidden], on the CPU) or the error that part alone got (ServerBusy: no pages left).
    Every part has the same number of new tokens."""
    faults.check("inference")
    results: list[torch.Tensor | SwarmError] = [ServerBusy("not run")] * len(parts)
    running = []
    for i, part in enumerate(parts):
        cache, end_position = part.cache, part.start_position + part.hidden.shape[1]
        try:
            cache.grow(end_position)  # all or nothing: a session that cannot grow is left as it was
        except ServerBusy as e:
            results[i] = e
            continue
        if part.start_position < cache.length:
            cache.crop(part.start_position, keep=end_position)
        if part.hypo_ids is not None:
            kv.reorder(cache, part.hypo_ids)
        running.append(i)
    if not running:
        return results
    batch = [parts[i] for i in running]
    new = batch[0].hidden.shape[1]
    sizes = [part.hidden.shape[0] for part in batch]
    lengths = [part.start_position + new for part in batch]
    keys, rows, page = max(lengths), sum(sizes), kv.pool.page_tokens
    slices = [slice(a - size, a) for a, size in zip(itertools.accumulate(sizes), sizes)]
    row_lengths = torch.tensor(lengths).repeat_interleave(torch.tensor(sizes))  # [rows]
    index = torch.arange(keys) - (keys - row_lengths)[:, None]  # [rows, keys]: each key's position in its row
    key_mask = index >= 0  # left padding
    index = index.clamp(min=0)  # padding reads the row's first key (finite, masked)
    table = torch.zeros(rows, max(part.cache.table.shape[1] for part in batch), dtype=torch.int64)
    position_ids = index[:, keys - new:].clone()  # [rows, new]: by default each row counts on
    loras, prompts = [], []
    for part, length, here in zip(batch, lengths, slices):
        table[here, :part.cache.table.shape[1]] = part.cache.table
        part.cache.append_mask(part.mask, new)
        if part.cache.key_mask is not None:
            key_mask[here, keys - length:] &= part.cache.key_mask
        if part.position_ids is not None:
            position_ids[here] = part.position_ids
        if part.lora is not None:
            loras.append((here, part.lora))
        if part.prompts is not None and part.start_position < part.prompts.shape[2]:
            prompts.append(RowPrompts(here, part.prompts, part.start_position))
    read = table.gather(1, index // page) * page + index % page  # [rows, keys]: slots of every key
    write = read[:, keys - new:]  # [rows, new]: slots of the new tokens
    hidden = torch.cat([part.hidden for part in batch]).to(kv.device, dtype)
    with applied_to_rows(loras):
        out = span.step(hidden, kv.view(write, read), position_ids.to(kv.device), key_mask.to(kv.device),
                        start, end, prompts=prompts or None).cpu()
    for i, part, length, here in zip(running, batch, lengths, slices):
        part.cache.length = length
        results[i] = faults.corrupt("inference", out[here])
    return results


@dataclasses.dataclass(eq=False)
class _Waiting:
    """A step waiting in the batcher; a long one runs in several pieces."""

    session: StepSession
    step: InferenceStep
    future: asyncio.Future
    order: int
    done: int = 0  # new tokens of the step run so far
    outputs: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def piece(self, max_tokens: int) -> tuple[Ticket, int]:
        """The ticket of the next piece and its number of new tokens."""
        rows, total = self.step.hidden.shape[:2]
        new = chunk_length(rows, total - self.done, max_tokens)
        return Ticket(self.order, (self.session.start, self.session.end, new), rows * new), new

    def part(self, new: int) -> Part:
        step, done = self.step, self.done
        cut = slice(done, done + new)
        return Part(self.session.cache, step.hidden[:, cut], step.start_position + done,
                    hypo_ids=step.hypo_ids if done == 0 else None,
                    mask=None if step.attention_mask is None else step.attention_mask[:, cut],
                    position_ids=None if step.position_ids is None else step.position_ids[:, cut],
                    lora=self.session.lora, prompts=self.session.prompts)


class StepBatcher:
    """Batches the inference steps of one span's sessions (a source of :class:`ComputeExecutor`)."""

    def __init__(self, span: Span, kv: PagedKV, executor: ComputeExecutor, dtype: torch.dtype, max_tokens: int,
                 batching: bool = True):
        self.span, self.kv, self.executor, self.dtype = span, kv, executor, dtype
        self.max_tokens, self.batching = max_tokens, batching
        self._lock = threading.Lock()  # the waiting list is filled on the event loop and drained on the thread
        self._waiting: list[_Waiting] = []
        self._order = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick_pending = False
        self._arrivals = Arrivals()  # holds a batch briefly for the sessions of the last one (guarded by _lock)
        self._timer: asyncio.TimerHandle | None = None
        self.batches_run = 0  # forwards run, and the rows they held (for tests and benchmarks)
        self.rows_run = 0
        executor.add_source(self)

    def close(self) -> None:
        self.executor.remove_source(self)

    async def run(self, session: StepSession, step: InferenceStep) -> torch.Tensor:
        """The step's output ([batch, new, hidden], CPU) once it ran, batched with whatever waited with it."""
        self._loop = loop = asyncio.get_running_loop()
        waiting = _Waiting(session, step, loop.create_future(), next(self._order))
        with self._lock:
            self._waiting.append(waiting)
            self._arrivals.arrived(id(session), time.monotonic())
        self._kick_soon()
        return await waiting.future

    def forget(self, session: StepSession) -> None:
        """The session ended: no batch waits for it."""
        with self._lock:
            self._arrivals.forget(id(session))

    def _kick_soon(self) -> None:
        if not self._kick_pending:  # one loop turn later: steps read in the same turn join the batch
            self._kick_pending = True
            self._loop.call_soon(self._kick)

    def _kick(self) -> None:
        self._kick_pending = False
        with self._lock:
            hold = self._arrivals.hold(time.monotonic()) if self._waiting else 0.0
        if hold > 0:  # the last batch's sessions are about to send their steps: start when they have
            if self._timer is None or self._timer.when() > self._loop.time() + hold:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = self._loop.call_later(hold, self._timed_kick)
            return
        plan = self._plan(take=False)
        if not plan:
            return
        kind = f"batch:{sum(t.tokens for t, _, _ in plan)}:{plan[0][0].group[1] - plan[0][0].group[0]}"
        if self.executor.cheap(kind) and self.executor.try_inline(lambda: self.run_next(inline=True)):
            if self._waiting:  # a long step's next piece, or steps that came meanwhile
                self._kick_soon()
            return
        self.executor.wake()

    def _timed_kick(self) -> None:
        self._timer = None
        self._kick()

    def ready(self) -> bool:
        """Steps wait and none of the last batch's sessions is about to join them."""
        if not self._waiting:
            return False
        with self._lock:
            return self._arrivals.hold(time.monotonic()) == 0

    def _plan(self, take: bool) -> list[tuple[Ticket, int, _Waiting]]:
        with self._lock:
            self._waiting = [w for w in self._waiting if not w.future.done()]  # the client went away
            pieces = [(*w.piece(self.max_tokens), w) for w in self._waiting]
            chosen = [pieces[i] for i in next_batch([t for t, _, _ in pieces], self.max_tokens, self.batching)]
            if take:
                taken = {id(w) for _, _, w in chosen}
                self._waiting = [w for w in self._waiting if id(w) not in taken]
            return chosen

    def run_next(self, inline: bool) -> None:
        """Runs the next batch (holding the executor's compute lock) and hands each step its rows."""
        self.kv.release_if_unused()
        plan = self._plan(take=True)
        if not plan:
            return
        plan.sort(key=lambda piece: _adapter(piece[2].session))  # rows of one adapter side by side: one product
        session = plan[0][2].session
        begin = time.perf_counter()
        parts: list[Part] = []
        try:
            parts = [w.part(new) for _, new, w in plan]
            results: list[Any] = run_rows(self.span, self.kv, parts, session.start, session.end, self.dtype)
        except Exception as e:  # a bug or out of memory: each step gets it (the handler logs it, the session ends)
            results = [e] * len(plan)
        duration = time.perf_counter() - begin
        self.batches_run += 1
        self.rows_run += sum(part.hidden.shape[0] for part in parts)
        finished, answered = [], []
        with self._lock:
            for (_, new, waiting), result in zip(plan, results):
                if isinstance(result, torch.Tensor):
                    waiting.outputs.append(result)
                    waiting.done += new
                    if waiting.done < waiting.step.hidden.shape[1]:  # the next piece queues anew
                        waiting.order = next(self._order)
                        self._waiting.append(waiting)
                        continue
                    result = result if len(waiting.outputs) == 1 else torch.cat(waiting.outputs, dim=1)
                finished.append((waiting.future, result))
                answered.append(id(waiting.session))
            self._arrivals.answered(answered, time.monotonic(), duration)
        kind = f"batch:{sum(t.tokens for t, _, _ in plan)}:{session.end - session.start}"
        if inline:
            _deliver(finished)
            self.executor.record(kind, duration)
        else:
            self._loop.call_soon_threadsafe(_deliver, finished)
            self._loop.call_soon_threadsafe(self.executor.record, kind, duration)
            # steps that came meanwhile may now be held for this batch's sessions: someone must end the hold
            self._loop.call_soon_threadsafe(self._kick_soon)

    def release_memory(self) -> None:
        """Frees the cache memory if no session holds a page (runs like a batch, never during one)."""
        self.executor.try_inline(self.kv.release_if_unused)


def _adapter(session: StepSession) -> int:
    """Sessions with the same adapter weights (a preloaded one) have the same key; 0 without one."""
    lora = session.lora
    return id(lora.modules[0][1]) if lora is not None and lora.modules else 0


def _deliver(finished: list[tuple[asyncio.Future, Any]]) -> None:
    for future, result in finished:
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
