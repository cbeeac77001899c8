"""Which servers a client uses: its view of the swarm, the chains it plans through it, and whom it avoids.

:class:`Routing` (the base of :class:`client.remote_sequence.RemoteSequence`) owns the client's DHT peer and
what it knows of the servers: the last lookup of every block's records (:meth:`Routing.servers`, which also
finds the model's prefix), round trips measured by pings, bans after failures (:meth:`Routing.ban`: a dead
server is pinged now and then in case it comes back, :meth:`Routing._revive`), servers that were slow lately
(they lost a hedged race) and the reports of servers caught computing wrong. :meth:`Routing.chain` plans a
chain over some blocks from all of it with the pure planners of :mod:`swarm.routing`, waiting a while for
servers of missing blocks.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Collection
from typing import Any

from swarm.config import ClientConfig
from swarm.dht import NetworkConfig, Peer, fetch_index, fetch_servers, publish_report
from swarm.errors import (
    MissingBlocksError,
    ModelError,
    ServerRefused,
    ServerUnavailable,
    ServerUnreachable,
    SwarmError,
    WrongResult,
)
from swarm.records import ReportRecord, ServerRecord, ServerState
from swarm.retry import Attempts
from swarm.routing import (
    DEFAULT_PING,
    ChainLink,
    allowed_servers,
    format_blocks,
    make_forward_chain,
    make_latency_chain,
    missing_blocks,
    quant_excluded,
)
from swarm.served import find_prefix, same_config, served_line

from swarm import transport

from client import hedging

logger = logging.getLogger(__name__)

PING_TIMEOUT = 5.0  # seconds for a ping (an info call) before the server is banned
PING_MAX_AGE = 60.0  # seconds a measured ping is trusted
REPORT_TTL = 600.0  # seconds a report of a wrong server stays in the DHT (re-published with every new one)
MAX_REPORTS = 64  # servers one client reports at most (the newest)
SLOW_MEMORY = 600.0  # seconds a server that lost a hedged race costs chains more
# a call waits this many times missing_blocks_timeout for servers of blocks that only servers which failed lately
# hold, none of which ever answered this client (one may be restarting: it announces itself once its process is up,
# JOINING while it loads, and is waited for then); if one of them answered this client before it failed, until the
# call's retry deadline (while its record lives)
RESTART_GRACE = 3.0
# a server found dead (it could not be dialed) is pinged this many times, 1 s after and then at doubling intervals
# of at most REVIVE_MAX_INTERVAL s (~110 s in all, within the 150 s its last record lives): one restarted with the
# same identity answers before its new record shows in lookups (a restarted server's first announcements may even
# fail to be stored, and the next comes an --update-period later), and is used again at once
REVIVE_PINGS = 10
REVIVE_FIRST_INTERVAL = 1.0
REVIVE_MAX_INTERVAL = 16.0


class Routing:
    """A client's view of the servers of one model. ``prefix``: the model's DHT namespace
    (``config.dht_prefix``, else the default of its name, which the first lookup may replace by the swarm's
    prefix for the same config.json: see :meth:`servers`)."""

    def __init__(self, config: ClientConfig, prefix: str, num_blocks: int, model_name: str, config_digest: str = ""):
        self.config, self.prefix, self.num_blocks, self.model_name = config, prefix, num_blocks, model_name
        self.config_digest = config_digest
        self._prefix_found = config.dht_prefix is not None  # given explicitly: used as it is
        self.policy = config.retry_policy
        self.bans = self.policy.bans()
        self.pings: dict[str, tuple[float, float]] = {}  # peer id -> (round-trip seconds, when measured)
        self.bandwidths: dict[str, float] = {}  # peer id -> bytes/s, where a probe could tell (slow links)
        self._records: dict[str, Any] = {}  # peer id -> its ServerRecord in the last lookup
        self._rng = random.Random()
        self._servers: dict[int, dict] = {}  # the last DHT lookup: {block: {peer_id: ServerRecord}}
        self._servers_time = -float("inf")
        self._peer: Peer | None = None
        self._peer_lock: asyncio.Lock | None = None
        self.tuning: Any = None  # the model's client.tuning.Tuning, if it has one (its adapter picks servers)
        self._slow: dict[str, tuple[float, float]] = {}  # peer id -> (seconds it kept a request, when)
        self.reports: dict[str, str] = {}  # peer id -> what this client found it computing wrong
        self._probes: set[asyncio.Task] = set()  # pings of servers that went silent: dead or alive?
        self._reviving: set[str] = set()  # dead servers being pinged in case they come back (_revive)

    async def peer(self) -> Peer:
        """This client's DHT peer, started (joining the swarm) on first use."""
        if self._peer is None:
            if self._peer_lock is None:
                self._peer_lock = asyncio.Lock()
            async with self._peer_lock:
                if self._peer is None:
                    self._peer = await Peer.start(NetworkConfig(
                        initial_peers=self.config.initial_peers, host_maddrs=self.config.host_maddrs,
                        client_mode=True, swarm_key=self.config.swarm_key))
        return self._peer

    async def shutdown(self) -> None:
        for task in list(self._probes):
            task.cancel()
        if self._probes:
            await asyncio.wait(list(self._probes), timeout=5)
        if self._peer is not None:
            peer, self._peer = self._peer, None
            await peer.shutdown()

    async def servers(self, force: bool = False) -> dict[int, dict]:
        """Records of every block's servers, looked up again at most every ``routing_refresh`` seconds."""
        if force or time.monotonic() - self._servers_time > self.config.routing_refresh:
            peer = await self.peer()
            if not self._prefix_found:
                await self._find_prefix(peer)
            self._servers = await fetch_servers(peer, self.prefix, list(range(self.num_blocks)))
            self._servers_time = time.monotonic()
            self._records = {p: r for by_peer in self._servers.values() for p, r in by_peer.items()}
        return self._servers

    async def _find_prefix(self, peer: Peer) -> None:
        """Without ``dht_prefix``, the model is looked for under the default prefix of its name; if the swarm
        has nothing there but serves exactly one model with the same config.json (the same model in a folder
        of another name), that one is used, with a warning (a fine-tune may share its base model's config)."""
        index = await fetch_index(peer)
        self._prefix_found = True
        found = find_prefix(index, self.prefix, self.config_digest, self.num_blocks)
        if found is not None and found != self.prefix:
            logger.warning("Nothing is served under DHT prefix %r (the name of %s); using %r (served as %s), the "
                           "swarm's only model with the same config.json. Pass dht_prefix=%r to say so", self.prefix,
                           self.model_name, found, index[found].name, found)
            self.prefix = found
        elif found is None and len(same_config(index, self.config_digest, self.num_blocks)) > 1:
            choices = ", ".join(f"{p!r} ({index[p].name})" for p in same_config(index, self.config_digest,
                                                                              self.num_blocks))
            raise ModelError(f"nothing is served under DHT prefix {self.prefix!r}, and several models of the swarm "
                             f"have the same config.json: {choices}; pass dht_prefix= to choose one")

    async def _missing_blocks(self, error: MissingBlocksError) -> MissingBlocksError:
        """``error``, and if no server announced the prefix it looked under, that prefix and what the swarm
        serves instead (read from the model index)."""
        try:
            index = await fetch_index(await self.peer())
        except Exception as e:  # the error is news enough without the index
            logger.debug("Reading the model index failed: %s", e)
            return error
        line = served_line(self.prefix, index)
        return error if line is None else MissingBlocksError(f"{error}. {line}")

    async def chain(self, start: int, end: int, min_cache_tokens: int = 0, purpose: str = "inference",
                    attempts: Attempts | None = None, exclude: Collection[str] = frozenset(),
                    wait: bool = True, after: str | None = None, then: str | None = None) -> list[ChainLink]:
        """A chain covering ``start:end``: least latency for inference (``after``/``then``: the servers before
        and after it, see :func:`~swarm.routing.make_latency_chain`), throughput-spread for forward, uniformly
        drawn for a check (:mod:`client.verifier`).

        Never through banned servers, ``exclude``, nor servers that refused the request of the call whose
        ``attempts`` these are. Waits up to ``missing_blocks_timeout`` for servers of missing blocks
        (:data:`RESTART_GRACE` times as long if only servers that failed lately hold them: one may be restarting;
        until the call's retry deadline while a server of them is joining, or if only servers that failed lately
        hold them and one of those served this client before: a server that was working and died is most likely
        restarting, and its record, which stands for it until then, expires otherwise), then raises
        :class:`MissingBlocksError` naming them (without ``wait``: at once, after one fresh lookup). If only
        servers that refused the request hold them, raises their refusal at once: the request, not the swarm, is
        what they object to.
        A server that was slow lately (:meth:`slow`) costs the chain what it cost then.
        """
        now = time.monotonic()
        deadline = now + self.config.missing_blocks_timeout
        patience = max(deadline, attempts.deadline) if attempts is not None else deadline
        grace = max(deadline, min(patience, now + RESTART_GRACE * self.config.missing_blocks_timeout))
        delay = 0.1
        force = False
        refused = attempts.refused if attempts is not None else {}
        while True:
            every_server = await self.servers(force)
            adapter = self.tuning.active_adapter if self.tuning is not None else ""
            servers = allowed_servers(every_server, adapter=adapter, allowed_quant=self.config.allowed_quant)
            banned = self.bans.banned(time.monotonic(), every_server) | set(exclude) | set(refused)
            try:
                if purpose in ("forward", "check"):  # a check draws its servers uniformly
                    return make_forward_chain(servers, start, end, rng=self._rng, banned=banned,
                                              model=repr(self.model_name), by_throughput=purpose == "forward")
                await self._ping_candidates(servers, start, end)
                pings = {peer: rtt + self._slowness(peer) for peer, (rtt, _) in self.pings.items()}
                return make_latency_chain(servers, start, end, pings=pings, min_cache_tokens=min_cache_tokens,
                                          banned=banned | self.bans.banned(time.monotonic()),
                                          push=self.config.use_push, after=after, then=then,
                                          model=repr(self.model_name))
            except MissingBlocksError as e:
                missing = missing_blocks(servers, start, end, banned, min_cache_tokens)
                if refused and not missing_blocks(servers, start, end, banned - set(refused), min_cache_tokens):
                    raise _refusal(refused, missing) from None
                lost = self.bans.banned(time.monotonic(), every_server) - self.bans.distrusted()
                known = lost & self.bans.served()
                until = (patience if _joining(servers, missing)
                         or known and not missing_blocks(servers, start, end, banned - known, min_cache_tokens)
                         else grace if lost and not missing_blocks(servers, start, end, banned - lost, min_cache_tokens)
                         else deadline)
                error = MissingBlocksError(f"{e}{quant_excluded(every_server, missing, self.config.allowed_quant)}")
                if not wait and force:  # (a cached view may predate a restart: looked again once first)
                    raise error from None
                if force and time.monotonic() + delay > until:
                    raise await self._missing_blocks(error) from None
                if force:
                    logger.info("Waiting for servers of blocks %s", missing)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                force = True  # the cached view may be stale: look again before waiting

    async def _ping_candidates(self, servers: dict[int, dict], start: int, end: int) -> None:
        """Measures round trips to online servers of ``start:end`` not pinged in the last ``PING_MAX_AGE`` s."""
        now = time.monotonic()
        candidates = {peer for b in range(start, end) for peer, record in servers.get(b, {}).items()
                      if record.state == ServerState.ONLINE
                      and now - self.pings.get(peer, (0.0, -float("inf")))[1] > PING_MAX_AGE}
        candidates -= self.bans.banned(now, servers)
        if candidates:
            await asyncio.gather(*(self.ping(peer) for peer in sorted(candidates)))

    async def ping(self, peer_id: str) -> float | None:
        """Round trip of an ``info`` call to ``peer_id`` (smoothed); a server that does not answer is banned."""
        peer = await self.peer()
        t0 = time.monotonic()
        try:
            rtt = await transport.ping(peer.p2p, peer_id, PING_TIMEOUT)
        except SwarmError as e:
            self.ban(peer_id, e, time.monotonic() - t0, probe=False)
            return None
        previous = self.pings.get(peer_id)
        smoothed = rtt if previous is None else 0.7 * previous[0] + 0.3 * rtt
        self.pings[peer_id] = (smoothed, time.monotonic())
        if self.config.compression != "none":  # only compression needs to know
            try:
                bandwidth = await transport.bandwidth(peer.p2p, peer_id, rtt, PING_TIMEOUT)
            except SwarmError:
                bandwidth = None
            if bandwidth is None:
                self.bandwidths.pop(peer_id, None)
            else:
                known = self.bandwidths.get(peer_id)
                self.bandwidths[peer_id] = bandwidth if known is None else 0.7 * known + 0.3 * bandwidth
        return smoothed

    def slow(self, peer_id: str, seconds: float, error: BaseException) -> None:
        """``peer_id`` kept a request ``seconds`` longer than it should have (another server answered it first):
        banned for that long, and chains through it cost that much more for :data:`SLOW_MEMORY` seconds."""
        self._slow[peer_id] = (seconds, time.monotonic())
        self.ban(peer_id, error, seconds)

    def _slowness(self, peer_id: str) -> float:
        seconds, when = self._slow.get(peer_id, (0.0, 0.0))
        return seconds if time.monotonic() - when < SLOW_MEMORY else 0.0

    def lost_race(self, link: ChainLink, seconds: float, error: BaseException | None) -> None:
        """Another server answered first for ``link``, whose server failed (``error``) or was just slow."""
        if error is not None:
            self.ban(link.peer_id, error, seconds)
        else:
            self.slow(link.peer_id, seconds, ServerUnavailable(
                f"server {link.peer_id} took over {seconds:.1f}s for blocks {link.start}:{link.end}, far more than it "
                "advertised; another server answered first"))

    def record(self, peer_id: str, block: int) -> ServerRecord | None:
        """What ``peer_id`` announced for ``block`` in the last lookup."""
        return self._servers.get(block, {}).get(peer_id)

    def records(self, start: int, end: int) -> dict[str, ServerRecord]:
        """Every server of some block of ``start:end`` in the last lookup, with one of its records."""
        return {peer_id: record for block in range(start, end) for peer_id, record in self._servers.get(block, {}).items()}

    def hedge_after(self, link: ChainLink, tokens: int) -> float:
        """Seconds after which ``tokens`` tokens through ``link`` are asked of another server too
        (:mod:`client.hedging`)."""
        expected = hedging.expected_seconds(self.record(link.peer_id, link.start), link.end - link.start, tokens)
        return hedging.hedge_after(expected, self.pings.get(link.peer_id, (DEFAULT_PING, 0.0))[0])

    def link_bandwidth(self, source: str | None, target: str | None) -> float | None:
        """Bytes/s from ``source`` to ``target`` (peer ids; None: this client), as measured by this client or
        published by ``source`` (``next_bandwidth``); None if unknown."""
        if source is None or target is None:
            return self.bandwidths.get(source or target or "")
        record = self._records.get(source)
        return None if record is None else record.next_bandwidth.get(target)

    def ban(self, peer_id: str, error: BaseException | None = None, cost: float = 0.0, probe: bool = True) -> None:
        """Stops using ``peer_id`` after ``error``, which cost ``cost`` seconds: for at least as long; if it
        could not be dialed, until it announces itself again or answers a ping (:meth:`_revive`); if it computed
        wrong, for good. A server that closed a stream or stopped answering is pinged at once (with ``probe``): if
        it cannot be dialed any more (its process died), it is dead until then too."""
        delay = self.bans.ban(peer_id, time.monotonic(), cost)
        self._servers_time = -float("inf")  # what we know about the swarm may be stale too
        if isinstance(error, WrongResult):
            self.bans.distrust(peer_id)
            logger.warning("Not using server %s again: %s", peer_id, error)
        elif isinstance(error, ServerUnreachable):
            self.bans.dead(peer_id, self._servers)
            logger.info("Not using server %s until it announces itself again: %s", peer_id, error)
            if peer_id not in self._reviving:
                self._reviving.add(peer_id)
                task = asyncio.ensure_future(self._revive(peer_id))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)
        else:
            logger.info("Not using server %s for %.0fs after a failure", peer_id, delay)
            if probe and isinstance(error, ServerUnavailable):
                task = asyncio.ensure_future(self.ping(peer_id))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)

    async def _revive(self, peer_id: str) -> None:
        """Pings dead ``peer_id`` now and then (:data:`REVIVE_PINGS`) while it stays dead: if it answers, it is a
        new process and is used again, whether or not its new record has shown in lookups."""
        try:
            interval = REVIVE_FIRST_INTERVAL
            for _ in range(REVIVE_PINGS):
                await asyncio.sleep(interval)
                if not self.bans.is_dead(peer_id):
                    return  # its new record showed
                if await self.ping(peer_id) is not None:
                    self.bans.revive(peer_id)
                    logger.info("Server %s answers again: using it again", peer_id)
                    return
                interval = min(2 * interval, REVIVE_MAX_INTERVAL)
        finally:
            self._reviving.discard(peer_id)

    async def report(self, peer_id: str, reason: str) -> None:
        """Tells the swarm that ``peer_id`` computed wrong: this client's signed record under ``"{prefix}.reports"``
        lists every server it caught (the health page shows them). Best effort: a failed store is logged."""
        self.reports.pop(peer_id, None)
        self.reports[peer_id] = reason[:200]
        while len(self.reports) > MAX_REPORTS:
            del self.reports[next(iter(self.reports))]
        try:
            stored = await publish_report(await self.peer(), self.prefix, ReportRecord(wrong=dict(self.reports)),
                                          REPORT_TTL)
        except Exception as e:  # reporting must never break the client's own work
            logger.warning("Could not report server %s in the DHT: %s", peer_id, e)
            return
        if not stored:
            logger.warning("Could not report server %s in the DHT: no peer stored the report", peer_id)


def _joining(servers: dict[int, dict], blocks: list[int]) -> bool:
    """True if a server of some of ``blocks`` is joining (loading them, or restarting): worth waiting for."""
    return any(record.state == ServerState.JOINING and record.start <= b < record.end
               for b in blocks for record in servers.get(b, {}).values())


def _refusal(refused: dict[str, ServerRefused], blocks: list[int]) -> SwarmError:
    """The error to raise when only servers that refused a request hold ``blocks``: the refusal they sent, in
    its own class (e.g. a BadRequest naming the server's limit), saying so."""
    peer_id, error = next(reversed(refused.items()))  # the latest
    refusal = error.refusal()
    return type(refusal)(f"every server of blocks {format_blocks(blocks)} that was tried refused this request; "
                         f"server {peer_id} said: {refusal}")
