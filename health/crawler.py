"""The crawler: a DHT client that reads the model index and every block key, and probes servers.

``async with Crawler(config) as crawler:`` joins the swarm (a client-mode :class:`swarm.dht.Peer`)
and crawls every ``refresh_period`` seconds until the block exits; ``crawler.snapshot`` is the
latest complete :class:`Snapshot` (replaced whole, never mutated, so readers need no lock). A crawl
that fails keeps the previous models and reports the error in the new snapshot; the loop goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from types import TracebackType

from swarm.config import HealthConfig
from swarm.dht import NetworkConfig, Peer, fetch_models, fetch_reports, fetch_servers
from swarm.records import ModelRecord, ServerRecord, ServerState

from health.probe import ProbeCache, ProbeResult, probe_server

logger = logging.getLogger(__name__)

DHT_TIMEOUT = 30.0  # seconds one crawl may spend reading the DHT
MAX_BLOCKS = 4096  # a model index entry claiming more blocks is not crawled (a buggy or hostile peer)


@dataclasses.dataclass(frozen=True)
class ModelSnapshot:
    """One model as the last crawl saw it."""

    prefix: str
    record: ModelRecord
    servers: Mapping[int, Mapping[str, ServerRecord]]  # {block: {peer id: record}}, as fetch_servers gives
    probes: Mapping[str, ProbeResult]  # for every server that announced ONLINE
    addrs: Mapping[str, tuple[str, ...]]  # peer id -> multiaddrs this service is connected to
    # peer id -> {reporter's peer id: why}: clients that caught it computing wrong (client.verifier)
    reports: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The swarm as of the last crawl; the empty default means no crawl has finished yet."""

    models: tuple[ModelSnapshot, ...] = ()
    updated_at: float | None = None  # wall clock (unix seconds) when the last successful crawl ended
    crawl_duration: float | None = None  # seconds the last crawl took, successful or not
    error: str | None = None  # why the last crawl failed; None if it succeeded
    crawls: int = 0  # crawls attempted
    crawl_errors: int = 0  # crawls that failed


@dataclasses.dataclass(frozen=True)
class Reachability:
    """The answer of ``/api/v1/is_reachable``: did a connection open, and does the peer serve ``info``."""

    peer_id: str
    reachable: bool  # a libp2p connection to the peer is open after the attempt
    serves_info: bool  # it answered the info RPC: it is a server of this swarm
    rtt: float | None
    error: str | None


class Crawler:
    """Owns the DHT client, the probe cache and the crawl loop. Use as ``async with``."""

    def __init__(self, config: HealthConfig):
        self.config = config
        self.snapshot = Snapshot()
        self.cache = ProbeCache(config.probe_cache_ttl)
        self._peer: Peer | None = None
        self._task: asyncio.Task[None] | None = None
        self._probes = asyncio.Semaphore(config.max_probes)

    @property
    def peer(self) -> Peer:
        if self._peer is None:
            raise RuntimeError("the crawler is not started: use `async with Crawler(config) as crawler`")
        return self._peer

    async def __aenter__(self) -> "Crawler":
        network = NetworkConfig(initial_peers=self.config.initial_peers, host_maddrs=self.config.host_maddrs,
                                client_mode=True)
        self._peer = await Peer.start(network)  # unreachable initial peers: the one join-failure message
        self._task = asyncio.create_task(self._loop(), name="health crawler")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        failure: BaseException | None = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception as e:  # the loop died of a bug: its owner re-raises it below
                failure = e
        if self._peer is not None:
            try:
                await asyncio.wait_for(self._peer.shutdown(), 10)
            except Exception as e:  # p2pd may already be gone (Ctrl+C signals the whole process group)
                logger.warning("Stopping the DHT client failed: %s", e or type(e).__name__)
            self._peer = None
        if failure is not None and exc is None:
            raise failure

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            await self.crawl_once()
            await asyncio.sleep(max(0.0, self.config.refresh_period - (time.monotonic() - started)))

    async def crawl_once(self) -> Snapshot:
        """Crawls the model index, every block key and every online server; publishes and returns the snapshot.

        A failed crawl does not raise: it keeps the previous models and sets ``error``.
        """
        started = time.perf_counter()
        previous = self.snapshot
        try:
            models = await self._crawl()
        except Exception as e:
            logger.warning("Crawl failed (the page keeps the previous state): %s", e or type(e).__name__)
            self.snapshot = dataclasses.replace(
                previous, crawl_duration=time.perf_counter() - started, error=str(e) or type(e).__name__,
                crawls=previous.crawls + 1, crawl_errors=previous.crawl_errors + 1)
        else:
            self.snapshot = Snapshot(models=models, updated_at=time.time(),
                                     crawl_duration=time.perf_counter() - started, error=None,
                                     crawls=previous.crawls + 1, crawl_errors=previous.crawl_errors)
        return self.snapshot

    async def _crawl(self) -> tuple[ModelSnapshot, ...]:
        peer = self.peer
        index = await asyncio.wait_for(fetch_models(peer), DHT_TIMEOUT)
        crawlable: dict[str, ModelRecord] = {}
        for prefix, record in sorted(index.items()):
            if record.num_blocks > MAX_BLOCKS:
                logger.warning("Model %r claims %d blocks (more than %d); not crawled", prefix, record.num_blocks,
                               MAX_BLOCKS)
                continue
            crawlable[prefix] = record
        found = await asyncio.wait_for(asyncio.gather(
            *(fetch_servers(peer, prefix, list(range(r.num_blocks))) for prefix, r in crawlable.items())),
            DHT_TIMEOUT)
        by_model = dict(zip(crawlable, found))
        reports = dict(zip(crawlable, await asyncio.wait_for(asyncio.gather(
            *(self._reports(prefix) for prefix in crawlable)), DHT_TIMEOUT)))

        online = sorted({p for servers in by_model.values() for records in servers.values()
                         for p, r in records.items() if r.state == ServerState.ONLINE})
        # every crawl asks each server again (an answer from the last crawl is too old): a server that dies
        # shows as unreachable after one crawl, within refresh_period + probe_timeout
        fresh = self.config.refresh_period / 2
        probes = dict(zip(online, await asyncio.gather(*(self.probe(p, max_age=fresh) for p in online))))
        self.cache.prune(time.monotonic())
        addrs = await self._connected_addrs() if self.config.show_ips else {}

        snapshots = []
        for prefix, record in crawlable.items():
            servers = by_model[prefix]
            peers = {p for records in servers.values() for p in records}
            snapshots.append(ModelSnapshot(
                prefix=prefix, record=record, servers=servers,
                probes={p: probes[p] for p in peers if p in probes},
                addrs={p: addrs[p] for p in peers if p in addrs}, reports=reports[prefix]))
        return tuple(snapshots)

    async def _reports(self, prefix: str) -> dict[str, dict[str, str]]:
        """The model's reports of wrong servers; a failed lookup shows none rather than failing the crawl."""
        try:
            return await fetch_reports(self.peer, prefix)
        except Exception as e:
            logger.warning("Reading the reports of %r failed: %s", prefix, e or type(e).__name__)
            return {}

    async def probe(self, peer_id: str, max_age: float | None = None) -> ProbeResult:
        """The info probe of ``peer_id``, from the cache if it is younger than ``probe_cache_ttl`` (and
        ``max_age``)."""
        cached = self.cache.get(peer_id, time.monotonic(), max_age)
        if cached is not None:
            return cached
        async with self._probes:
            result = await probe_server(self.peer.p2p, peer_id, self.config.probe_timeout)
        self.cache.put(peer_id, result)
        return result

    async def is_reachable(self, peer_id: str) -> Reachability:
        """Whether this service can reach ``peer_id`` (any peer, not only servers of a crawled model)."""
        result = await self.probe(peer_id)
        connected = result.ok or peer_id in await self._connected_addrs()
        return Reachability(peer_id=peer_id, reachable=connected, serves_info=result.ok, rtt=result.rtt,
                            error=result.error)

    async def _connected_addrs(self) -> dict[str, tuple[str, ...]]:
        try:
            peers = await self.peer.p2p.list_peers()
        except Exception as e:
            logger.warning("Could not list connected peers: %s", e or type(e).__name__)
            return {}
        return {info.peer_id.to_base58(): tuple(str(a) for a in info.addrs) for info in peers}

