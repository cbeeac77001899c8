"""Serving an ASGI app from a Swarm process (``swarm health``, ``swarm api``): uvicorn on a socket
bound before the process joins the swarm, stopped by SIGINT/SIGTERM through its owner.

Needs the ``health`` or ``api`` extra (uvicorn); only those roles import this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from swarm.errors import ConfigError


class QuietServer(uvicorn.Server):
    """uvicorn's server without its own signal handling: the process's owner stops it.

    uvicorn re-raises a captured SIGTERM after serving, which would kill the process before its
    owner has stopped its DHT peers; so signals go to :meth:`request_stop` instead.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def request_stop(self) -> None:
        self.should_exit = True


def make_server(app: Any) -> QuietServer:
    return QuietServer(uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off"))


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a busy port is a :class:`ConfigError` naming the flags."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port "
                          "(0 picks a free one) or --host") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


async def serve_until_signal(app: Any, sock: socket.socket) -> None:
    """Serves ``app`` on ``sock`` until SIGINT or SIGTERM."""
    server = make_server(app)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_stop)
    try:
        await server.serve(sockets=[sock])
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
