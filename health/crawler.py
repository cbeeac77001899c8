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

from swarm.command_config import HealthConfig
from swarm.dht import NetworkConfig, Peer, fetch_models, fetch_reports, fetch_servers
from swarm.errors import SwarmError
from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.swarm_state import claims_to_check, pick_model

from health.probe import ProbeCache, ProbeResult, probe_server

logger = logging.getLogger(__name__)

DHT_TIMEOUT = 30.0  # seconds one crawl may spend reading the model index
MODEL_TIMEOUT = 30.0  # seconds one crawl may spend on one model (models are crawled at once)
MAX_MODELS = 64  # prefixes crawled, the most claimed first: peers making up models cannot make a crawl endless


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
                                client_mode=True, swarm_key=self.config.swarm_key)
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
        """Crawls the model index, every block key of every confirmed model and every online server;
        publishes and returns the snapshot.

        A failed crawl does not raise: it keeps the previous models and sets ``error``. A model whose crawl
        takes over :data:`MODEL_TIMEOUT` keeps its previous state and is named in ``error``; the others update.
        """
        started = time.perf_counter()
        previous = self.snapshot
        try:
            models, errors = await self._crawl(previous)
        except Exception as e:
            logger.warning("Crawl failed (the page keeps the previous state): %s", e or type(e).__name__)
            self.snapshot = dataclasses.replace(
                previous, crawl_duration=time.perf_counter() - started, error=str(e) or type(e).__name__,
                crawls=previous.crawls + 1, crawl_errors=previous.crawl_errors + 1)
        else:
            self.snapshot = Snapshot(models=models, updated_at=time.time(),
                                     crawl_duration=time.perf_counter() - started, error="; ".join(errors) or None,
                                     crawls=previous.crawls + 1, crawl_errors=previous.crawl_errors + bool(errors))
        return self.snapshot

    async def _crawl(self, previous: Snapshot) -> tuple[tuple[ModelSnapshot, ...], list[str]]:
        index = await asyncio.wait_for(fetch_models(self.peer), DHT_TIMEOUT)
        prefixes = sorted(sorted(index), key=lambda p: -len(index[p]))[:MAX_MODELS]  # the most claimed first
        addrs = await self._connected_addrs() if self.config.show_ips else {}
        kept = {m.prefix: m for m in previous.models}
        results = await asyncio.gather(*(asyncio.wait_for(
            self._crawl_model(p, index[p], addrs, kept[p].record if p in kept else None), MODEL_TIMEOUT)
            for p in prefixes), return_exceptions=True)
        self.cache.prune(time.monotonic())
        snapshots, errors = [], []
        for prefix, result in zip(prefixes, results):
            if isinstance(result, BaseException):
                if not isinstance(result, (asyncio.TimeoutError, SwarmError, ConnectionError, OSError)):
                    raise result  # a bug: the crawl fails and says so
                what = f"took over {MODEL_TIMEOUT:g}s" if isinstance(result, asyncio.TimeoutError) else str(result)
                logger.warning("Crawling model %r failed (its previous state is kept): %s", prefix, what)
                errors.append(f"model {prefix}: {what}")
                result = kept.get(prefix)
            if result is not None:
                snapshots.append(result)
        return tuple(sorted(snapshots, key=lambda m: m.prefix)), errors

    async def _crawl_model(self, prefix: str, claims: Mapping[str, ModelRecord], addrs: Mapping[str, tuple[str, ...]],
                           believed: ModelRecord | None = None) -> ModelSnapshot | None:
        """One model: believe the claim its servers confirm over ``info`` (or ``believed``, the claim an earlier
        crawl confirmed, while a server still makes it: a model whose servers all died shows as broken; None if
        none is), then read its block keys and probe its online servers. A server whose ``info`` names another
        model is unreachable for this one: it cannot hold this model's blocks up."""
        answers: dict[str, tuple[str, int] | None] = {}
        while batch := claims_to_check(claims, answers):  # rounds: at most max_per_claim / per_claim of them
            for p, r in (await self._probe_all(batch)).items():
                answers[p] = (r.info.model, r.info.num_blocks) if r.ok and r.info is not None else None
        record = pick_model(claims, {p: a for p, a in answers.items() if a is not None})
        if record is None and believed is not None and believed in claims.values():
            record = believed
        if record is None:
            logger.info("Model %r: no server confirms any of its %d index entries; not shown", prefix, len(claims))
            return None
        servers, reports = await asyncio.gather(fetch_servers(self.peer, prefix, list(range(record.num_blocks))),
                                                self._reports(prefix))
        peers = {p for records in servers.values() for p in records}
        online = sorted({p for records in servers.values() for p, r in records.items()
                         if r.state == ServerState.ONLINE})
        # every crawl asks each online server again (an answer from the last crawl is too old): a server that
        # dies shows as unreachable after one crawl, within refresh_period + probe_timeout
        fresh = await self._probe_all(online, max_age=self.config.refresh_period / 2)
        probes = {p: _for_model(result, record) for p, result in fresh.items()}
        return ModelSnapshot(prefix=prefix, record=record, servers=servers, probes=probes,
                             addrs={p: addrs[p] for p in peers if p in addrs}, reports=reports)

    async def _reports(self, prefix: str) -> dict[str, dict[str, str]]:
        """The model's reports of wrong servers; a failed lookup shows none rather than failing the crawl."""
        try:
            return await fetch_reports(self.peer, prefix)
        except Exception as e:
            logger.warning("Reading the reports of %r failed: %s", prefix, e or type(e).__name__)
            return {}

    async def _probe_all(self, peer_ids: list[str], max_age: float | None = None) -> dict[str, ProbeResult]:
        return dict(zip(peer_ids, await asyncio.gather(*(self.probe(p, max_age) for p in peer_ids))))

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


def _for_model(result: ProbeResult, record: ModelRecord) -> ProbeResult:
    """A probe as it counts for ``record``'s model: an answer naming another model is a failed probe."""
    info = result.info
    if not result.ok or info is None or (info.model, info.num_blocks) == (record.name, record.num_blocks):
        return result
    return dataclasses.replace(result, ok=False, error=f"it serves {info.model!r} with {info.num_blocks} blocks, "
                                                       f"not {record.name!r} with {record.num_blocks}")

