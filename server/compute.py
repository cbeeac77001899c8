"""The compute executor: one thread per device, fed by a priority queue.

Inference steps go before forward passes, so a long forward never stalls token generation for
long. Torch releases the GIL inside kernels, so the event loop keeps serving I/O meanwhile.

Small jobs skip the thread: when the executor is idle and a kind of job has been taking less than
``inline_max_s`` (measured, per kind), it runs right in the event loop. Handing a 0.3 ms step to a
thread and back costs ~0.1-0.2 ms of wake-ups, a large share of per-token latency for small
spans; a job that grows slower than the limit goes back to the thread, so the loop is never held
for long. A kind's cost is the median of its last three durations: on a busy machine one step that
was preempted midway must not send every later step of its kind through the thread (where GIL
hand-offs make them look slow in turn), while a job that really grew crosses the limit after two.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

PRIORITY_INFERENCE = 0
PRIORITY_FORWARD = 1
PRIORITY_BACKWARD = 2


class ComputeExecutor:
    def __init__(self, name: str = "swarm-compute", num_threads: int | None = None, inline_max_s: float = 0.002):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._counter = itertools.count()
        self._num_threads = num_threads
        self._busy = 0  # jobs queued or running on the thread
        self._inline_max_s = inline_max_s
        self._durations: dict[str, collections.deque[float]] = {}  # each kind's last durations
        if num_threads is not None:
            import torch

            torch.set_num_threads(num_threads)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            _priority, _order, job = self._queue.get()
            if job is None:
                return
            fn, args, loop, future, kind = job
            if future.cancelled():
                loop.call_soon_threadsafe(self._done, kind, None)
                continue
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
            self._record(kind, duration)

    def _record(self, kind: str, duration: float) -> None:
        self._durations.setdefault(kind, collections.deque(maxlen=3)).append(duration)

    def _cost(self, kind: str) -> float:
        """The median of the kind's last (up to three) durations; infinite for a kind never run."""
        recent = self._durations.get(kind)
        if not recent:
            return float("inf")
        return sorted(recent)[len(recent) // 2]

    async def run(self, priority: int, fn: Callable[..., T], *args: Any, kind: str = "") -> T:
        """Runs ``fn(*args)``; ``kind`` groups jobs of similar cost (e.g. ``"step:1"``) for the inline rule."""
        if self._busy == 0 and self._cost(kind) < self._inline_max_s:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self._record(kind, time.perf_counter() - start)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._busy += 1
        self._queue.put((priority, next(self._counter), (fn, args, loop, future, kind)))
        return await future

    def shutdown(self) -> None:
        self._queue.put((-1, -1, None))
        self._thread.join(timeout=30)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
