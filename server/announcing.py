"""When a server announces its record next: every ``update_period`` after an announcement the DHT
stored, and sooner after one it did not.

A store fails when the DHT has no peers that take it yet (a server restarted before its neighbours
know it again, a bootstrap peer briefly away). Waiting the whole period (60 s by default) would
keep the server out of clients' chains for that long; instead the k-th failure in a row is retried
after ``min(update_period, FIRST_RETRY * 2**(k-1))`` seconds (1, 2, 4, ... s), and a stored
announcement brings the period back. Bounded both ways: never sooner than :data:`FIRST_RETRY`, never
later than the period. Pure: :class:`server.server.Server` sleeps what it says.
"""

from __future__ import annotations

FIRST_RETRY = 1.0  # seconds before announcing again after the first failed store


class AnnounceSchedule:
    """Seconds until the next announcement, from the outcomes of the last ones."""

    def __init__(self, period: float, first_retry: float = FIRST_RETRY):
        if not (first_retry > 0 and period > 0):
            raise ValueError(f"announce period {period} and first retry {first_retry} must be > 0")
        self.period, self.first_retry = period, min(first_retry, period)
        self.failures = 0  # announcements in a row the DHT did not store

    def record(self, stored: bool) -> float:
        """Notes whether the DHT stored an announcement; returns the seconds until the next one."""
        self.failures = 0 if stored else self.failures + 1
        return self.delay

    @property
    def delay(self) -> float:
        if not self.failures:
            return self.period
        return min(self.period, self.first_retry * 2.0 ** min(self.failures - 1, 60))

    @property
    def retrying(self) -> bool:
        return self.failures > 0
