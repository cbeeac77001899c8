"""client.hedging: the race between a slow request and its backup, and how long a request may take.

Pure asyncio with short real sleeps (tens of milliseconds); no peers.
"""

from __future__ import annotations

import asyncio

import pytest

from swarm.errors import ServerError, ServerUnavailable
from swarm.records import ServerRecord, ServerState

from client.hedging import HEDGE_FACTOR, HEDGE_SLACK, expected_seconds, hedge_after, race


async def _after(seconds: float, value=None, error: BaseException | None = None, log: list | None = None):
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if log is not None:
            log.append(("cancelled", value))
        raise
    if error is not None:
        raise error
    return value


def test_a_prompt_answer_is_taken_and_no_backup_starts():
    started = []

    async def backup():
        started.append(1)
        return "backup"

    raced = asyncio.run(race(_after(0.01, "primary"), 1.0, backup))
    assert (raced.value, raced.backup_won, started) == ("primary", False, [])


def test_a_slow_primary_loses_to_its_backup_and_is_cancelled():
    log: list = []
    raced = asyncio.run(race(_after(5.0, "primary", log=log), 0.02, lambda: _after(0.01, "backup")))
    assert (raced.value, raced.backup_won, raced.primary_error) == ("backup", True, None)
    assert log == [("cancelled", "primary")]


def test_a_slow_primary_that_answers_first_still_wins():
    log: list = []
    raced = asyncio.run(race(_after(0.05, "primary"), 0.01, lambda: _after(5.0, "backup", log=log)))
    assert (raced.value, raced.backup_won) == ("primary", False)
    assert log == [("cancelled", "backup")]


def test_a_failed_backup_leaves_the_primary_to_finish():
    raced = asyncio.run(race(_after(0.05, "primary"), 0.01, lambda: _after(0.0, error=ServerError("no"))))
    assert (raced.value, raced.backup_won) == ("primary", False)


def test_a_primary_that_fails_after_the_hedge_started_is_replaced_and_named():
    failure = ServerUnavailable("closed the stream")
    raced = asyncio.run(race(_after(0.03, error=failure), 0.01, lambda: _after(0.06, "backup")))
    assert (raced.value, raced.backup_won, raced.primary_error) == ("backup", True, failure)


def test_when_both_fail_the_primary_error_is_raised():
    with pytest.raises(ServerUnavailable, match="primary gone"):
        asyncio.run(race(_after(0.03, error=ServerUnavailable("primary gone")), 0.01,
                         lambda: _after(0.0, error=ServerError("backup gone"))))
    with pytest.raises(ServerUnavailable, match="primary gone"):  # a quick failure: no backup at all
        asyncio.run(race(_after(0.0, error=ServerUnavailable("primary gone")), 1.0, lambda: _after(0.0, "unused")))


def test_how_long_a_request_may_take():
    record = ServerRecord(state=ServerState.ONLINE, start=0, end=4, inference_rps=100.0, forward_rps=1000.0)
    assert expected_seconds(record, 4, 1) == pytest.approx(4 * 0.01)  # a token step: the step rate
    assert expected_seconds(record, 4, 100) == pytest.approx(4 * 0.1)  # a long prompt: the token rate
    unknown = ServerRecord(state=ServerState.ONLINE, start=0, end=4)
    assert expected_seconds(unknown, 2, 1) == pytest.approx(0.02) and expected_seconds(None, 2, 1) == pytest.approx(0.02)
    assert hedge_after(0.04, 0.01) == pytest.approx(HEDGE_FACTOR * 0.05 + HEDGE_SLACK)
