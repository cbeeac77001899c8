"""Peer lifecycles on real processes: stable identities, idle sessions, OFFLINE on shutdown."""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest
import torch

from swarm.dht import fetch_servers
from swarm.local_swarm import LocalSwarm
from swarm.records import ServerState
from swarm.transport import Stream
from swarm.wire import InferenceStep, OpenSession, SessionOpened, StepOutput, expect

from peer_helpers import join, server_info, server_of

pytestmark = pytest.mark.integration
TIMEOUT = 30


def test_dht_identity_path_gives_a_stable_peer_id(tmp_path):
    identity = tmp_path / "dht.key"
    peer_ids = []
    for attempt in range(2):
        with LocalSwarm(log_dir=str(tmp_path / f"run{attempt}")) as swarm:
            maddr = swarm.start_dht("--identity-path", str(identity))
            proc = swarm.procs[-1]
            peer_ids.append(re.search(r"/p2p/(\w+)", maddr).group(1))
            assert swarm.stop(proc) == 0
    assert identity.exists()
    assert peer_ids[0] == peer_ids[1]


def test_idle_session_times_out_and_stopping_announces_offline(tiny_llama, llama_swarm):
    proc = llama_swarm.start_server(tiny_llama, "0:4", "--dht-prefix", "lifecycle-llama", "--session-timeout", "1",
                                    "--num-threads", "1", "--update-period", "30")

    async def scenario():
        peer = await join(llama_swarm.initial_peers)
        try:
            server_id = await server_of(peer, "lifecycle-llama", 0, 4)

            async def tokens_left() -> int:
                return (await server_info(peer, server_id, TIMEOUT)).cache_tokens_left

            before = await tokens_left()
            stream = await Stream.open(peer.p2p, server_id, "inference", TIMEOUT)
            session_id = uuid.uuid4().hex
            await stream.send(OpenSession(session_id=session_id, start=0, end=4, max_length=100))
            expect(await stream.receive(TIMEOUT), SessionOpened)
            await stream.send(InferenceStep(session_id=session_id, hidden=torch.randn(1, 20, 64), start_position=0))
            expect(await stream.receive(TIMEOUT), StepOutput)
            assert await tokens_left() == before - 32  # 20 tokens hold two pages of 16
            # idle for more than --session-timeout: the server closes the stream and frees the cache
            with pytest.raises(Exception, match="closed the stream"):
                await stream.receive(15)
            assert await tokens_left() == before
            stream.close()

            assert llama_swarm.stop(proc) == 0
            log = proc.log()
            assert "Traceback" not in log and "Shutting down" in log
            servers = await fetch_servers(peer, "lifecycle-llama", [0])
            assert servers[0][server_id].state == ServerState.OFFLINE
        finally:
            await peer.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 120))


def test_socket_cleanup_never_connects_to_a_live_peer(tmp_path):
    """Removing stale ``hivemind-*.sock`` files must not connect to live ones: a live peer's handler would log
    a stream that ends at once (other test runs on the machine clean up while this one's servers run)."""
    import os
    import socket

    from swarm.dht import clean_peer_sockets, stale_peer_sockets

    live_path, dead_path = (f"/tmp/hivemind-test-{kind}-{uuid.uuid4().hex[:12]}.sock" for kind in ("live", "dead"))
    live, dead = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    try:
        live.bind(live_path)
        live.listen(1)
        live.setblocking(False)
        dead.bind(dead_path)  # bound, never listening, then closed: a file nobody listens on
        dead.close()
        assert stale_peer_sockets({live_path, dead_path}) == {dead_path}
        with pytest.raises(BlockingIOError):
            live.accept()  # nobody connected to the live socket
        clean_peer_sockets(keep={dead_path})
        assert os.path.exists(dead_path) and os.path.exists(live_path)
        clean_peer_sockets()
        assert not os.path.exists(dead_path) and os.path.exists(live_path)
        with pytest.raises(BlockingIOError):
            live.accept()
    finally:
        live.close()
        for path in (live_path, dead_path):
            if os.path.exists(path):
                os.remove(path)
