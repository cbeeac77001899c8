"""The WAN emulation proxy (swarm/wan.py): delay each way and a bandwidth cap, on plain sockets."""

from __future__ import annotations

import asyncio
import time

import pytest

from swarm.wan import LinkShape, free_port, serve


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


def _measure(shape: LinkShape, payload: int) -> tuple[float, float]:
    """(seconds for a 1-byte round trip, seconds to send ``payload`` bytes and get them back) through the proxy."""
    async def scenario():
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = free_port()
        ready = asyncio.Event()
        proxy = asyncio.ensure_future(serve(port, echo.sockets[0].getsockname()[1], shape, ready))
        await asyncio.wait_for(ready.wait(), 5)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            t0 = time.monotonic()
            writer.write(b"x")
            await reader.readexactly(1)
            rtt = time.monotonic() - t0
            t0 = time.monotonic()
            writer.write(b"y" * payload)
            await reader.readexactly(payload)
            bulk = time.monotonic() - t0
        finally:
            writer.close()
            proxy.cancel()
            echo.close()
        return rtt, bulk

    return asyncio.run(asyncio.wait_for(scenario(), 30))


def test_proxy_adds_its_delay_each_way():
    rtt, _ = _measure(LinkShape(delay=0.03), 1)
    assert 0.06 <= rtt < 0.06 + 0.05, rtt


def test_proxy_caps_bandwidth_each_way():
    # 100 KB at 1 MB/s: 0.1 s out; the echo starts back as the first bytes arrive and ends ~one chunk
    # (64 KB, 0.064 s at that rate) after the last one is in
    _, bulk = _measure(LinkShape(delay=0.0, bandwidth=1e6), 100_000)
    assert 0.1 <= bulk < 0.1 + 0.064 + 0.1, bulk
    _, unlimited = _measure(LinkShape(), 100_000)
    assert unlimited < 0.05, unlimited


def test_link_shape_rejects_nonsense():
    for bad in (dict(delay=-1.0), dict(bandwidth=float("inf")), dict(delay=20.0)):
        with pytest.raises(ValueError):
            LinkShape(**bad)
