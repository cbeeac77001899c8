"""One server process: place a span, load it, serve it, announce it, move it, and leave cleanly.

Lifecycle: start the peer -> pick the span (``--blocks``, or ``--num-blocks`` placed where the swarm
is weakest: :mod:`server.rebalancer`) -> announce JOINING (placed automatically: look at the swarm
once more, and take another span if servers that started at the same moment took this one) ->
load blocks -> measure throughput
(once per setup: :mod:`server.throughput`) -> register handlers -> announce ONLINE (and again every
``update_period``, sooner after a store that failed: :mod:`server.announcing`, with the round trips to
the servers that may come next: :mod:`server.pings`;
without ``--blocks``, re-check the placement every ``rebalance_period`` and
:meth:`Server.move_to` when it says so; in a Slurm job, :meth:`Server.leave` before its time limit:
:mod:`server.walltime`) -> on SIGINT/SIGTERM announce OFFLINE, end sessions, stop the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Callable

import torch
from transformers import PretrainedConfig

from swarm import __version__, aio
from swarm.blocks import Span
from swarm.config import ServerConfig, parse_span
from swarm.devices import adapt_to_device, device_name, pick_device
from swarm.dht import NetworkConfig, Peer, all_relayed, declare_server, fetch_servers
from swarm.errors import ConfigError
from swarm.gguf import requantizing_warning
from swarm.models import DIGEST_ATTR, kv_bytes_per_token, load_config, resolve_dtype
from swarm.prequantized import Int4Format, int4_format
from swarm.quant import check_scheme
from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.slurm import SlurmJob
from swarm.weights import TensorSource, open_checkpoint

from server import throughput as probe
from server.compute import PRIORITY_FORWARD, ComputeExecutor
from server.adapters import load_adapters, parse_adapter_arg
from server.announcing import AnnounceSchedule
from server.handler import HandlerLimits, SpanHandler
from server.kv_cache import PagePool
from server.loading import default_num_blocks, human_bytes, load_span, respan, shared_blocks
from server.pings import PING_TIMEOUT, NextPings, next_candidates
from server.quotas import QuotaLimits, Quotas
from server.rebalancer import Rebalancer, initial_span, settled_span
from server.walltime import catch_warning, watch_walltime

logger = logging.getLogger(__name__)


class Server:
    # set by run() before anything reads them
    peer: Peer
    executor: ComputeExecutor
    checkpoint: TensorSource
    model_config: PretrainedConfig
    model_record: ModelRecord
    device: torch.device
    dtype: torch.dtype
    prequantized: Int4Format | None  # a GPTQ/AWQ checkpoint's format: its blocks stay 4-bit
    start: int
    end: int
    pool: PagePool
    next_pings: NextPings

    def __init__(self, config: ServerConfig):
        self.config = config
        self.stop_event = asyncio.Event()
        self.handler: SpanHandler | None = None
        self.state = ServerState.JOINING
        self.announced = False  # a span was announced: on shutdown it is announced OFFLINE
        self.announcing = AnnounceSchedule(config.update_period)  # sooner after a store that failed
        self._announce_failed = asyncio.Event()  # wakes the announce loop to retry sooner than the period
        self.throughput: probe.Throughput | None = None  # None until measured (or read from the cache)
        self.using_relay = False

    def request_stop(self) -> None:
        self.stop_event.set()

    @property
    def quant(self) -> str:
        """How the blocks' weights are stored (``ServerRecord.quant``): ``--quant`` when the span was quantized
        while loading (a GGUF's dequantized blocks too), else the checkpoint's own format (``gptq-int4``,
        ``gguf-q4_k_m``) or "none". A GPTQ/AWQ checkpoint with ``--quant`` is refused at start."""
        return self.config.quant if self.config.quant != "none" else self.checkpoint.quant

    @property
    def offered_throughput(self) -> float:
        return self.throughput.throughput if self.throughput is not None else 0.0

    async def run(self) -> None:
        cfg = self.config
        model_config = load_config(cfg.model, revision=cfg.revision, cache_dir=cfg.cache_dir, token=cfg.token,
                                   trust_remote_code=cfg.trust_remote_code, gguf_file=cfg.gguf_file)
        num_blocks = model_config.num_hidden_layers
        device = pick_device(cfg.device)
        adapt_to_device(model_config, device)
        dtype = resolve_dtype(cfg.dtype, model_config, device)
        check_scheme(cfg.quant, device, dtype)  # before anything is announced or loaded
        prequantized = int4_format(model_config)
        if prequantized is not None and cfg.quant != "none":
            raise ConfigError(f"--quant {cfg.quant}: {cfg.model_name} is already quantized ({prequantized.label}) and "
                              "is served as its own 4-bit layers; drop --quant")
        self.model_config, self.device, self.dtype = model_config, device, dtype
        self.prequantized = prequantized
        self.model_record = ModelRecord(prefix=cfg.dht_prefix, name=cfg.model_name, num_blocks=num_blocks,
                                        family=model_config.model_type,
                                        config_digest=getattr(model_config, DIGEST_ATTR, ""))
        fixed = parse_span(cfg.blocks, num_blocks) if cfg.blocks is not None else None
        length = fixed[1] - fixed[0] if fixed else self._span_length(num_blocks)
        if self.stop_event.is_set():  # Ctrl-C while the model's config loaded: nothing to undo yet
            logger.info("Stopped before joining the swarm")
            return

        job = SlurmJob.from_env()  # compute nodes often accept no inbound connections: be reachable via relays
        warning = catch_warning() if job is not None else None  # Slurm's early warning must not end the process
        if job is not None:
            logger.info("Running in Slurm %s; leaving the swarm %.0fs before its time limit (--leave-before)",
                        job.describe(), cfg.leave_before)
        self.peer = peer = await Peer.start(NetworkConfig(
            initial_peers=cfg.initial_peers, host_maddrs=cfg.listen_maddrs(), announce_maddrs=cfg.announce_maddrs,
            identity_path=cfg.identity_path, use_relay=cfg.use_relay,
            use_auto_relay=cfg.use_auto_relay or job is not None, swarm_key=cfg.swarm_key))
        self.executor = executor = ComputeExecutor(num_threads=cfg.num_threads)
        self.next_pings = NextPings(peer.p2p)
        self.checkpoint = open_checkpoint(cfg.model, model_config, gguf_file=cfg.gguf_file, revision=cfg.revision,
                                          cache_dir=cfg.cache_dir, token=cfg.token)
        if (warning := requantizing_warning(cfg.quant, self.checkpoint.quant)) is not None:
            logger.warning(warning)
        key = probe.speed_key(model_config, device, dtype, torch.get_num_threads(), self.quant)
        remeasure = cfg.throughput is not None or cfg.remeasure_throughput
        cached = None if remeasure else probe.load_cached(key)
        if cfg.throughput is not None or cached is not None:
            self.throughput = probe.make_throughput(cached, network_rps=cfg.network_rps, override=cfg.throughput,
                                                    source="cached; --remeasure-throughput measures again")
        tasks: list[asyncio.Task] = []
        try:
            self._check_stop()
            maddrs = await peer.visible_maddrs()
            self._print_join_info(maddrs)
            self._check_relay(maddrs)
            start, end = fixed or await initial_span(peer, cfg.dht_prefix, num_blocks, length,
                                                     self.offered_throughput or None)
            self._set_span(start, end)
            await self._announce()  # JOINING: the swarm sees the span being loaded
            if fixed is None:
                settled = await settled_span(peer, cfg.dht_prefix, num_blocks, start, end,
                                             self.offered_throughput or None)
                if settled != (start, end):
                    await self._announce_span(*settled)
                    start, end = settled
            self._check_stop()
            logger.info("Serving %s blocks %d:%d of %d on %s in %s%s (%d torch threads; --num-threads shares the "
                        "cores when several servers run on one machine); KV cache budget %d tokens (%s); "
                        "DHT prefix %r", cfg.model_name, start, end, num_blocks, device,
                        str(dtype).removeprefix("torch."),
                        "" if cfg.quant == "none" else f", weights quantized to {cfg.quant}", torch.get_num_threads(),
                        cfg.cache_tokens, human_bytes(self.pool.capacity_bytes),
                        cfg.dht_prefix)
            span = await self._load(lambda: load_span(self.checkpoint, model_config, start, end, dtype, device,
                                                      self.stop_event.is_set, cfg.quant), f"{start}:{end}")
            self.throughput = self.throughput or await self._measure(span, key)
            logger.info("Throughput: %s", self.throughput.describe())
            await self._serve(span)
            print(f"Server ONLINE: {cfg.dht_prefix} blocks {start}:{end} as {peer.peer_id}", flush=True)
            tasks.append(asyncio.create_task(self._announce_loop()))
            if job is not None:
                tasks.append(asyncio.create_task(watch_walltime(self, job, cfg.leave_before, warning=warning)))
            if fixed is None and length < num_blocks:
                rebalancer = Rebalancer(self, prefix=cfg.dht_prefix, num_blocks=num_blocks,
                                        period=cfg.rebalance_period, balance_quality=cfg.balance_quality)
                tasks.append(asyncio.create_task(rebalancer.run()))
            await self._until_stopped(tasks)
        except InterruptedError:
            logger.info("Stopped before serving")
        finally:
            logger.info("Shutting down: announcing OFFLINE and closing sessions")
            # from here on, hivemind's background tasks lose their daemon connection: not an error
            asyncio.get_running_loop().set_exception_handler(_quiet_shutdown_errors)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
            self.state = ServerState.OFFLINE
            # each step is bounded: on Ctrl+C the terminal also signals p2pd, and calls to a dead
            # daemon would wait forever
            if self.announced:
                await _bounded(self._announce(), "announcing OFFLINE")
            if self.handler is not None:
                await _bounded(self.handler.remove_from(peer.p2p), "removing handlers")
                await _bounded(self.handler.close_all(), "closing sessions")
            executor.shutdown()
            await _bounded(peer.shutdown(), "stopping the peer")

    def _check_stop(self) -> None:
        """Ends startup early (InterruptedError) once a stop was requested, e.g. Ctrl-C in the first seconds."""
        if self.stop_event.is_set():
            raise InterruptedError

    def _span_length(self, num_blocks: int) -> int:
        cfg = self.config
        if cfg.num_blocks is None:
            return default_num_blocks(self.model_config, self.device, self.dtype, cfg.cache_tokens,
                                      self.prequantized or cfg.quant)
        if cfg.num_blocks > num_blocks:
            raise ConfigError(f"--num-blocks {cfg.num_blocks} is more than the {num_blocks} blocks of {cfg.model}; "
                              f"pass --num-blocks {num_blocks} or less")
        return cfg.num_blocks

    def _set_span(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.next_pings.clear()  # measured from the old span's end
        self.pool = PagePool(self.config.cache_tokens, end - start,
                                  kv_bytes_per_token(self.model_config, self.dtype))

    async def _load(self, load: Callable[[], Span], what: str) -> Span:
        t0, read = time.perf_counter(), self.checkpoint.bytes_read
        span = await asyncio.get_running_loop().run_in_executor(None, load)
        logger.info("Loaded blocks %s in %.1fs (read %s of tensors)", what, time.perf_counter() - t0,
                    human_bytes(self.checkpoint.bytes_read - read))
        return span

    async def _measure(self, span: Span, key: str) -> probe.Throughput:
        t0 = time.perf_counter()
        speed = await self.executor.run(PRIORITY_FORWARD, probe.measure_speed, span, self.device, self.dtype)
        probe.store_cached(key, speed)
        return probe.make_throughput(speed, network_rps=self.config.network_rps, override=None,
                                     source=f"measured in {time.perf_counter() - t0:.1f}s, cached")

    async def _serve(self, span: Span) -> None:
        """Registers handlers for ``span`` and announces ONLINE."""
        cfg = self.config
        self.handler = SpanHandler(
            span, model_name=cfg.model_name, dtype=self.dtype, device=self.device, pool=self.pool,
            executor=self.executor, public_name=cfg.public_name,
            adapters=load_adapters(cfg.adapters, span, self.device, self.dtype),
            limits=HandlerLimits(cfg.max_session_length, cfg.max_batch_size, cfg.max_forward_tokens,
                                 cfg.session_timeout, max_backward_tokens=cfg.max_backward_tokens,
                                 max_lora_rank=cfg.max_lora_rank, max_adapter_bytes=int(cfg.max_adapter_mb * 2**20),
                                 max_batch_tokens=cfg.max_batch_tokens, batching=cfg.batching,
                                 forward_chunk_tokens=cfg.forward_chunk_tokens, idle_timeout=cfg.idle_timeout),
            quotas=Quotas(QuotaLimits(cfg.max_streams_per_peer, cfg.max_sessions_per_peer, cfg.max_jobs_per_peer,
                                      cfg.peer_cache_share), self.pool.capacity))
        await self.handler.add_to(self.peer.p2p)
        self.state = ServerState.ONLINE
        await self._announce()

    async def leave(self, reason: str, drain_until: float) -> None:
        """Leaves the swarm without losing a generation: OFFLINE and no new sessions now, the open ones
        until ``drain_until`` (epoch seconds), then the usual shutdown, which closes the rest (their
        clients fail over and replay). See :mod:`server.walltime`."""
        self.state = ServerState.OFFLINE
        if self.handler is not None:
            self.handler.leaving = reason
        await self._announce()
        print(f"Leaving the swarm: {reason}. Announced OFFLINE; taking no new sessions", flush=True)
        while self.handler is not None and self.handler.sessions and time.time() < drain_until:
            await asyncio.sleep(min(0.5, max(0.01, drain_until - time.time())))
        if self.handler is not None and self.handler.sessions:
            logger.info("Closing %d open session(s); their clients continue on other servers",
                        len(self.handler.sessions))
        self.request_stop()

    async def move_to(self, start: int, end: int, reason: str) -> None:
        """Serves blocks ``start:end`` instead of the current span: announces the move (JOINING there,
        OFFLINE on the blocks it leaves), ends the sessions on the old span, keeps the blocks both spans
        share, loads only the new ones, and serves again."""
        old_start, old_end = self.start, self.end
        if self.state == ServerState.OFFLINE:
            return  # leaving the swarm (server.walltime): no more moves
        print(f"Moving from blocks {old_start}:{old_end} to {start}:{end}: {reason}", flush=True)
        await self._announce_span(start, end)
        old, self.handler = self.handler, None
        if old is None:
            raise RuntimeError("move_to needs a serving span (call it only while ONLINE)")
        await old.remove_from(self.peer.p2p)
        await old.close_all()
        kept = shared_blocks(old.span, start, end)
        del old  # the blocks it alone held are freed before the new ones load
        span = await self._load(lambda: respan(self.model_config, kept, self.checkpoint, start, end, self.dtype,
                                               self.device, self.stop_event.is_set, self.config.quant),
                                f"{start}:{end} ({end - start - len(kept)} new, {len(kept)} kept)")
        await self._serve(span)
        print(f"Server ONLINE: {self.config.dht_prefix} blocks {start}:{end} as {self.peer.peer_id} "
              f"(moved from {old_start}:{old_end}, kept {len(kept)} block(s))", flush=True)

    async def _announce_span(self, start: int, end: int) -> None:
        """Announces OFFLINE on the blocks the current span has and ``start:end`` does not, then JOINING at
        ``start:end`` (the new span from here on)."""
        left = [b for b in range(self.start, self.end) if not start <= b < end]
        if left:
            await declare_server(self.peer, self.config.dht_prefix,
                                 dataclasses.replace(self._record(), state=ServerState.OFFLINE),
                                 expiration=2.5 * self.config.update_period, blocks=left)
        self.state = ServerState.JOINING
        self._set_span(start, end)
        await self._announce()

    def _record(self) -> ServerRecord:
        cfg = self.config
        speed = self.throughput
        return ServerRecord(
            state=self.state, start=self.start, end=self.end, dtype=str(self.dtype).removeprefix("torch."),
            quant=self.quant,
            throughput=self.offered_throughput, inference_rps=speed.inference_rps if speed else 0.0,
            forward_rps=speed.forward_rps if speed else 0.0, network_rps=cfg.network_rps or 0.0,
            device=self.device.type, device_name=device_name(self.device),
            cache_tokens_left=self.handler.room() if self.handler is not None else self.pool.tokens_left,
            max_session_length=cfg.max_session_length, public_name=cfg.public_name, version=__version__,
            adapters=tuple(parse_adapter_arg(arg)[0] for arg in cfg.adapters),
            using_relay=self.using_relay, next_pings=dict(self.next_pings.rtts),
            next_bandwidth=dict(self.next_pings.bandwidths),
        )

    async def _announce(self) -> None:
        ok = await declare_server(self.peer, self.config.dht_prefix, self._record(),
                                  expiration=2.5 * self.config.update_period, model=self.model_record)
        self.announced = True
        delay = self.announcing.record(ok)
        if not ok:
            self._announce_failed.set()
            logger.warning("Could not store this server's record (%s) in the DHT; will retry in %.0fs",
                           self.state.name, delay)

    async def _announce_loop(self) -> None:
        """Announces every ``update_period``, and after a store that failed (here or in a move) sooner:
        :class:`server.announcing.AnnounceSchedule`."""
        while True:
            self._announce_failed.clear()
            retrying = self.announcing.retrying
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._announce_failed.wait(), self.announcing.delay)
                continue  # an announcement failed meanwhile: wait its retry delay from now
            if not retrying:  # a retry only stores again what was measured a moment ago
                try:
                    await self._measure_next_pings()
                except Exception:
                    logger.exception("Pinging the next servers failed; announcing the last pings measured")
            try:
                self._check_relay(await self.peer.visible_maddrs())
                await self._announce()
            except Exception:
                logger.exception("Announcing failed; will retry in %.0fs", self.announcing.record(False))

    async def _measure_next_pings(self) -> None:
        """Pings the servers that may follow this one in a chain (bounded: a slow DHT or peer delays
        the announce by seconds, never stops it; serving goes on meanwhile)."""
        end = self.end
        if end >= self.model_record.num_blocks or self.state != ServerState.ONLINE:
            self.next_pings.clear()  # the last server hands its output back to the client
            return
        try:
            found = await asyncio.wait_for(fetch_servers(self.peer, self.config.dht_prefix, [end]), PING_TIMEOUT)
        except asyncio.TimeoutError:
            logger.warning("Looking up the servers of block %d took over %.0fs; publishing the last pings again",
                           end, PING_TIMEOUT)
            return
        await self.next_pings.update(next_candidates(found.get(end, {}), self.peer.peer_id.to_base58(), end))
        if self.end != end:  # moved meanwhile (server.rebalancer)
            self.next_pings.clear()

    async def _until_stopped(self, tasks: list[asyncio.Task]) -> None:
        """Waits for a stop request; a background task that fails first stops the server with its error."""
        stop = asyncio.create_task(self.stop_event.wait())
        try:
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        for task in done:
            if task is not stop:
                task.result()  # raises the task's error
                raise RuntimeError(f"background task {task.get_coro()!r} ended on its own")

    def _check_relay(self, maddrs: list[str]) -> None:
        relayed = all_relayed(maddrs)
        if relayed and not self.using_relay:
            logger.warning("This server is not directly reachable: all its addresses go through relays (%s). "
                           "Clients reach it through a relay, which is slower; open a port and pass "
                           "--announce-maddrs with a public address to be reached directly", maddrs[0])
        self.using_relay = relayed

    def _print_join_info(self, maddrs: list[str]) -> None:
        if not maddrs:
            logger.warning("This peer has no visible addresses; pass --announce-maddrs so others can reach it")
            return
        if self.config.initial_peers:
            logger.info("Joined the swarm via %s; this peer: %s", self.config.initial_peers[0], maddrs[0])
        else:
            print("Started a new swarm. Others join it with:", flush=True)
            print(f"  --initial-peers {' '.join(maddrs)}", flush=True)
            print(f"  (or export SWARM_INITIAL_PEERS=\"{' '.join(maddrs)}\")", flush=True)
        print(f"Status: swarm health --initial-peers {' '.join(self.config.initial_peers or maddrs)}", flush=True)


def _quiet_stream_races(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """While serving: a stream its opener closed before p2pd passed it on (hivemind's connection callback
    then reads nothing) is a peer going away, not this server's error; anything else goes to asyncio."""
    if (isinstance(context.get("exception"), asyncio.IncompleteReadError)
            and "client_connected_cb" in str(context.get("message", ""))):
        logger.debug("a stream was closed before it was handed over: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)


def _quiet_shutdown_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Installed when shutdown begins (never before: while serving, a lost connection is news): background
    tasks of hivemind lose their daemon connection on shutdown; that is not an error."""
    if isinstance(context.get("exception"), (ConnectionError, EOFError)):
        logger.debug("ignored on shutdown: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)


async def _bounded(coro, what: str, timeout: float = 5.0) -> None:
    try:
        await asyncio.wait_for(coro, timeout)
    except Exception as e:
        logger.warning("Shutdown step skipped (%s): %s", what, e or type(e).__name__)


def serve(config: ServerConfig) -> int:
    """Runs a server until SIGINT/SIGTERM; returns the process exit code."""

    async def main() -> None:
        server = Server(config)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_stream_races)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_stop)
        await server.run()

    try:
        aio.run(main())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run `swarm serve --help`")
