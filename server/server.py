"""One server process: load a span, serve it, announce it, and leave cleanly.

Lifecycle: start the peer -> announce JOINING -> load blocks -> register handlers -> announce
ONLINE (and again every ``update_period``) -> on SIGINT/SIGTERM announce OFFLINE, end sessions,
stop the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time

import torch

from swarm import __version__, aio
from swarm.config import ServerConfig, parse_span
from swarm.dht import NetworkConfig, Peer, declare_server
from swarm.models import kv_bytes_per_token, load_config, resolve_dtype
from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.weights import Checkpoint

from server.compute import ComputeExecutor
from server.handler import HandlerLimits, SpanHandler
from server.kv_cache import CacheBudget
from server.loading import load_span, pick_device

logger = logging.getLogger(__name__)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.stop_event = asyncio.Event()
        self.peer: Peer | None = None
        self.handler: SpanHandler | None = None
        self.state = ServerState.JOINING

    def request_stop(self) -> None:
        self.stop_event.set()

    async def run(self) -> None:
        cfg = self.config
        model_config = load_config(cfg.model, revision=cfg.revision, cache_dir=cfg.cache_dir, token=cfg.token)
        num_blocks = model_config.num_hidden_layers
        start, end = parse_span(cfg.blocks, num_blocks) if cfg.blocks else (0, num_blocks)
        self.start, self.end = start, end
        device = pick_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, model_config, device)
        self.device, self.dtype = device, dtype
        bytes_per_token_block = kv_bytes_per_token(model_config, dtype)
        budget = CacheBudget(cfg.cache_tokens, end - start, bytes_per_token_block)
        self.model_record = ModelRecord(name=cfg.model, num_blocks=num_blocks, family=model_config.model_type)

        self.peer = peer = await Peer.start(NetworkConfig(
            initial_peers=cfg.initial_peers, host_maddrs=cfg.listen_maddrs(), announce_maddrs=cfg.announce_maddrs,
            identity_path=cfg.identity_path))
        executor = ComputeExecutor(num_threads=cfg.num_threads)
        announcer: asyncio.Task | None = None
        try:
            maddrs = await peer.visible_maddrs()
            self._print_join_info(maddrs)
            await self._announce(budget)  # JOINING: the swarm sees the span being loaded
            logger.info("Serving %s blocks %d:%d of %d on %s in %s; KV cache budget %d tokens (%s); DHT prefix %r",
                        cfg.model, start, end, num_blocks, device, str(dtype).removeprefix("torch."),
                        cfg.cache_tokens, _gib(budget.capacity * bytes_per_token_block), cfg.dht_prefix)
            checkpoint = Checkpoint(cfg.model, revision=cfg.revision, cache_dir=cfg.cache_dir, token=cfg.token)
            t0 = time.perf_counter()
            span = await asyncio.get_running_loop().run_in_executor(
                None, lambda: load_span(checkpoint, model_config, start, end, dtype, device, self.stop_event.is_set))
            logger.info("Loaded blocks %d:%d in %.1fs", start, end, time.perf_counter() - t0)
            self.handler = SpanHandler(
                span, model_name=cfg.model, dtype=dtype, device=device, budget=budget, executor=executor,
                public_name=cfg.public_name,
                limits=HandlerLimits(cfg.max_session_length, cfg.max_batch_size, cfg.max_forward_tokens,
                                     cfg.session_timeout))
            await self.handler.add_to(peer.p2p)
            self.state = ServerState.ONLINE
            await self._announce(budget)
            print(f"Server ONLINE: {cfg.dht_prefix} blocks {start}:{end} as {peer.peer_id}", flush=True)
            announcer = asyncio.create_task(self._announce_loop(budget))
            await self.stop_event.wait()
        except InterruptedError:
            logger.info("Stopped while loading")
        finally:
            logger.info("Shutting down: announcing OFFLINE and closing sessions")
            if announcer is not None:
                announcer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await announcer
            self.state = ServerState.OFFLINE
            # each step is bounded: on Ctrl+C the terminal also signals p2pd, and calls to a dead
            # daemon would wait forever
            await _bounded(self._announce(budget), "announcing OFFLINE")
            if self.handler is not None:
                await _bounded(self.handler.remove_from(peer.p2p), "removing handlers")
                await _bounded(self.handler.close_all(), "closing sessions")
            executor.shutdown()
            await _bounded(peer.shutdown(), "stopping the peer")

    def _record(self, budget: CacheBudget) -> ServerRecord:
        cfg = self.config
        return ServerRecord(
            state=self.state, start=self.start, end=self.end, dtype=str(self.dtype).removeprefix("torch."),
            device=self.device.type, device_name=_device_name(self.device), cache_tokens_left=budget.tokens_left,
            max_session_length=cfg.max_session_length, public_name=cfg.public_name, version=__version__,
        )

    async def _announce(self, budget: CacheBudget) -> None:
        ok = await declare_server(self.peer, self.config.dht_prefix, self._record(budget),
                                  expiration=2.5 * self.config.update_period, model=self.model_record)
        if not ok:
            logger.warning("Could not store this server's record (%s) in the DHT; will retry in %.0fs",
                           self.state.name, self.config.update_period)

    async def _announce_loop(self, budget: CacheBudget) -> None:
        while True:
            await asyncio.sleep(self.config.update_period)
            try:
                await self._announce(budget)
            except Exception:
                logger.exception("Announcing failed; will retry in %.0fs", self.config.update_period)

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


def _quiet_shutdown_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Background tasks of hivemind lose their daemon connection on shutdown; that is not an error."""
    if isinstance(context.get("exception"), (ConnectionError, EOFError)):
        logger.debug("ignored on shutdown: %s", context.get("exception"))
        return
    loop.default_exception_handler(context)


async def _bounded(coro, what: str, timeout: float = 5.0) -> None:
    try:
        await asyncio.wait_for(coro, timeout)
    except Exception as e:
        logger.warning("Shutdown step skipped (%s): %s", what, e or type(e).__name__)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def serve(config: ServerConfig) -> int:
    """Runs a server until SIGINT/SIGTERM; returns the process exit code."""

    async def main() -> None:
        server = Server(config)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_shutdown_errors)
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
