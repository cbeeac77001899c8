"""The compute executor: one thread per device; inference first, then jobs by priority.

Two kinds of work reach the thread. Inference steps wait in *sources* (a handler's
:class:`server.batching.StepBatcher`), which the thread asks for a whole batch whenever it is free:
every step waiting then runs in one forward, so steps of concurrent sessions batch as they arrive
(continuous batching) and always go before queued jobs. Jobs (forward and backward passes, the
throughput probe) queue by priority and run one at a time when no source has steps waiting; a
running job is never interrupted, so a decode step waits at most for one job. Torch releases the
GIL inside kernels, so the event loop keeps serving I/O meanwhile.

Small work skips the thread: when nothing runs and a kind of work has been taking less than
``inline_max_s`` (measured, per kind), it runs right in the event loop. Handing a 0.3 ms step to a
thread and back costs ~0.1-0.2 ms of wake-ups, a large share of per-token latency for small
spans; work that grows slower than the limit goes back to the thread, so the loop is never held
for long. A kind's cost is the median of its last three durations: on a busy machine one run that
was preempted midway must not send every later run of its kind through the thread (where GIL
hand-offs make them look slow in turn), while work that really grew crosses the limit after two.
One lock keeps compute to one run at a time, in the loop or on the thread.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import threading
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)

PRIORITY_FORWARD = 1
PRIORITY_BACKWARD = 2


class Source(Protocol):
    """Inference work the thread pulls (see :class:`server.batching.StepBatcher`)."""

    def ready(self) -> bool:
        """Some step waits (called on any thread)."""
        ...

    def run_next(self, inline: bool) -> None:
        """Runs one batch of the waiting steps and delivers its results (holding the compute lock)."""
        ...


class ComputeExecutor:
    def __init__(self, name: str = "swarm-compute", num_threads: int | None = None, inline_max_s: float = 0.002):
        self._cond = threading.Condition()
        self._jobs: list[tuple[int, int, Any]] = []  # a heap of (priority, order, job)
        self._sources: list[Source] = []
        self._stopping = False
        self._compute = threading.Lock()  # held by whatever computes: the thread or an inline run
        self._counter = itertools.count()
        self._num_threads = num_threads
        self._busy = 0  # jobs queued or running on the thread (counted on the event loop)
        self._inline_max_s = inline_max_s
        self._durations: dict[str, collections.deque[float]] = {}  # each kind's last durations
        if num_threads is not None:
            import torch

            torch.set_num_threads(num_threads)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    source = next((s for s in self._sources if s.ready()), None)
                    if source is not None or self._jobs:
                        break
                    self._cond.wait()
                job = heapq.heappop(self._jobs)[2] if source is None else None
            with self._compute:
                if source is None:
                    self._run_job(job)
                    continue
                try:
                    source.run_next(inline=False)
                except Exception:  # a source delivers its own errors; this is a bug in it, and the thread lives on
                    logger.exception("running a batch of inference steps failed")

    def _run_job(self, job: Any) -> None:
        fn, args, loop, future, kind = job
        if future.cancelled():
            loop.call_soon_threadsafe(self._done, kind, None)
            return
        start = time.perf_counter()
        try:
            result = fn(*args)
        except BaseException as e:  # delivered to the awaiting coroutine, never lost
            loop.call_soon_threadsafe(_set_exception, future, e)
        else:
            loop.call_soon_threadsafe(_set_result, future, result)
        loop.call_soon_threadsafe(self._done, kind, time.perf_counter() - start)

    def _done(self, kind: str, duration: float | None) -> None:
        self._busy -= 1
        if duration is not None:
            self.record(kind, duration)

    # ---------------------------------------------------------------- costs (event loop only)

    def record(self, kind: str, duration: float) -> None:
        self._durations.setdefault(kind, collections.deque(maxlen=3)).append(duration)

    def _cost(self, kind: str) -> float:
        """The median of the kind's last (up to three) durations; infinite for a kind never run."""
        recent = self._durations.get(kind)
        if not recent:
            return float("inf")
        return sorted(recent)[len(recent) // 2]

    def cheap(self, kind: str) -> bool:
        """Work of ``kind`` may run inline: nothing is queued and it has been taking under the limit."""
        return self._busy == 0 and self._cost(kind) < self._inline_max_s

    # ---------------------------------------------------------------- sources

    def add_source(self, source: Source) -> None:
        with self._cond:
            self._sources.append(source)

    def remove_source(self, source: Source) -> None:
        with self._cond:
            if source in self._sources:
                self._sources.remove(source)

    def wake(self) -> None:
        """A source has steps waiting: the thread takes them when it is free."""
        with self._cond:
            self._cond.notify()

    def try_inline(self, fn: Callable[[], None]) -> bool:
        """Runs ``fn`` in the calling (event loop) thread if nothing computes now; False if something does."""
        if not self._compute.acquire(blocking=False):
            return False
        try:
            fn()
        finally:
            self._compute.release()
        return True

    # ---------------------------------------------------------------- jobs

    async def run(self, priority: int, fn: Callable[..., T], *args: Any, kind: str = "") -> T:
        """Runs ``fn(*args)``; ``kind`` groups jobs of similar cost (e.g. ``"forward"``) for the inline rule."""
        if self.cheap(kind) and self._compute.acquire(blocking=False):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self._compute.release()
                self.record(kind, time.perf_counter() - start)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._busy += 1
        with self._cond:
            heapq.heappush(self._jobs, (priority, next(self._counter), (fn, args, loop, future, kind)))
            self._cond.notify()
        return await future

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
