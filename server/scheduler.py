"""Which waiting inference steps run together next: a pure function over tickets.

Every waiting step (of any session) holds a :class:`Ticket` for the next piece of it that runs: a
whole step, or the next chunk of a long one. The oldest ticket runs next, together with every
other waiting ticket of its *group* -- the same blocks and the same number of new tokens, so their
rows stack into one ``[rows, new tokens, hidden]`` forward -- oldest first, up to ``max_tokens``
tokens in all. Decode steps of concurrent sessions (one new token each) thus run as one batch.

A step longer than ``max_tokens`` (a long prefill) runs in chunks of at most ``max_tokens`` tokens,
each chunk queued anew behind the steps that arrived meanwhile. So a decode step never waits for more
than one chunk (the *stall bound*: the time ``max_tokens`` tokens take through the span), and a long
prefill still advances one chunk per round. vLLM's and Sarathi's chunked prefill spend one token
budget per iteration the same way; here prefill chunks and decode rows run as separate forwards,
because rows of one forward must have the same number of new tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence


@dataclasses.dataclass(frozen=True)
class Ticket:
    order: int  # arrival: lower runs first
    group: Hashable  # steps of one group may share a forward: (start, end, new tokens of this piece)
    tokens: int  # rows x new tokens of this piece


def chunk_length(rows: int, remaining: int, max_tokens: int) -> int:
    """New tokens of the next piece of a step with ``rows`` rows and ``remaining`` tokens left to run."""
    return max(1, min(remaining, max_tokens // rows))


def next_batch(tickets: Sequence[Ticket], max_tokens: int, batching: bool = True) -> list[int]:
    """Indices of the tickets to run next, oldest first; empty only if ``tickets`` is.

    Without ``batching`` a batch is the oldest ticket alone (the server runs sessions one by one).
    """
    if not tickets:
        return []
    first = min(range(len(tickets)), key=lambda i: tickets[i].order)
    if not batching:
        return [first]
    group = tickets[first].group
    chosen, total = [], 0
    for i in sorted((i for i, t in enumerate(tickets) if t.group == group), key=lambda i: tickets[i].order):
        if chosen and total + tickets[i].tokens > max_tokens:
            break
        chosen.append(i)
        total += tickets[i].tokens
    return chosen


class Arrivals:
    """How long to hold the next batch for the sessions of the last one (pure; the clock is passed in).

    After a batch, its sessions send their next step one *turnaround* later (their client's round
    trip). Starting the next batch the moment the first of them is back splits them into two groups
    that then alternate, each waiting for the other's forward: twice the latency, half the batch.
    So the next batch waits for the sessions of the last one whose measured turnaround ends within a
    window after it (``fraction`` of its duration, at most ``max_hold`` seconds), and no longer:
    sessions whose client is far away, or that stopped, are not waited for beyond the window.
    """

    def __init__(self, fraction: float = 0.5, max_hold: float = 0.05):
        self.fraction, self.max_hold = fraction, max_hold
        self._answered: dict[Hashable, float] = {}  # sessions of the last batch not back yet: when answered
        self._turnaround: dict[Hashable, float] = {}  # smoothed seconds from an answer to the next step
        self._until = 0.0

    def answered(self, keys: Sequence[Hashable], now: float, duration: float) -> None:
        """A batch of ``duration`` seconds ended at ``now`` and answered the sessions ``keys``."""
        self._answered = dict.fromkeys(keys, now)
        self._until = now + min(self.max_hold, self.fraction * duration)

    def arrived(self, key: Hashable, now: float) -> None:
        """Session ``key`` sent a step."""
        answered = self._answered.pop(key, None)
        if answered is not None:
            previous = self._turnaround.get(key)
            measured = now - answered
            self._turnaround[key] = measured if previous is None else (previous + measured) / 2

    def forget(self, key: Hashable) -> None:
        self._answered.pop(key, None)
        self._turnaround.pop(key, None)

    def hold(self, now: float) -> float:
        """Seconds the next batch should still wait (0: start it now)."""
        if now >= self._until:
            return 0.0
        expected = any(key in self._turnaround and answered + self._turnaround[key] <= self._until
                       for key, answered in self._answered.items())
        return self._until - now if expected else 0.0
