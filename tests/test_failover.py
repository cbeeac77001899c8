"""Failover on real peers: ``kill -9`` of a server mid-generation changes nothing in the output."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from swarm.errors import SwarmError
from swarm.local_swarm import LocalSwarm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redundant_swarm(tiny_llama, tmp_path_factory):
    """A DHT peer and servers with spare capacity: 0:4, 0:2, 2:4, 2:4."""
    with LocalSwarm(log_dir=str(tmp_path_factory.mktemp("failover"))) as swarm:
        swarm.start_dht()
        servers = {}
        for name, span in (("full", "0:4"), ("left", "0:2"), ("right_a", "2:4"), ("right_b", "2:4")):
            servers[name] = swarm.start_server(tiny_llama, span, "--num-threads", "1", "--dht-prefix", "failover-llama",
                                               wait=False, name=name)
        for proc in servers.values():
            proc.wait_for("Server ONLINE", 180)
        yield swarm, servers


def _client(tiny_llama, swarm):
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=swarm.initial_peers, dht_prefix="failover-llama", request_timeout=20,
        missing_blocks_timeout=3)
    model.generation_config.eos_token_id = None
    return model


class _KillAfter:
    """A streamer that kills a server (SIGKILL to its process group) once ``after`` tokens are out (speculative
    decoding puts several at once)."""

    def __init__(self, swarm, pick, after: int):
        self.swarm, self.pick, self.after, self.count, self.killed = swarm, pick, after, -1, None

    def put(self, value):
        self.count += value.numel() if self.count >= 0 else 1  # the first put is the prompt
        if self.count >= self.after and self.killed is None:
            self.killed = self.pick()
            self.swarm.stop(self.killed, sig=signal.SIGKILL, timeout=5)

    def end(self):
        pass


def _server_for(servers, session, start: int):
    peer_id = next(link.peer_id for link in session.chain if link.start == start)
    return next(proc for proc in servers.values() if peer_id in proc.log())


def test_kill_minus_9_mid_generation_gives_identical_tokens(tiny_llama, redundant_swarm, local_llama):
    swarm, servers = redundant_swarm
    ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(21))
    expected = local_llama.generate(ids, max_new_tokens=20, do_sample=False)

    model = _client(tiny_llama, swarm)
    try:
        # 1. the one-hop chain goes through the full server; kill it after 5 tokens
        with model.inference_session(max_length=64) as session:
            streamer = _KillAfter(swarm, lambda: _server_for(servers, session, 0), after=5)
            out = model.generate(ids, max_new_tokens=20, do_sample=False, session=session, streamer=streamer)
            assert streamer.killed is servers["full"]
            assert session.failovers >= 1
            assert [(link.start, link.end) for link in session.chain] == [(0, 2), (2, 4)]
        assert torch.equal(out, expected)
        # its steps to the full server went in frames (client.step_frames): the broken frames failed over too
        assert any(frames.steps_sent for frames in model.remote._frames.values())

        # 2. now the chain is left -> right_x; kill the second hop (it receives pushed states) in a padded
        # batch: the replacement replays the mask and positions too
        padded = torch.randint(3, 1000, (2, 6), generator=torch.Generator().manual_seed(22))
        mask = torch.ones_like(padded)
        mask[1, :3] = 0
        padded = padded.masked_fill(mask == 0, 0)
        expected = local_llama.generate(padded, attention_mask=mask, max_new_tokens=20, do_sample=False)
        with model.inference_session(max_length=64) as session:
            streamer = _KillAfter(swarm, lambda: _server_for(servers, session, 2), after=7)
            out = model.generate(padded, attention_mask=mask, max_new_tokens=20, do_sample=False, session=session,
                                 streamer=streamer)
            assert streamer.killed in (servers["right_a"], servers["right_b"])
            assert session.failovers >= 1
        assert torch.equal(out, expected)
    finally:
        model.shutdown()


def test_with_every_server_gone_generate_fails_clearly_in_bounded_time(tiny_llama, redundant_swarm):
    swarm, servers = redundant_swarm
    for proc in servers.values():
        swarm.stop(proc, sig=signal.SIGKILL, timeout=5)
    model = _client(tiny_llama, swarm)
    try:
        t0 = time.monotonic()
        with pytest.raises(SwarmError, match=r"blocks 0:") as error:
            model.generate(torch.randint(3, 1000, (1, 4)), max_new_tokens=4, do_sample=False)
        elapsed = time.monotonic() - t0
        assert elapsed < 60, f"took {elapsed:.0f}s"
        assert "server" in str(error.value)
    finally:
        model.shutdown()
