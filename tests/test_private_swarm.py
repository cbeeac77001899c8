"""A private swarm on real peers: members hold a swarm key; an outsider (no key, or another key) is tried
on every path — joining the DHT as each role, reading and writing it with a raw hivemind node, and
opening every RPC handler of a server — while members serve, generate, fine-tune and watch health.

The swarm: ``swarm dht`` and two servers (0:2, 2:4) of a tiny Llama with a tokenizer, all started with
``--swarm-key``; generation goes through both servers with server-to-server push.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import pytest
import torch
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.p2p import P2P, PeerID
from hivemind.utils.timed_storage import get_dht_time

from swarm.command_config import FinetuneConfig, HealthConfig
from swarm.dht import NetworkConfig, Peer, fetch_servers
from swarm.errors import AccessDenied, ServerUnavailable, ServerUnreachable
from swarm.local_swarm import LocalSwarm
from swarm.records import ServerRecord, ServerState, block_key, encode_record
from swarm.swarm_key import SwarmKey, use_swarm_key, write_key_file
from swarm.tiny import make_tiny_model, make_tiny_tokenizer
from swarm.transport import Stream
from swarm.wire import (
    HANDLERS,
    BackwardRequest,
    ForwardRequest,
    InferenceStep,
    InferenceSteps,
    InfoRequest,
    InfoResponse,
    OpenSession,
    expect,
)

from peer_helpers import joined

pytestmark = pytest.mark.integration
LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
TIMEOUT = 30
EXAMPLES = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"} for a in range(3) for b in range(2)]


class PrivateSwarm:
    def __init__(self, swarm: LocalSwarm, model: str, key: str, wrong_key: str, data: str):
        self.swarm, self.model, self.key, self.wrong_key, self.data = swarm, model, key, wrong_key, data
        self.initial_peers = tuple(swarm.initial_peers)
        self.prefix = "tiny-private"


@pytest.fixture(scope="module")
def private_swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("private-swarm")
    model = make_tiny_model(str(root / "tiny-private"), "llama")
    make_tiny_tokenizer(model, texts=[f"{e['instruction']} {e['output']}" for e in EXAMPLES])
    key, wrong_key = write_key_file(str(root / "swarm.key")), write_key_file(str(root / "other.key"))
    assert key != wrong_key
    data = root / "data.json"
    data.write_text(json.dumps(EXAMPLES))
    with LocalSwarm(log_dir=str(root / "logs")) as swarm:
        swarm.start_dht("--swarm-key", str(root / "swarm.key"))
        for span in ("0:2", "2:4"):
            swarm.start_server(model, span, "--num-threads", "1", "--throughput", "100", "--swarm-key",
                               str(root / "swarm.key"), wait=False)
        for proc in swarm.procs[1:]:
            proc.wait_for("Server ONLINE", 180)
        yield PrivateSwarm(swarm, model, str(root / "swarm.key"), str(root / "other.key"), str(data))


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def member_view(private_swarm: PrivateSwarm) -> dict[int, dict[str, ServerRecord]]:
    async with joined(private_swarm.initial_peers, swarm_key=private_swarm.key) as peer:
        return await fetch_servers(peer, private_swarm.prefix, range(4))


# ---------------------------------------------------------------- members


def test_members_generate_fine_tune_and_see_a_healthy_model(private_swarm, tmp_path):
    from transformers import AutoModelForCausalLM

    from client.finetune import run_finetune
    from health.crawler import Crawler
    from swarm import AutoDistributedModelForCausalLM
    from swarm.swarm_state import model_health

    local = AutoModelForCausalLM.from_pretrained(private_swarm.model, dtype=torch.float32).eval()
    local.generation_config.eos_token_id = None
    ids = torch.randint(3, 500, (1, 6), generator=torch.Generator().manual_seed(3))
    model = AutoDistributedModelForCausalLM.from_pretrained(
        private_swarm.model, initial_peers=private_swarm.initial_peers, swarm_key=private_swarm.key)
    model.generation_config.eos_token_id = None
    try:  # through both servers, the first pushing to the second
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                           local.generate(ids, max_new_tokens=8, do_sample=False))
    finally:
        model.shutdown()

    config = FinetuneConfig(initial_peers=private_swarm.initial_peers, model=private_swarm.model,
                            data=private_swarm.data, output=str(tmp_path / "adapter"), max_steps=2, save_every=2,
                            swarm_key=private_swarm.key)
    assert run_finetune(config) == 0  # forward and backward streams, with the key
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    async def crawl():
        health = HealthConfig(initial_peers=private_swarm.initial_peers, host_maddrs=LOOPBACK,
                              swarm_key=private_swarm.key)
        async with Crawler(health) as crawler:
            return await crawler.crawl_once()

    snapshot = run(crawl())
    (seen,) = snapshot.models
    reachable = {p: r.ok for p, r in seen.probes.items()}
    assert seen.prefix == private_swarm.prefix and snapshot.error is None
    assert model_health(seen.servers, seen.record.num_blocks, reachable).healthy and all(reachable.values())


# ---------------------------------------------------------------- outsiders


@pytest.mark.parametrize("key", [None, "wrong"])
def test_outsiders_cannot_join_as_any_role(private_swarm, key):
    """Every role joins through Peer.start: a client in-process (with no key and with another key); swarm dht,
    serve, health, api and finetune as the commands a user runs."""
    from swarm import AutoDistributedModelForCausalLM

    key_file = private_swarm.wrong_key if key else None
    hint = r"check that swarm key \w+ \(--swarm-key\) is the swarm's" if key else "answers only peers with its key"
    with pytest.raises(ServerUnavailable, match=hint):
        run(Peer.start(NetworkConfig(initial_peers=private_swarm.initial_peers, host_maddrs=LOOPBACK,
                                     client_mode=True, swarm_key=key_file)))
    model = AutoDistributedModelForCausalLM.from_pretrained(
        private_swarm.model, initial_peers=private_swarm.initial_peers, swarm_key=key_file, retry_deadline=1.0)
    try:  # a short retry budget: the reason comes as it is
        with pytest.raises(ServerUnavailable, match=hint):
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    finally:
        model.shutdown()
    if key:
        return  # the commands below take the same path; once is enough
    flags = ["--initial-peers", *private_swarm.initial_peers]
    commands = {
        "dht": ["dht", "--host-maddrs", LOOPBACK[0], *flags],
        "serve": ["serve", "--model", private_swarm.model, "--blocks", "0:4", "--host-maddrs", LOOPBACK[0], *flags],
        "health": ["health", "--port", "0", "--host-maddrs", LOOPBACK[0], *flags],
        "api": ["api", "--port", "0", "--host-maddrs", LOOPBACK[0], *flags],
        "finetune": ["finetune", "--model", private_swarm.model, "--data", private_swarm.data, "--output",
                     str(private_swarm.swarm.log_dir) + "/outsider-adapter", "--max-steps", "1", *flags],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "swarm.cli", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                    start_new_session=True) for name, args in commands.items()}
    try:
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 2, f"swarm {name} exited with {proc.returncode}: {out[-2000:]}"
            assert "could not join the swarm" in out and "--swarm-key" in out, out[-2000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    servers = run(member_view(private_swarm))  # the outsider server announced nothing
    assert {(r.start, r.end) for records in servers.values() for r in records.values()} == {(0, 2), (2, 4)}


def test_an_outsider_dht_node_can_neither_read_nor_write(private_swarm):
    """A hivemind node without the key, started against the members anyway: every request it makes goes
    unanswered, so it reads nothing, stores nothing, and members never take it into their routing tables."""
    async def scenario() -> list[str]:
        members = await member_view(private_swarm)
        member_ids = {p for records in members.values() for p in records}
        member_ids.add(private_swarm.initial_peers[0].rsplit("/p2p/", 1)[1])
        p2p = await P2P.create(initial_peers=list(private_swarm.initial_peers), host_maddrs=list(LOOPBACK))
        try:
            node = await DHTNode.create(p2p=p2p, initial_peers=list(private_swarm.initial_peers), wait_timeout=3,
                                        ensure_bootstrap_success=False, cache_locally=False)
            try:
                key = block_key(private_swarm.prefix, 0)
                assert await node.get(key, latest=True) is None
                fake = encode_record(ServerRecord(state=ServerState.ONLINE, start=0, end=4))
                for member in member_ids:
                    peer = PeerID.from_base58(member)
                    assert await node.protocol.call_find(peer, [DHTID.generate(source=key)]) is None
                    stored = await node.protocol.call_store(peer, [DHTID.generate(source=key)], [fake],
                                                            get_dht_time() + 60, subkeys=[p2p.peer_id.to_base58()])
                    assert stored is None
                    assert await node.protocol.call_ping(peer) is None
                return sorted(member_ids)
            finally:
                await node.shutdown()
        finally:
            await p2p.shutdown()

    run(scenario())
    servers = run(member_view(private_swarm))  # members are unaffected and see only each other
    assert {(r.start, r.end) for records in servers.values() for r in records.values()} == {(0, 2), (2, 4)}


async def _open(p2p, server: str, handler: str) -> Stream:
    """A stream from a fresh p2pd, which may not know the server's address for a moment after it starts."""
    for _ in range(9):
        try:
            return await Stream.open(p2p, server, handler, TIMEOUT)
        except ServerUnreachable:
            await asyncio.sleep(1)
    return await Stream.open(p2p, server, handler, TIMEOUT)


@pytest.mark.parametrize("key", [None, "wrong"])
def test_outsiders_are_not_served_by_any_handler(private_swarm, key):
    async def scenario() -> None:
        members = await member_view(private_swarm)
        (server,) = {p for p, r in members[0].items() if (r.start, r.end) == (0, 2)}
        p2p = await P2P.create(initial_peers=list(private_swarm.initial_peers), host_maddrs=list(LOOPBACK))
        if key:
            use_swarm_key(p2p, SwarmKey.from_file(private_swarm.wrong_key))
        try:
            hidden = torch.randn(1, 3, 64)
            requests = {
                "info": InfoRequest(),
                "forward": ForwardRequest(start=0, end=2, hidden=hidden),
                "backward": BackwardRequest(start=0, end=2, hidden=hidden, grad_output=hidden),
                "inference": OpenSession(session_id=uuid.uuid4().hex, start=0, end=2, max_length=8),
                "push": InferenceStep(session_id=uuid.uuid4().hex, hidden=hidden, start_position=0),
                "steps": InferenceSteps(session_ids=(uuid.uuid4().hex,), hidden=(hidden,), start_positions=(0,),
                                        step_ids=(0,)),
            }
            assert set(requests) == set(HANDLERS)  # every handler
            for handler, request in requests.items():
                stream = await _open(p2p, server, handler)
                try:
                    if not key:  # with a key, the (wrong) proof Stream.open sent is refused at once: a request
                        await stream.send(request)  # sent after it could find the stream closed
                    with pytest.raises(AccessDenied, match="private swarm only") as error:
                        expect(await stream.receive(TIMEOUT), InfoResponse)
                    assert ("another swarm key" if key else "without proof of the swarm key") in str(error.value)
                    assert "--swarm-key" in str(error.value) and handler in str(error.value)
                finally:
                    stream.close()
            # the same peer with the swarm's key is served
            use_swarm_key(p2p, SwarmKey.from_file(private_swarm.key))
            stream = await Stream.open(p2p, server, "info", TIMEOUT)
            try:
                await stream.send(InfoRequest())
                info = expect(await stream.receive(TIMEOUT), InfoResponse)
                assert (info.start, info.end, info.num_blocks) == (0, 2, 4)
            finally:
                stream.close()
        finally:
            await p2p.shutdown()

    started = time.monotonic()
    run(scenario())
    assert time.monotonic() - started < 60
