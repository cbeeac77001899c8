"""Generation over emulated WAN links (swarm/wan.py) on real peers, with every option on: whole-chain
planning, push, compression on slow links, speculative decoding. Greedy output must equal local
transformers', with a server killed mid-generation too."""

from __future__ import annotations

import time

import pytest
import torch

from swarm.local_swarm import LocalSwarm
from swarm.tiny import load_draft, make_tiny_model
from swarm.wan import LinkShape

from test_failover import _KillAfter, _server_for

pytestmark = pytest.mark.integration
DELAY = 0.005  # one way, every link


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> str:
    """8 layers whose last 6 add little: its first 2 layers are a draft that agrees with it most of the time."""
    return make_tiny_model(str(tmp_path_factory.mktemp("models") / "deep-llama"), num_hidden_layers=8, quiet_after=2)


@pytest.fixture(scope="module")
def local_deep(deep_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(deep_llama, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def wan_swarm(deep_llama, tmp_path_factory):
    """Every link 5 ms one way. Prefix "wan": 0:4, then 4:8 three times (a spare for each test that kills one).
    Prefix "slow": 0:4 and 4:8 on links of 400 KB/s, where a 32-token prefill's states take ~20 ms, so they
    cross compressed."""
    with LocalSwarm(log_dir=str(tmp_path_factory.mktemp("wan")), wan=LinkShape(DELAY)) as swarm:
        swarm.start_dht()
        slow = LinkShape(DELAY, bandwidth=400e3)
        servers = {}
        for name, span, prefix, shape in (("first", "0:4", "wan", None), ("second_a", "4:8", "wan", None),
                                          ("second_b", "4:8", "wan", None),
                                          ("second_c", "4:8", "wan", None), ("slow_first", "0:4", "slow", slow),
                                          ("slow_second", "4:8", "slow", slow)):
            servers[name] = swarm.start_server(deep_llama, span, "--num-threads", "1", "--dht-prefix", prefix,
                                               "--update-period", "2", "--throughput", "100", wait=False, name=name,
                                               wan=shape)
        for proc in servers.values():
            proc.wait_for("Server ONLINE", 180)
        yield swarm, servers


def _client(deep_llama, swarm, prefix: str, **options):
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(deep_llama, initial_peers=swarm.initial_peers,
                                                            dht_prefix=prefix, request_timeout=20,
                                                            missing_blocks_timeout=10, **options)
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("options", [dict(push_echo=False, verify_rate=0.0), {}], ids=["no_echo", "defaults"])
def test_greedy_with_every_option_on_equals_local_under_delay_and_with_a_server_killed(
        deep_llama, local_deep, wan_swarm, options):
    """Push without echo (a killed server's inputs come from the server before it), and the defaults (echo, as
    the client verifies servers; hedging)."""
    swarm, servers = wan_swarm
    draft = load_draft(deep_llama, 2)
    ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(5))
    expected = local_deep.generate(ids, max_new_tokens=24, do_sample=False)
    model = _client(deep_llama, swarm, "wan", **options)
    try:
        t0 = time.monotonic()
        assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False), expected)
        plain_s = time.monotonic() - t0
        # the chain's hops really pay the delay: 3 one-way legs per token at least
        assert plain_s > 24 * 3 * DELAY

        with model.inference_session(max_length=64) as session:
            out = model.generate(ids, max_new_tokens=24, do_sample=False, assistant_model=draft, session=session)
            assert torch.equal(out, expected)
            stats = session.speculation
            assert stats.rounds < 24 and stats.accepted > 0, vars(stats)

        with model.inference_session(max_length=64) as session:
            killer = _KillAfter(swarm, lambda: _server_for(servers, session, 4), after=8)
            out = model.generate(ids, max_new_tokens=24, do_sample=False, assistant_model=draft, session=session,
                                 streamer=killer)
            assert killer.killed in (servers["second_a"], servers["second_b"], servers["second_c"])
            assert session.failovers >= 1
            # without echo the killed server's inputs came from the server before it
            assert session.fetches == (1 if options.get("push_echo") is False else 0)
            assert torch.equal(out, expected)
    finally:
        model.shutdown()


@pytest.mark.parametrize("policy, bound", [("auto", 2e-3), ("int8", 2e-2)])
def test_slow_links_carry_compressed_states_within_the_stated_error(deep_llama, local_deep, wan_swarm, policy,
                                                                    bound):
    swarm, _ = wan_swarm
    ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(6))
    expected = local_deep.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
    model = _client(deep_llama, swarm, "slow", compression=policy)
    try:
        deadline = time.monotonic() + 30  # the first server publishes its bandwidth to the second every 2 s
        from client.loop import run_sync

        while time.monotonic() < deadline:
            records = run_sync(model.remote.servers(force=True))
            if any(r.next_bandwidth for r in records.get(0, {}).values()):
                break
            time.sleep(0.5)
        with model.inference_session(max_length=64) as session:
            out = model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, session=session)
            # the 32-token prefill crossed client -> first -> second -> client compressed: three links
            assert session.compressed_links >= 3, session.compressed_links
        error = (out.logits[0] - expected.logits[0]).abs().max()
        # float16 adds <= 2**-11 relative error per value, int8 <= max|row|/254 absolute, on each of three links;
        # through the tiny model's layers and head the first logits moved by 2.7e-4 (float16) and 4.8e-3 (int8)
        assert 0 < error < bound, error
        assert torch.equal(out.sequences, expected.sequences)
    finally:
        model.shutdown()
