"""Event loops: every Swarm process runs one, on uvloop where it is available.

uvloop (a dependency of hivemind on Linux and macOS) handles the many small socket reads and
writes of per-token traffic faster than the default loop. ``SWARM_NO_UVLOOP=1`` turns it off.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    if os.environ.get("SWARM_NO_UVLOOP", "") not in ("", "0"):
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on :func:`new_event_loop`."""
    loop = new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(_run_and_cancel_rest(coro))
    finally:
        asyncio.set_event_loop(None)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _run_and_cancel_rest(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return await coro
    finally:
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)


async def wait_for(aw: Coroutine[Any, Any, T], timeout: float | None) -> T:
    """``asyncio.wait_for`` without its extra task and loop iteration per call (Python >= 3.11): every
    per-message read timeout goes through here. Raises ``TimeoutError`` (= ``asyncio.TimeoutError``)."""
    if sys.version_info < (3, 11):
        return await asyncio.wait_for(aw, timeout)
    async with asyncio.timeout(timeout):
        return await aw
