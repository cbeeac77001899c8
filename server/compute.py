"""The compute executor: one thread per device, fed by a priority queue.

Inference steps go before forward passes, so a long forward never stalls token generation for
long. Torch releases the GIL inside kernels, so the event loop keeps serving I/O meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

PRIORITY_INFERENCE = 0
PRIORITY_FORWARD = 1


class ComputeExecutor:
    def __init__(self, name: str = "swarm-compute", num_threads: int | None = None):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._counter = itertools.count()
        self._num_threads = num_threads
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import torch

        if self._num_threads is not None:
            torch.set_num_threads(self._num_threads)
        while True:
            _priority, _order, job = self._queue.get()
            if job is None:
                return
            fn, args, loop, future = job
            if future.cancelled():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # delivered to the awaiting coroutine, never lost
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

    async def run(self, priority: int, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((priority, next(self._counter), (fn, args, loop, future)))
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
