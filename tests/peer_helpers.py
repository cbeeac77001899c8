"""Helpers of integration tests on real peers: a client-mode peer joined to a swarm on 127.0.0.1 (for tests
that speak the wire protocol themselves: fuzzers, attackers, probes of a server's state), the server of a
span, a server's ``info``, and a new client's greedy generation."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable

import torch

from swarm.dht import NetworkConfig, Peer, fetch_servers
from swarm.transport import Stream
from swarm.wire import InfoRequest, InfoResponse, expect

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)
TIMEOUT = 30.0


async def join(initial_peers: Iterable[str], **fields) -> Peer:
    """A client-mode peer on 127.0.0.1 in the swarm of ``initial_peers`` (``fields``: more of its NetworkConfig,
    e.g. ``swarm_key``); the caller shuts it down."""
    return await Peer.start(NetworkConfig(initial_peers=tuple(initial_peers), host_maddrs=LOOPBACK, client_mode=True,
                                          **fields))


@contextlib.asynccontextmanager
async def joined(initial_peers: Iterable[str], **fields) -> AsyncIterator[Peer]:
    """:func:`join`, shut down on leaving."""
    peer = await join(initial_peers, **fields)
    try:
        yield peer
    finally:
        await peer.shutdown()


async def server_of(peer: Peer, prefix: str, start: int, end: int) -> str:
    """The peer id of the one server of ``prefix`` that holds exactly blocks ``start:end``."""
    servers = await fetch_servers(peer, prefix, [start])
    (server_id,) = [p for p, r in servers.get(start, {}).items() if (r.start, r.end) == (start, end)]
    return server_id


async def server_info(peer: Peer, server_id: str, timeout: float = TIMEOUT) -> InfoResponse:
    """The server's answer to ``info`` (its blocks, limits and free cache)."""
    stream = await Stream.open(peer.p2p, server_id, "info", timeout)
    try:
        await stream.send(InfoRequest())
        return expect(await stream.receive(timeout), InfoResponse)
    finally:
        stream.close()


def fresh_generate(model_path: str, initial_peers: Iterable[str], ids: torch.Tensor, max_new_tokens: int,
                   **options) -> torch.Tensor:
    """Greedy generation by a new client (no cached routing: it reads the records afresh), never stopping
    early (no end-of-sequence token); ``options``: more of its client config."""
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=list(initial_peers), **options)
    model.generation_config.eos_token_id = None
    try:
        return model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        model.shutdown()
