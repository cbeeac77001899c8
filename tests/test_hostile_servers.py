"""Servers that answer wrong, refuse, or dawdle are routed around; the client's output stays exact.

One swarm of tiny-Llama servers, each holding all four blocks: two honest ones and one per fault
(``SWARM_TEST_FAULTS``, see server/faults.py): NaN and random-bit outputs, error replies with fatal
codes (``unknown_session``, ``bad_request``) for requests the client checked, and a server that
sleeps 10 s per request. Each test lets the client see only the faulty server under test and the
honest ones (the others are distrusted up front) and makes the faulty one its first choice (a
short ping for inference, a huge published throughput for forward passes). The client must then
fail on it (or hedge it), avoid it, and finish on an honest server with the fault-free result:
greedy tokens identical to local transformers, logits within 1e-5.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch

from swarm.errors import SwarmError
from swarm.local_swarm import LocalSwarm

from peer_helpers import joined

pytestmark = pytest.mark.integration

PREFIX = "hostile-llama"
ATOL = 1e-5
FAULTS = {
    "nan": "inference:nan,forward:garbage",
    "garbage": "inference:garbage,forward:nan",
    "refuser": "inference:error=unknown_session,forward:error=bad_request",
    "slow": "inference:sleep=10,forward:sleep=10",
    "rogue": "inference:perturb=0.01@0.1,forward:perturb=0.01@0.1",  # slightly wrong on 10% of requests
}
HONEST = ("honest_a", "honest_b")


@pytest.fixture(scope="module")
def hostile_swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(log_dir=str(tmp_path_factory.mktemp("hostile"))) as swarm:
        swarm.start_dht()
        procs = [swarm.start_server(tiny_llama, "0:4", "--num-threads", "1", "--prefix", PREFIX, "--throughput",
                                    "1000000" if name in FAULTS else "1", wait=False, name=name,
                                    env={"SWARM_TEST_FAULTS": FAULTS[name]} if name in FAULTS else None)
                 for name in (*HONEST, *FAULTS)]
        procs.append(swarm.start_server(tiny_llama, "0:4", "--num-threads", "1", "--prefix", PREFIX, "--throughput",
                                        "1", "--dtype", "bfloat16", wait=False, name="honest_bf16"))
        ids = {proc.name: proc.wait_for("Server ONLINE", 180).rsplit(" as ", 1)[1].strip() for proc in procs}
        yield swarm, ids
        swarm.stop(next(p for p in procs if p.name == "slow"), sig=signal.SIGKILL)  # it would finish its sleeps


def _client(path: str, swarm: LocalSwarm, ids: dict[str, str], target: str, visible: tuple[str, ...] = HONEST,
            **kwargs):
    """A client that sees only ``target`` and ``visible`` (the honest float32 servers), and tries ``target`` first."""
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=swarm.initial_peers, dht_prefix=PREFIX, request_timeout=20, missing_blocks_timeout=3,
        **kwargs)
    model.generation_config.eos_token_id = None
    for name, peer_id in ids.items():
        if name != target and name not in visible:
            model.remote.bans.distrust(peer_id)
        model.remote.pings[peer_id] = (0.001 if name == target else 0.2, time.monotonic())
    return model


def _prompt(seed: int) -> torch.Tensor:
    return torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(seed))


def _generate_and_check(model, local_llama, seed: int):
    prompt = _prompt(seed)
    with model.inference_session(max_length=24) as session:
        out = model.generate(prompt, max_new_tokens=10, do_sample=False, session=session)
        chain = [link.peer_id for link in session.chain]
    assert out.tolist() == local_llama.generate(prompt, max_new_tokens=10, do_sample=False).tolist()
    return session, chain


def _forward_and_check(model, local_llama, seed: int) -> None:
    batch = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model(input_ids=batch).logits
        expected = local_llama(input_ids=batch).logits
    assert (logits - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("target", ["nan", "garbage"])
def test_nan_and_garbage_outputs_are_routed_around(tiny_llama, local_llama, hostile_swarm, target, caplog):
    swarm, ids = hostile_swarm
    model = _client(tiny_llama, swarm, ids, target)
    try:
        session, chain = _generate_and_check(model, local_llama, seed=1)
        assert session.failovers >= 1 and ids[target] not in chain
        assert _blamed(caplog, ids[target], "inference step") == 1
        model.remote.bans.succeeded(ids[target])  # its ban is over: the forward pass tries it first again
        _forward_and_check(model, local_llama, seed=2)
        assert _blamed(caplog, ids[target], "forward through") == 1
    finally:
        model.shutdown()


def _blamed(caplog, peer_id: str, call: str) -> int:
    """How many times the client retried ``call`` elsewhere after ``peer_id`` returned unusable hidden states."""
    return sum(r.name == "swarm.retry" and r.getMessage().startswith(call) and peer_id in r.getMessage()
               and ("non-finite" in r.getMessage() or "implausibly large" in r.getMessage()) for r in caplog.records)


def test_error_replies_to_checked_requests_are_routed_around(tiny_llama, local_llama, hostile_swarm, caplog):
    swarm, ids = hostile_swarm
    model = _client(tiny_llama, swarm, ids, "refuser")
    try:
        session, chain = _generate_and_check(model, local_llama, seed=3)
        assert session.failovers >= 1 and ids["refuser"] not in chain
        model.remote.bans.succeeded(ids["refuser"])
        _forward_and_check(model, local_llama, seed=4)
    finally:
        model.shutdown()
    retried = [r.getMessage() for r in caplog.records if r.name == "swarm.retry" and ids["refuser"] in r.getMessage()]
    assert any("refused the request (unknown_session)" in m for m in retried)
    assert any("refused the request (bad_request)" in m for m in retried)


def test_a_slow_server_is_hedged_and_then_avoided(tiny_llama, local_llama, hostile_swarm):
    swarm, ids = hostile_swarm
    model = _client(tiny_llama, swarm, ids, "slow")
    try:
        t0 = time.monotonic()
        session, chain = _generate_and_check(model, local_llama, seed=5)
        first = time.monotonic() - t0
        # the server sleeps 10 s a step; another one was asked after ~1 s and answered first
        assert session.hedges == 1 and session.failovers == 0 and ids["slow"] not in chain
        assert first < 8.0, f"the first generation took {first:.1f}s"
        # avoided afterwards: the next session does not even try it, though its ping is still the shortest
        t0 = time.monotonic()
        session, chain = _generate_and_check(model, local_llama, seed=6)
        assert session.hedges == 0 and ids["slow"] not in chain and time.monotonic() - t0 < 3.0
        model.remote.bans.succeeded(ids["slow"])  # forward passes are hedged too
        t0 = time.monotonic()
        _forward_and_check(model, local_llama, seed=7)
        assert time.monotonic() - t0 < 8.0
    finally:
        model.shutdown()


def test_with_nothing_honest_left_the_error_is_clear(tiny_llama, hostile_swarm):
    swarm, ids = hostile_swarm
    model = _client(tiny_llama, swarm, ids, "refuser")
    for name in ("honest_a", "honest_b"):
        model.remote.bans.distrust(ids[name])
    try:
        t0 = time.monotonic()
        with pytest.raises(SwarmError, match="every server of blocks 0:4 that was tried refused this request; "
                                             f"server {ids['refuser']} said: injected unknown_session"):
            model.generate(_prompt(8), max_new_tokens=4, do_sample=False)
        assert time.monotonic() - t0 < 10.0
    finally:
        model.shutdown()


class _Steps:
    """A streamer that counts inference steps until ``peer_id`` is distrusted.

    Checks run in the background; after each step it waits for the ones in flight, so that the steps a catch
    takes depend on the random draws alone. Otherwise they depend on how fast a check finishes: one still
    running when the next step draws a check of the same server makes that draw void, and one still running
    when its session closes is cancelled, which on a loaded machine stretched a catch to 326 steps."""

    def __init__(self, model, peer_id: str):
        self.model, self.peer_id, self.steps, self.caught_at = model, peer_id, 0, None
        self.session = None  # the session whose checks to wait for

    def put(self, value):
        if self.session is not None:
            self.session.finish_checks()
        self.steps += 1
        if self.caught_at is None and self.peer_id in self.model.remote.bans.distrusted():
            self.caught_at = self.steps

    def end(self):
        pass


def test_a_server_slightly_wrong_on_a_tenth_of_steps_is_caught_and_reported(tiny_llama, local_llama, hostile_swarm):
    """Relative error 1e-2 on a random 10% of steps: caught within 200 steps at the default verify_rate
    (with every check done before the next step: the median catch takes 25 steps, and 1 run in ~1,100 takes
    more than 200, by a simulation of the draws)."""
    from swarm.dht import fetch_reports

    from client.loop import run_sync

    swarm, ids = hostile_swarm
    model = _client(tiny_llama, swarm, ids, "rogue")
    rogue = ids["rogue"]
    counter = _Steps(model, rogue)
    try:
        assert model.remote.config.verify_rate == 0.05
        for seed in range(10):  # sessions of 40 steps; bounded: 400 steps
            with model.inference_session(max_length=48) as session:
                counter.session = session
                model.generate(_prompt(100 + seed), max_new_tokens=40, do_sample=False, session=session,
                               streamer=counter)
            if counter.caught_at is not None:
                break
        distrusted = model.remote.bans.distrusted()
        print(f"rogue caught at step {counter.caught_at}; {model.remote.verifier.stats}")
        assert rogue in distrusted and counter.caught_at is not None and counter.caught_at <= 200
        assert not distrusted & {ids[name] for name in HONEST}  # no honest server blamed
        reports = run_sync(fetch_reports(run_sync(model.remote.peer()), PREFIX))
        assert rogue in reports and "relative error" in next(iter(reports[rogue].values()))
        _, chain = _generate_and_check(model, local_llama, seed=200)  # without it: exact again
        assert rogue not in chain
    finally:
        model.shutdown()


def test_honest_servers_of_other_dtypes_pass_every_check(tiny_llama, hostile_swarm):
    """A bfloat16 server checked by float32 ones, and a float32 one checked by the bfloat16 one: no bans."""
    swarm, ids = hostile_swarm
    for target, checkers in (("honest_bf16", HONEST), ("honest_a", ("honest_bf16",))):
        model = _client(tiny_llama, swarm, ids, target, visible=checkers, verify_rate=1.0)
        try:
            with model.inference_session(max_length=40) as session:
                model.generate(_prompt(300), max_new_tokens=30, do_sample=False, session=session)
                session.finish_checks()
                assert [link.peer_id for link in session.chain] == [ids[target]]
            stats = model.remote.verifier.stats
            print(f"{target} checked by {checkers}: {stats}")
            # a check covers every row the span holds (draws while one runs are skipped)
            assert stats.checks >= 2 and stats.disagreements == 0
            assert ids[target] not in model.remote.bans.distrusted()
        finally:
            model.shutdown()


def test_swarm_verify_reports_servers_that_compute_wrong(tiny_llama, hostile_swarm):
    """The volunteer checker, as a user runs it: every server checked once, the broken ones reported."""
    import subprocess
    import sys

    from swarm.dht import fetch_reports

    from client.loop import run_sync

    swarm, ids = hostile_swarm
    done = subprocess.run([sys.executable, "-m", "swarm.cli", "verify", "--model", tiny_llama, "--dht-prefix", PREFIX,
                           "--initial-peers", *swarm.initial_peers, "--request-timeout", "3",
                           "--host-maddrs", "/ip4/127.0.0.1/tcp/0"], capture_output=True, text=True, timeout=240)
    lines = {name: next(line for line in done.stdout.splitlines() if f"server {peer_id} " in line)
             for name, peer_id in ids.items()}
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    for name in ("nan", "garbage"):
        assert "session WRONG" in lines[name] and "forward WRONG" in lines[name], lines[name]
    for name in (*HONEST, "honest_bf16"):
        assert "session ok" in lines[name] and "forward ok" in lines[name], lines[name]
    assert "session failed" in lines["refuser"] and "session failed" in lines["slow"]
    assert "2 server(s) found wrong" in done.stdout or "3 server(s) found wrong" in done.stdout  # the rogue: 10%

    async def reports():
        async with joined(swarm.initial_peers) as peer:
            return await fetch_reports(peer, PREFIX)

    found = run_sync(reports())
    assert {ids["nan"], ids["garbage"]} <= set(found)
    assert not {ids[name] for name in (*HONEST, "honest_bf16")} & set(found)
