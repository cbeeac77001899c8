"""The one retry policy (swarm.retry) and whose fault each error is (swarm.errors.is_retryable).

Pure logic: a fake clock and a recorded sleep, no peers.
"""

from __future__ import annotations

import asyncio

import pytest

from swarm import errors
from swarm.config import ClientConfig
from swarm.errors import (
    BadRequest,
    ConfigError,
    MissingBlocksError,
    RetriesExhausted,
    ServerBusy,
    ServerError,
    ServerUnavailable,
    SwarmError,
    from_wire,
    is_retryable,
)
from swarm.retry import RetryPolicy

PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


class FakeTime:
    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("error, retryable", [
    (ServerUnavailable("gone"), True),
    (ServerError("RuntimeError: CUDA out of memory"), True),
    (ServerBusy("full"), True),
    (from_wire("swarm_error", "ValueError: from an older server"), True),  # neither kind: the server's fault
    (from_wire("a_code_from_a_newer_peer", "?"), True),
    (BadRequest("shape"), False),
    (MissingBlocksError("blocks 0:2"), False),
    (RetriesExhausted("gave up"), False),
    (ValueError("a bug on this side"), False),
    (KeyError("x"), False),
])
def test_whose_fault(error, retryable):
    assert is_retryable(error) is retryable


def test_unexpected_server_errors_cross_the_wire_as_server_error():
    code, message = errors.to_wire(ServerError("the server failed: RuntimeError: boom"))
    error = from_wire(code, message)
    assert type(error) is ServerError and is_retryable(error) and "RuntimeError: boom" in str(error)


def test_retries_until_the_budget_is_spent_and_says_how_far_it_got():
    t = FakeTime()
    banned: list[str] = []
    attempts = RetryPolicy(max_retries=2, backoff=0.5, max_backoff=4.0).begin(
        "forward through blocks 0:8", banned.append, clock=t.clock, sleep=t.sleep)

    async def scenario():
        attempts.progress("blocks 0:4 done")
        await attempts.failed(ServerUnavailable("server A did not answer"), where="blocks 4:8 on server A",
                              peer_id="A")
        await attempts.failed(ServerError("RuntimeError: boom"), where="blocks 4:8 on server B", peer_id="B")
        await attempts.failed(ServerBusy("full"), where="blocks 4:6 on server C", peer_id="C")

    with pytest.raises(RetriesExhausted) as info:
        run(scenario())
    assert banned == ["A", "B", "C"]  # every failure bans the server it is blamed on
    assert t.slept == [0.5]  # the first retry goes elsewhere at once, the second waits
    message = str(info.value)
    assert message.startswith("forward through blocks 0:8 gave up after 3 failures")
    assert "blocks 0:4 done; it failed at blocks 4:6 on server C: full" in message
    assert "earlier: blocks 4:8 on server A: server A did not answer | blocks 4:8 on server B" in message
    assert "swarm health" in message
    assert len(info.value.errors) == 3 and not is_retryable(info.value)


def test_fatal_errors_and_bugs_pass_through_untouched():
    t = FakeTime()
    banned: list[str] = []
    attempts = RetryPolicy().begin("x", banned.append, clock=t.clock, sleep=t.sleep)
    bad = BadRequest("your request is wrong")
    with pytest.raises(BadRequest) as info:
        run(attempts.failed(bad, where="blocks 0:2 on server A", peer_id="A"))
    assert info.value is bad
    with pytest.raises(TypeError):
        run(attempts.failed(TypeError("a bug"), where="blocks 0:2", peer_id="A"))
    assert banned == [] and attempts.errors == []  # not the server's fault: nobody banned, nothing spent


def test_deadline_stops_retrying_before_the_count_does():
    t = FakeTime()
    attempts = RetryPolicy(max_retries=100, deadline=10.0).begin("inference step", None, clock=t.clock,
                                                                 sleep=t.sleep)

    async def scenario():
        await attempts.failed(ServerUnavailable("slow"), where="blocks 0:2")  # at t=0
        t.now = 11.0  # the next attempt took long and failed too
        await attempts.failed(ServerUnavailable("slow again"), where="blocks 0:2")

    with pytest.raises(RetriesExhausted, match="gave up after the 10s deadline in 11.0s"):
        run(scenario())


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(backoff=0.25, max_backoff=1.0)
    assert [policy.delay(k) for k in range(1, 7)] == [0.0, 0.25, 0.5, 1.0, 1.0, 1.0]
    assert policy.delay(10**6) == 1.0  # no overflow


def test_bans_have_the_policy_lengths():
    bans = RetryPolicy(min_ban=2.0, max_ban=5.0).bans()
    assert [bans.ban("A", now=0.0) for _ in range(3)] == [2.0, 4.0, 5.0]


def test_zero_retries_means_one_attempt():
    attempts = RetryPolicy(max_retries=0).begin("x", None)
    with pytest.raises(RetriesExhausted, match="after 1 failures"):
        run(attempts.failed(ServerUnavailable("gone"), where="blocks 0:1"))


@pytest.mark.parametrize("fields, flag", [
    ({"max_retries": -1}, "max_retries"), ({"deadline": 0}, "deadline"), ({"min_ban": -1.0}, "min_ban"),
    ({"backoff": 5.0, "max_backoff": 1.0}, "backoff"),
])
def test_policy_checks_its_values(fields, flag):
    with pytest.raises(ConfigError, match=flag):
        RetryPolicy(**fields)


def test_client_config_makes_the_policy():
    config = ClientConfig(initial_peers=(PEER,), max_retries=5, retry_deadline=30.0)
    assert config.retry_policy == RetryPolicy(max_retries=5, deadline=30.0)
    with pytest.raises(ConfigError, match="retry_deadline must be positive"):
        ClientConfig(initial_peers=(PEER,), retry_deadline=0)


def test_error_classes_are_swarm_errors():
    assert issubclass(ServerError, errors.RetryableError) and issubclass(RetriesExhausted, errors.FatalError)
    assert issubclass(RetriesExhausted, SwarmError)
