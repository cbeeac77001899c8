"""The WAN emulation proxy (swarm/wan.py): delay each way and a bandwidth cap, on plain sockets."""

from __future__ import annotations

import asyncio
import time

import pytest

from swarm.wan import LinkShape, free_port, serve, serve_many


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


def test_an_access_link_is_shared_by_every_connection_back_to_its_dialers():
    """Two servers behind one proxy process with a 500 KB/s access link to dialers at 127.0.0.1: 50 KB back from
    each at once take 0.2 s in all (the link is shared), one alone 0.1 s; what dialers send is not limited by
    it, nor what goes back to dialers at other addresses."""
    async def scenario(access_from: str):
        echoes = [await asyncio.start_server(_echo, "127.0.0.1", 0) for _ in range(2)]
        ports = [(free_port(), echo.sockets[0].getsockname()[1]) for echo in echoes]
        ready = asyncio.Event()
        proxy = asyncio.ensure_future(serve_many(ports, LinkShape(), access_bandwidth=500e3, access_from=access_from,
                                                 ready=ready))
        await asyncio.wait_for(ready.wait(), 5)
        streams = [await asyncio.open_connection("127.0.0.1", listen) for listen, _ in ports]
        try:
            async def bounce(reader, writer, size: int) -> float:
                t0 = time.monotonic()
                writer.write(b"z" * size)
                await reader.readexactly(size)
                return time.monotonic() - t0

            alone = await bounce(*streams[0], 50_000)
            together = await asyncio.gather(*(bounce(reader, writer, 50_000) for reader, writer in streams))
        finally:
            for _, writer in streams:
                writer.close()
            proxy.cancel()
            await asyncio.gather(proxy, return_exceptions=True)
            for echo in echoes:
                echo.close()
        return alone, max(together)

    alone, together = asyncio.run(asyncio.wait_for(scenario("127.0.0.1"), 30))
    assert 0.1 <= alone < 0.1 + 0.1, alone
    assert 0.2 <= together < 0.2 + 0.1, together
    alone, together = asyncio.run(asyncio.wait_for(scenario("127.0.0.2"), 30))  # these dialers are not on it
    assert alone < 0.05 and together < 0.05, (alone, together)
