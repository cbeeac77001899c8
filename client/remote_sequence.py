"""The remote part of a model: all its blocks, served by whoever holds them in the swarm.

:class:`RemoteSequence` owns the client's DHT peer, finds servers, builds chains
(:mod:`swarm.routing`) and runs no-grad forward passes through them. Retries happen only in
:meth:`RemoteSequence.retrying`, on retryable errors, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import torch

from swarm.config import ClientConfig
from swarm.dht import NetworkConfig, Peer, fetch_servers
from swarm.errors import MissingBlocksError, RetryableError, ServerUnavailable, SwarmError
from swarm.records import ServerState
from swarm.routing import Bans, ChainLink, make_forward_chain, make_latency_chain, missing_blocks
from swarm.wire import BackwardRequest, BackwardResponse, ForwardRequest, ForwardResponse, expect

from swarm import transport

from client.tuning import Extras

logger = logging.getLogger(__name__)
T = TypeVar("T")
Records = list[tuple[ChainLink, torch.Tensor]]  # (link, the hidden states it was sent) of a forward pass

PING_TIMEOUT = 5.0  # seconds for a ping (an info call) before the server is banned
PING_MAX_AGE = 60.0  # seconds a measured ping is trusted


class RemoteSequence:
    def __init__(self, config: ClientConfig, prefix: str, num_blocks: int, model_name: str):
        self.config, self.prefix, self.num_blocks, self.model_name = config, prefix, num_blocks, model_name
        self.bans = Bans()
        self.pings: dict[str, tuple[float, float]] = {}  # peer id -> (round-trip seconds, when measured)
        self._rng = random.Random()
        self._servers: dict[int, dict] = {}  # the last DHT lookup: {block: {peer_id: ServerRecord}}
        self._servers_time = -float("inf")
        self._peer: Peer | None = None
        self._peer_lock: asyncio.Lock | None = None
        self.tuning: Any = None  # the model's client.tuning.Tuning, if it has one

    def extras(self, training: bool = False) -> Extras:
        """What every request of a pass carries now: the current prompts and adapter, if any."""
        return self.tuning.extras(training) if self.tuning is not None else Extras()

    def session_fields(self, start: int, end: int) -> dict[str, Any]:
        """OpenSession keywords for blocks ``start:end`` (the adapter a session's steps run with)."""
        return self.extras().session_fields(start, end) if self.tuning is not None else {}

    async def peer(self) -> Peer:
        if self._peer is None:
            if self._peer_lock is None:
                self._peer_lock = asyncio.Lock()
            async with self._peer_lock:
                if self._peer is None:
                    self._peer = await Peer.start(NetworkConfig(
                        initial_peers=self.config.initial_peers, host_maddrs=self.config.host_maddrs,
                        client_mode=True))
        return self._peer

    async def shutdown(self) -> None:
        if self._peer is not None:
            peer, self._peer = self._peer, None
            await peer.shutdown()

    async def servers(self, force: bool = False) -> dict[int, dict]:
        """Records of every block's servers, looked up again at most every ``routing_refresh`` seconds."""
        if force or time.monotonic() - self._servers_time > self.config.routing_refresh:
            peer = await self.peer()
            self._servers = await fetch_servers(peer, self.prefix, list(range(self.num_blocks)))
            self._servers_time = time.monotonic()
        return self._servers

    async def chain(self, start: int, end: int, min_cache_tokens: int = 0,
                    purpose: str = "inference") -> list[ChainLink]:
        """A chain covering ``start:end``: least latency for inference, throughput-spread for forward.

        Waits up to ``missing_blocks_timeout`` for servers of missing blocks, then raises
        :class:`MissingBlocksError` naming them.
        """
        deadline = time.monotonic() + self.config.missing_blocks_timeout
        delay = 0.1
        force = False
        while True:
            servers = await self.servers(force)
            adapter = self.tuning.active_adapter if self.tuning is not None else ""
            if adapter:  # only servers that preloaded it
                servers = {b: {p: r for p, r in by_peer.items() if adapter in r.adapters}
                           for b, by_peer in servers.items()}
            try:
                if purpose == "forward":
                    return make_forward_chain(servers, start, end, rng=self._rng,
                                              banned=self.bans.banned(time.monotonic()), model=repr(self.model_name))
                await self._ping_candidates(servers, start, end)
                pings = {peer: rtt for peer, (rtt, _) in self.pings.items()}
                return make_latency_chain(servers, start, end, pings=pings, min_cache_tokens=min_cache_tokens,
                                          banned=self.bans.banned(time.monotonic()), push=self.config.use_push,
                                          model=repr(self.model_name))
            except MissingBlocksError:
                if force and time.monotonic() + delay > deadline:
                    raise
                if force:
                    banned = self.bans.banned(time.monotonic())
                    logger.info("Waiting for servers of blocks %s",
                                missing_blocks(servers, start, end, banned, min_cache_tokens))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                force = True  # the cached view may be stale: look again before waiting

    async def _ping_candidates(self, servers: dict[int, dict], start: int, end: int) -> None:
        """Measures round trips to online servers of ``start:end`` not pinged in the last ``PING_MAX_AGE`` s."""
        now = time.monotonic()
        candidates = {peer for b in range(start, end) for peer, record in servers.get(b, {}).items()
                      if record.state == ServerState.ONLINE
                      and now - self.pings.get(peer, (0.0, -float("inf")))[1] > PING_MAX_AGE}
        candidates -= self.bans.banned(now)
        if candidates:
            await asyncio.gather(*(self.ping(peer) for peer in sorted(candidates)))

    async def ping(self, peer_id: str) -> float | None:
        """Round trip of an ``info`` call to ``peer_id`` (smoothed); a server that does not answer is banned."""
        peer = await self.peer()
        try:
            rtt = await transport.ping(peer.p2p, peer_id, PING_TIMEOUT)
        except SwarmError:
            self.ban(peer_id)
            return None
        previous = self.pings.get(peer_id)
        smoothed = rtt if previous is None else 0.7 * previous[0] + 0.3 * rtt
        self.pings[peer_id] = (smoothed, time.monotonic())
        return smoothed

    async def retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Runs ``attempt`` until it succeeds, retrying only retryable errors, at most ``max_retries`` times."""
        errors: list[str] = []
        for _ in range(self.config.max_retries + 1):
            try:
                return await attempt()
            except RetryableError as e:
                errors.append(str(e))
                logger.warning("%s failed (%s); retrying through other servers", what, e)
        raise ServerUnavailable(f"{what} failed {len(errors)} times (the servers may have left the swarm; check "
                                f"which are online with `swarm health`, or start more); errors: " + " | ".join(errors))

    def ban(self, peer_id: str) -> None:
        delay = self.bans.ban(peer_id, time.monotonic())
        self._servers_time = -float("inf")  # what we know about the swarm may be stale too
        logger.info("Not using server %s for %.0fs after a failure", peer_id, delay)

    async def forward(self, hidden: torch.Tensor, extras: Extras | None = None,
                      records: Records | None = None) -> torch.Tensor:
        """``hidden``: [batch, seq, hidden] -> the same after every block (no grad).

        ``extras``: the prompts/adapter every request carries. ``records`` (if given) receives each
        link and its input, which :meth:`backward` needs.
        """
        extras = extras or self.extras()
        position = 0
        while position < self.num_blocks:
            start = position

            async def attempt() -> tuple[torch.Tensor, ChainLink]:
                link = (await self.chain(start, self.num_blocks, purpose="forward"))[0]
                return await self._forward_link(link, hidden, extras), link

            out, link = await self.retrying(f"forward through blocks {start}:{self.num_blocks}", attempt)
            if records is not None:
                records.append((link, hidden))
            position = link.end
            hidden = out.to(hidden.dtype)
        return hidden

    async def _forward_link(self, link: ChainLink, hidden: torch.Tensor, extras: Extras) -> torch.Tensor:
        request = ForwardRequest(start=link.start, end=link.end, hidden=hidden, **extras.fields(link.start, link.end))
        reply = await self._call(link.peer_id, "forward", request)
        out = expect(reply, ForwardResponse).hidden
        try:
            check_output(out, hidden, link.peer_id)
        except RetryableError:
            self.ban(link.peer_id)
            raise
        return out

    async def _call(self, peer_id: str, handler: str, request: Any) -> Any:
        """One request to ``peer_id``; a retryable failure bans it."""
        peer = await self.peer()
        try:
            reply = await transport.call(peer.p2p, peer_id, handler, request, self.config.connect_timeout,
                                         self.config.request_timeout)
            expect(reply, object)  # an ErrorReply raises here, so retryable ones ban the peer
        except RetryableError:
            self.ban(peer_id)
            raise
        self.bans.succeeded(peer_id)
        return reply

    async def backward(self, records: Records, grad: torch.Tensor, extras: Extras) -> tuple[
            torch.Tensor, torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        """Gradients of a forward pass (its ``records``) given ``grad`` of its output.

        Returns the gradient of its input, of ``extras.prompts`` (or None) and of each LoRA A and B.
        A span whose server is gone is recomputed on others: a new chain over its blocks, with a
        forward through all but the last link to get their inputs.
        """
        grad_prompts = None if extras.prompts is None else torch.zeros_like(extras.prompts)
        grads_a = [torch.zeros_like(a) for a in extras.lora_a]
        grads_b = [torch.zeros_like(b) for b in extras.lora_b]
        for link, hidden in reversed(records):
            async def attempt(link: ChainLink = link, hidden: torch.Tensor = hidden,
                              out_grad: torch.Tensor = grad) -> torch.Tensor:
                # the server that ran the forward, unless it failed since (every failure bans its server)
                chain = [link] if link.peer_id not in self.bans.banned(time.monotonic()) else \
                    await self.chain(link.start, link.end, purpose="forward")
                inputs = [hidden]
                for sub in chain[:-1]:
                    inputs.append((await self._forward_link(sub, inputs[-1], extras)).to(hidden.dtype))
                span_grads = []  # applied only if the whole chain succeeds
                for sub, sub_input in zip(reversed(chain), reversed(inputs)):
                    fields = extras.fields(sub.start, sub.end)
                    request = BackwardRequest(start=sub.start, end=sub.end, hidden=sub_input, grad_output=out_grad,
                                              **fields)
                    reply = expect(await self._call(sub.peer_id, "backward", request), BackwardResponse)
                    try:
                        check_output(reply.grad_input, sub_input, sub.peer_id)
                        if len(reply.grad_lora_a) != len(fields["lora_a"]) or len(reply.grad_lora_b) != len(
                                fields["lora_b"]) or (fields["prompts"] is None) != (reply.grad_prompts is None):
                            raise ServerUnavailable(f"server {sub.peer_id} answered a backward request with "
                                                    "gradients that do not match it; not using it")
                    except RetryableError:
                        self.ban(sub.peer_id)
                        raise
                    span_grads.append((sub, reply))
                    out_grad = reply.grad_input.to(grad.dtype)
                for sub, reply in span_grads:
                    if grad_prompts is not None:
                        grad_prompts[sub.start:sub.end] += reply.grad_prompts.to(grad_prompts.dtype)
                    for i, ga, gb in zip(extras.indices(sub.start, sub.end), reply.grad_lora_a, reply.grad_lora_b):
                        grads_a[i] += ga.to(grads_a[i].dtype)
                        grads_b[i] += gb.to(grads_b[i].dtype)
                return out_grad

            grad = await self.retrying(f"backward through blocks {link.start}:{link.end}", attempt)
        return grad, grad_prompts, grads_a, grads_b


def check_output(out: torch.Tensor, sent: torch.Tensor, peer_id: str) -> None:
    """A server must answer with hidden states of the shape it was sent; anything else is its fault."""
    if out.shape != sent.shape or not out.is_floating_point():
        raise ServerUnavailable(f"server {peer_id} returned {out.dtype} {list(out.shape)} for hidden states "
                                f"{list(sent.shape)}; not using it")
