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
    ServerRefused,
    ServerUnavailable,
    ServerUnreachable,
    SwarmError,
    from_wire,
    is_retryable,
    server_reply_error,
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


class Banned(list):
    """A ban callback that records (peer, error class, cost)."""

    def __call__(self, peer_id: str, error: BaseException, cost: float) -> None:
        self.append((peer_id, type(error).__name__, cost))


def test_retries_until_the_deadline_and_says_how_far_it_got():
    t = FakeTime()
    banned = Banned()
    attempts = RetryPolicy(deadline=10.0, backoff=0.5, max_backoff=4.0).begin(
        "forward through blocks 0:8", banned, clock=t.clock, sleep=t.sleep)

    async def scenario():
        attempts.progress("blocks 0:4 done")
        t.now = 3.0  # the attempt on A took 3 s to fail
        await attempts.failed(ServerUnavailable("server A did not answer"), where="blocks 4:8 on server A",
                              peer_id="A")
        await attempts.failed(ServerError("RuntimeError: boom"), where="blocks 4:8 on server B", peer_id="B")
        t.now += 7.0
        await attempts.failed(ServerBusy("full"), where="blocks 4:6 on server C", peer_id="C")

    with pytest.raises(RetriesExhausted) as info:
        run(scenario())
    # every failure bans the server it is blamed on, for at least what the failed attempt cost
    assert banned == [("A", "ServerUnavailable", 3.0), ("B", "ServerError", 0.0), ("C", "ServerBusy", 7.0)]
    assert t.slept == [0.5]  # the first retry goes elsewhere at once, the second waits
    message = str(info.value)
    assert message.startswith("forward through blocks 0:8 gave up after 3 failures in 10.5s (the 10s deadline)")
    assert "blocks 0:4 done; it failed at blocks 4:6 on server C: full" in message
    assert "earlier: blocks 4:8 on server A: server A did not answer | blocks 4:8 on server B" in message
    assert "swarm health" in message
    assert len(info.value.errors) == 3 and not is_retryable(info.value)


def test_the_budget_is_time_not_a_count():
    t = FakeTime()
    attempts = RetryPolicy(deadline=60.0, backoff=0.25, max_backoff=1.0).begin("x", None, clock=t.clock,
                                                                               sleep=t.sleep)

    async def scenario():
        for _ in range(50):  # fifty servers that refuse connections at once: each is simply tried
            await attempts.failed(ServerUnreachable("connection refused"), where="blocks 0:2")

    run(scenario())
    assert len(attempts.errors) == 50 and t.now < 60.0
    with pytest.raises(RetriesExhausted, match=r"gave up after 6\d failures in \d+\.\ds \(the 60s deadline\)"):
        run(scenario())  # the deadline, whatever the count


def test_fatal_errors_and_bugs_pass_through_untouched():
    t = FakeTime()
    banned = Banned()
    attempts = RetryPolicy().begin("x", banned, clock=t.clock, sleep=t.sleep)
    bad = BadRequest("your request is wrong")
    with pytest.raises(BadRequest) as info:
        run(attempts.failed(bad, where="blocks 0:2 on server A", peer_id="A"))
    assert info.value is bad
    with pytest.raises(TypeError):
        run(attempts.failed(TypeError("a bug"), where="blocks 0:2", peer_id="A"))
    assert banned == [] and attempts.errors == []  # not the server's fault: nobody banned, nothing spent


def test_a_refusal_is_retried_elsewhere_and_remembered_for_the_call():
    t = FakeTime()
    banned = Banned()
    attempts = RetryPolicy().begin("x", banned, clock=t.clock, sleep=t.sleep)
    refusal = server_reply_error("bad_request", "blocks 0:9 are not all served here", "A")
    assert isinstance(refusal, ServerRefused) and is_retryable(refusal)
    assert "server A refused the request (bad_request): blocks 0:9" in str(refusal)
    assert type(refusal.refusal()) is BadRequest and str(refusal.refusal()) == "blocks 0:9 are not all served here"
    run(attempts.failed(refusal, where="blocks 0:9 on server A", peer_id="A"))
    assert banned == [("A", "ServerRefused", 0.0)] and attempts.refused == {"A": refusal}
    unknown = server_reply_error("unknown_session", "no such session", "B")
    assert isinstance(unknown, ServerRefused) and type(unknown.refusal()) is errors.UnknownSession
    busy = server_reply_error("server_busy", "out of cache", "C")  # retryable codes keep their class
    assert type(busy) is ServerBusy


def test_missing_blocks_after_failures_names_them():
    t = FakeTime()
    attempts = RetryPolicy().begin("inference step", None, clock=t.clock, sleep=t.sleep)
    run(attempts.failed(ServerUnavailable("server A closed the stream"), where="blocks 0:2 on server A"))
    with pytest.raises(MissingBlocksError, match="blocks 0:2 have no online server .*earlier failures of "
                                                 "inference step: blocks 0:2 on server A: server A closed"):
        run(attempts.failed(MissingBlocksError("blocks 0:2 have no online server"), where="blocks 0:2"))


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(backoff=0.25, max_backoff=1.0)
    assert [policy.delay(k) for k in range(1, 7)] == [0.0, 0.25, 0.5, 1.0, 1.0, 1.0]
    assert policy.delay(10**6) == 1.0  # no overflow


def test_bans_have_the_policy_lengths():
    bans = RetryPolicy(min_ban=2.0, max_ban=5.0).bans()
    assert [bans.ban("A", now=0.0) for _ in range(3)] == [2.0, 4.0, 5.0]
    assert bans.ban("A", now=0.0, cost=30.0) == 30.0  # never shorter than what the failure cost


@pytest.mark.parametrize("fields, flag", [
    ({"deadline": 0}, "deadline"), ({"min_ban": -1.0}, "min_ban"),
    ({"backoff": 5.0, "max_backoff": 1.0}, "backoff"),
])
def test_policy_checks_its_values(fields, flag):
    with pytest.raises(ConfigError, match=flag):
        RetryPolicy(**fields)


def test_client_config_makes_the_policy():
    config = ClientConfig(initial_peers=(PEER,), retry_deadline=30.0)
    assert config.retry_policy == RetryPolicy(deadline=30.0)
    with pytest.raises(ConfigError, match="retry_deadline must be positive"):
        ClientConfig(initial_peers=(PEER,), retry_deadline=0)


def test_error_classes_are_swarm_errors():
    assert issubclass(ServerError, errors.RetryableError) and issubclass(RetriesExhausted, errors.FatalError)
    assert issubclass(RetriesExhausted, SwarmError)
