"""WAN emulation for tests and benchmarks: TCP links with a chosen one-way delay and bandwidth.

Loopback hops cost ~0.4 ms; internet hops 20-100 ms. This kernel has no ``netem`` qdisc, so delay
comes from a userspace proxy: a server listens on a private port and announces the proxy's port
(``--announce-maddrs``), so every connection to it, from the client or from another server, passes
through the proxy, and pays the link's delay each way. Both Swarm and Petals servers work this way.

    python -m swarm.wan --listen 40001 --target 40000 --delay 0.025 --bandwidth 1e6

A byte read at time t from one side is written to the other at
``max(t, link free) + size / bandwidth + delay``: the bandwidth serializes the bytes of one direction,
then they travel ``delay`` seconds (each direction on its own; a proxy buffers at most
:data:`MAX_BUFFERED` bytes per direction before it stops reading, as a full link would).

Between two servers the connection is whichever one dialed the other, so the hop carries one
proxy's shape; with the same shape on every server (what tests and benchmarks use) every link,
client to server and server to server, costs ``delay`` one way and ``2 * delay`` a round trip.

An *access link* (``--access-bandwidth``, one proxy process for several servers, each ``--listen`` with its
``--target``) is one link shared by every byte those servers send back to the dialers at
``--access-from`` (an address on the loopback, e.g. 127.0.0.2, that a client listens on: libp2p dials
from its listen address): that client's downlink. Bytes of all its connections through the process
queue on it in the order they were read, as on a real access link; other dialers (the servers among
themselves) do not touch it.

Used by :class:`swarm.local_swarm.LocalSwarm` (``wan=LinkShape(...)``) and ``benchmarks/bench_wan.py``;
never by a server or client at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import socket
import sys
import time

from swarm import aio

MAX_BUFFERED = 8 << 20  # bytes per direction in flight inside the proxy
READ_CHUNK = 1 << 16
READY = "wan proxy ready"  # what the proxy process prints once it listens


@dataclasses.dataclass(frozen=True)
class LinkShape:
    """One link's shape: ``delay`` seconds one way, ``bandwidth`` bytes/s each way (0: unlimited)."""

    delay: float = 0.0
    bandwidth: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.delay < 10.0 and 0.0 <= self.bandwidth < float("inf")):
            raise ValueError(f"a link needs 0 <= delay < 10 s and a finite bandwidth >= 0, got {self}")

    def args(self) -> list[str]:
        return ["--delay", repr(self.delay), "--bandwidth", repr(self.bandwidth)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AccessLink:
    """A link several connections share (``bandwidth`` bytes/s): when it finishes sending what it was given."""

    def __init__(self, bandwidth: float):
        self.bandwidth, self.free = bandwidth, 0.0
        self.bytes = 0

    def send(self, start: float, size: int) -> float:
        """When ``size`` bytes handed over at ``start`` are through it."""
        self.free = max(start, self.free) + size / self.bandwidth
        self.bytes += size
        return self.free


class _Direction:
    """Bytes of one direction of one connection, each written when the shape says it arrives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shape: LinkShape,
                 access: AccessLink | None = None):
        self.reader, self.writer, self.shape, self.access = reader, writer, shape, access
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.buffered = 0
        self.link_free = 0.0  # when the link finishes sending what it was given (bandwidth)
        self.arrived = asyncio.Event()
        self.drained = asyncio.Event()
        self.eof = False

    async def read(self) -> None:
        while True:
            data = await self.reader.read(READ_CHUNK)
            if not data:
                self.eof = True
                self.arrived.set()
                return
            now = time.monotonic()
            sent = max(now, self.link_free)
            if self.shape.bandwidth > 0:
                sent += len(data) / self.shape.bandwidth
            self.link_free = sent
            if self.access is not None:
                sent = self.access.send(sent, len(data))
            self.queue.append((sent + self.shape.delay, data))
            self.buffered += len(data)
            self.arrived.set()
            while self.buffered > MAX_BUFFERED:
                self.drained.clear()
                await self.drained.wait()

    async def write(self) -> None:
        while True:
            while not self.queue:
                if self.eof:
                    with contextlib.suppress(OSError, RuntimeError):
                        self.writer.write_eof()
                    return
                self.arrived.clear()
                await self.arrived.wait()
            due, data = self.queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.writer.write(data)
            await self.writer.drain()
            self.buffered -= len(data)
            self.drained.set()


async def _relay(shape: LinkShape, target_port: int, client_reader: asyncio.StreamReader,
                 client_writer: asyncio.StreamWriter, access: AccessLink | None = None,
                 access_from: str = "") -> None:
    if (client_writer.get_extra_info("peername") or ("",))[0] != access_from:
        access = None  # another dialer: not on this access link
    try:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
    except OSError:
        client_writer.close()
        return
    directions = (_Direction(client_reader, server_writer, shape),
                  _Direction(server_reader, client_writer, shape, access))  # back to the dialer: the access link
    tasks = [asyncio.ensure_future(job()) for d in directions for job in (d.read, d.write)]
    try:
        # a connection ends when either side closes or fails; the other side is closed with it
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in (client_writer, server_writer):
            writer.close()


async def serve(listen_port: int, target_port: int, shape: LinkShape, ready: asyncio.Event | None = None) -> None:
    """Forwards every connection to 127.0.0.1:``listen_port`` to 127.0.0.1:``target_port``, shaped; runs until cancelled."""
    await serve_many([(listen_port, target_port)], shape, ready=ready)


async def serve_many(ports: list[tuple[int, int]], shape: LinkShape, access_bandwidth: float = 0.0,
                     access_from: str = "", ready: asyncio.Event | None = None) -> None:
    """Forwards each (listen port, target port) pair like :func:`serve`; with ``access_bandwidth`` every byte
    sent back to a dialer at address ``access_from`` also crosses one shared :class:`AccessLink`. Runs until
    cancelled."""
    access = AccessLink(access_bandwidth) if access_bandwidth > 0 else None
    servers = []
    try:
        for listen_port, target_port in ports:
            servers.append(await asyncio.start_server(
                lambda r, w, target=target_port: _relay(shape, target, r, w, access, access_from), "127.0.0.1",
                listen_port))
        if ready is not None:
            ready.set()
        pairs = ", ".join(f"{listen} -> {target}" for listen, target in ports)
        print(f"{READY} on 127.0.0.1:{pairs}, {shape}, access link {access_bandwidth:g} B/s to {access_from}",
              flush=True)
        await asyncio.gather(*(server.serve_forever() for server in servers))
    finally:
        for server in servers:
            server.close()
        if access is not None:
            print(f"access link carried {access.bytes} bytes", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A TCP proxy on 127.0.0.1 that adds delay and limits bandwidth.")
    parser.add_argument("--listen", type=int, action="append", required=True, help="port to listen on (repeatable)")
    parser.add_argument("--target", type=int, action="append", required=True,
                        help="port on 127.0.0.1 to forward to, one per --listen")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay, seconds")
    parser.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s each way (0: unlimited)")
    parser.add_argument("--access-bandwidth", type=float, default=0.0,
                        help="bytes/s of one link the bytes back to every dialer at --access-from share (0: none)")
    parser.add_argument("--access-from", default="127.0.0.2", help="the dialer address on the access link")
    args = parser.parse_args(argv)
    if len(args.listen) != len(args.target) or args.access_bandwidth < 0:
        parser.error("give one --target per --listen, and --access-bandwidth >= 0")
    with contextlib.suppress(KeyboardInterrupt):
        aio.run(serve_many(list(zip(args.listen, args.target)), LinkShape(args.delay, args.bandwidth),
                           args.access_bandwidth, args.access_from))


if __name__ == "__main__":
    sys.exit(main())
