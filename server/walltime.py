"""Leaving before a Slurm job's time limit, without losing a generation.

Inside a Slurm job a server asks Slurm for the job's end time (:func:`swarm.slurm.end_time`) every
:func:`poll_period` seconds (it moves when someone runs ``scontrol update``). ``leave_before``
seconds before it, or as soon as Slurm's warning signal arrives (``--signal=B:USR1@N``, which
``swarm slurm`` asks for; Slurm may send it up to a minute early), the server:

1. announces OFFLINE and takes no new sessions (clients open them on other servers);
2. lets the open sessions go on until half of ``leave_before`` is left before the end (a generation
   that ends meanwhile never notices);
3. stops: the usual shutdown closes the sessions still open (their clients fail over and replay what
   this server had cached, so their output does not change) and the process exits 0, before Slurm
   signals every process of the job at the limit (after which ``p2pd`` is gone and nothing could be
   announced).

SIGTERM (``scancel``, or the limit itself) stops the server at once, the usual way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from swarm.slurm import SlurmJob, end_time

logger = logging.getLogger(__name__)

POLL_MAX = 60.0  # seconds between two questions to Slurm, at most
WARNING_SIGNAL = signal.SIGUSR1  # what `swarm slurm` asks Slurm to send before the limit (--signal=B:USR1@N)


class LeavingServer(Protocol):
    async def leave(self, reason: str, drain_until: float) -> None: ...


def poll_period(leave_before: float) -> float:
    """How often to ask Slurm for the end time: often enough to notice a moved end in a quarter of the margin."""
    return max(1.0, min(POLL_MAX, leave_before / 4))


def _clock_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def catch_warning() -> asyncio.Event:
    """From now on, Slurm's warning signal sets the returned event instead of ending the process (its
    default action): call it as early as the server's loop runs, since Slurm may warn a minute early."""
    warning = asyncio.Event()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # no signals in this loop/thread
        asyncio.get_running_loop().add_signal_handler(WARNING_SIGNAL, warning.set)
    return warning


async def watch_walltime(server: LeavingServer, job: SlurmJob, leave_before: float, *,
                         read_end: Callable[[], float | None] | None = None, clock: Callable[[], float] = time.time,
                         sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                         warning: asyncio.Event | None = None) -> None:
    """Runs until the job's end is ``leave_before`` seconds away (or ``warning`` is set: by default Slurm's
    :data:`WARNING_SIGNAL`), then has ``server`` leave; afterwards waits to be cancelled by the server's
    shutdown (it never returns). An end Slurm cannot tell (an unlimited job, ``squeue`` failing) keeps
    the last one known."""
    read_end = read_end or (lambda: end_time(job))
    warning = warning or catch_warning()
    period = poll_period(leave_before)
    known: float | None = None
    while True:
        end = await asyncio.to_thread(read_end)
        if end is not None and end != known:
            left = end - clock()
            logger.info("Slurm %s ends at %s (in %.0fs); this server leaves the swarm %.0fs before", job.label,
                        _clock_time(end), left, leave_before)
            if left < leave_before:
                logger.warning("Less than --leave-before %.0fs is left: leaving now", leave_before)
            known = end
        if warning.is_set() or (known is not None and clock() >= known - leave_before):
            why = "Slurm's warning signal" if warning.is_set() else f"--leave-before {leave_before:g}s"
            limit = f"at {_clock_time(known)}" if known is not None else "soon"
            drain_until = known - leave_before / 2 if known is not None else clock() + leave_before / 2
            await server.leave(f"Slurm {job.label} reaches its time limit {limit} ({why})", drain_until=drain_until)
            await asyncio.Event().wait()  # the server is stopping; its shutdown cancels this task
        wait = period if known is None else min(period, known - leave_before - clock())
        await _sleep_or(sleep(max(wait, 0.05)), warning)


async def _sleep_or(nap: Awaitable[None], event: asyncio.Event) -> None:
    """Waits for ``nap`` or ``event``, whichever comes first."""
    tasks = [asyncio.ensure_future(nap), asyncio.ensure_future(event.wait())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
