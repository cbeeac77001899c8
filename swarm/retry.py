"""One retry policy for every client call: forward passes, backward passes and inference steps
(with their session failover) all retry through it, and nowhere else. Its budget is time, not a
count of attempts.

The API, all of it::

    policy = RetryPolicy(deadline=300.0)                      # a frozen value; ClientConfig.retry_policy
    attempts = policy.begin("forward through blocks 0:32", ban=sequence.ban)   # one call's budget
    while not finished:
        try:
            ...                                                # one attempt: choose servers (avoiding
                                                               # attempts.refused), call them
        except SwarmError as e:
            await attempts.failed(e, where="blocks 4:8", peer_id=peer)   # bans the peer, waits, or raises
            continue
        attempts.progress("blocks 0:8 done")                   # what the final error will say was done

- :meth:`Attempts.failed` re-raises an error that is not retryable (:func:`swarm.errors.is_retryable`:
  the client's fault, or a bug), bans the server it blames (``ban(peer_id, error, cost)``, where
  ``cost`` is the time the failed attempt took: the ban lasts at least that long), and raises
  :class:`RetriesExhausted` once ``deadline`` seconds have passed since :meth:`RetryPolicy.begin`;
  otherwise it sleeps the backoff and returns, and the caller tries again (on other servers: the
  banned one is out of every chain until its ban ends).
- A server that *refused* the request (:class:`~swarm.errors.ServerRefused`: an error reply with a
  fatal code) is also kept in :attr:`Attempts.refused` for the rest of the call: the same request
  would be refused again. Callers pass it to the chain search, which raises the server's own refusal
  when no other server holds the blocks (so an honest server's limit still reads as a clear error).
- The budget belongs to one call, shared by everything the call does: an inference step that
  reopens sessions and replays caches after a failure spends the same budget, never a product of
  nested loops. Attempts are bounded by the deadline and the backoff: the first retry is immediate
  (it goes to another server), the k-th waits ``min(max_backoff, backoff * 2**(k-2))`` seconds.
- Bans: :meth:`RetryPolicy.bans` makes the :class:`~swarm.routing.Bans` whose lengths the policy
  sets: ``max(cost, min_ban * 2**(failures-1))`` seconds, the exponential part at most ``max_ban``,
  reset by a success; a dead server until its record changes; a wrong one for good.

No I/O but ``asyncio.sleep``; the clock is injectable for tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from swarm.errors import ConfigError, MissingBlocksError, RetriesExhausted, ServerRefused, is_retryable
from swarm.routing import Bans

logger = logging.getLogger(__name__)

BanFn = Callable[[str, BaseException, float], None]  # ban(peer_id, error, seconds the failure cost)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How hard one call tries: until ``deadline`` seconds have passed (from the call's start to the failure
    after which it would retry), with backoff and ban lengths in seconds."""

    deadline: float = 300.0
    backoff: float = 0.25
    max_backoff: float = 4.0
    min_ban: float = 1.0
    max_ban: float = 60.0

    def __post_init__(self) -> None:
        for name in ("deadline", "min_ban", "max_ban"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive seconds, got {getattr(self, name)}")
        if not 0 <= self.backoff <= self.max_backoff:
            raise ConfigError(f"backoff must be within 0..max_backoff, got {self.backoff} and {self.max_backoff}")

    def bans(self) -> Bans:
        return Bans(min_backoff=self.min_ban, max_backoff=self.max_ban)

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the first retry)."""
        return 0.0 if retry <= 1 else min(self.max_backoff, self.backoff * 2 ** min(retry - 2, 64))

    def begin(self, what: str, ban: BanFn | None = None, *, clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> Attempts:
        """The budget of one call named ``what`` (e.g. "forward through blocks 0:32"); ``ban(peer_id, error,
        cost)`` is called for each server a failure is blamed on."""
        return Attempts(self, what, ban, clock, sleep)


class Attempts:
    """One call's retry budget; made by :meth:`RetryPolicy.begin`."""

    def __init__(self, policy: RetryPolicy, what: str, ban: BanFn | None, clock: Callable[[], float],
                 sleep: Callable[[float], Awaitable[None]]):
        self.policy, self.what, self._ban, self._clock, self._sleep = policy, what, ban, clock, sleep
        self.started = self._mark = clock()
        self.errors: list[str] = []  # "where: error" of every failure, oldest first
        self.refused: dict[str, ServerRefused] = {}  # peers that refused this call's request, and how
        self.done = "nothing done"

    @property
    def deadline(self) -> float:
        """When (on this budget's clock) the call stops retrying."""
        return self.started + self.policy.deadline

    def progress(self, done: str) -> None:
        """Records how far the call got (e.g. "blocks 0:8 done"), for the final error."""
        self.done = done
        self._mark = self._clock()

    async def failed(self, error: BaseException, *, where: str, peer_id: str | None = None) -> None:
        """Called with every failure of an attempt. Re-raises ``error`` unless it is retryable; bans
        ``peer_id``; raises :class:`RetriesExhausted` when the deadline has passed; else waits the backoff."""
        now = self._clock()
        if not is_retryable(error):
            if isinstance(error, MissingBlocksError) and self.errors:
                raise MissingBlocksError(f"{error} (earlier failures of {self.what}: "
                                         f"{' | '.join(self.errors)})") from None
            raise error
        cost, self._mark = now - self._mark, now
        if peer_id is not None:
            if isinstance(error, ServerRefused):
                self.refused[peer_id] = error
            if self._ban is not None:
                self._ban(peer_id, error, cost)
        self.errors.append(f"{where}: {error}")
        retry = len(self.errors)  # the retry this failure would lead to
        elapsed = now - self.started
        delay = self.policy.delay(retry)
        if elapsed + delay > self.policy.deadline:
            earlier = f" (earlier: {' | '.join(self.errors[:-1])})" if len(self.errors) > 1 else ""
            raise RetriesExhausted(
                f"{self.what} gave up after {retry} failures in {elapsed:.1f}s (the {self.policy.deadline:.0f}s "
                f"deadline): {self.done}; it failed at {where}: {error}{earlier}. Servers may have left the swarm: "
                "see which are online with `swarm health` and start more, or raise retry_deadline",
                tuple(self.errors)) from None
        logger.warning("%s: %s failed (%s); retrying elsewhere (retry %d, %.0fs of %.0fs spent)", self.what, where,
                       error, retry, elapsed, self.policy.deadline)
        if delay > 0:
            await self._sleep(delay)
            self._mark = self._clock()
