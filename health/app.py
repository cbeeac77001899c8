"""The web app (Starlette, served by uvicorn) and ``swarm health``'s entry point.

Routes: ``/`` the page (server-rendered; its script re-renders it from the JSON API), ``/api/v1/state``
the state document (docs/health.md), ``/api/v1/is_reachable/{peer_id}``, ``/metrics`` (Prometheus),
``/static/*``. One event loop runs the crawler and the HTTP server; SIGINT/SIGTERM stop both.
"""

from __future__ import annotations

import logging
import pathlib
import re
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from swarm import aio
from swarm.command_config import HealthConfig
from swarm.routing import format_blocks
from swarm.web import listen, serve_until_signal, url_of

from health.crawler import Crawler, Reachability, Snapshot
from health.metrics import make_registry, render
from health.view import FILTERS, build_state, reachability

logger = logging.getLogger(__name__)

HERE = pathlib.Path(__file__).resolve().parent
PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{20,128}")  # base58, as libp2p prints peer ids


class SwarmSource(Protocol):
    """What the app reads: :class:`~health.crawler.Crawler`, or a stand-in holding a fixed snapshot in tests."""

    @property
    def snapshot(self) -> Snapshot: ...

    async def is_reachable(self, peer_id: str) -> Reachability: ...


def create_app(config: HealthConfig, crawler: SwarmSource) -> Starlette:
    """The app over a running ``crawler``; it reads ``crawler.snapshot`` on every request."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters.update(FILTERS)
    templates.env.filters["spans"] = format_blocks

    def state() -> dict[str, Any]:
        return build_state(crawler.snapshot, show_ips=config.show_ips, refresh_period=config.refresh_period,
                           initial_peers=config.initial_peers)

    registry = make_registry(state)

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(request, "index.html", {"state": state()},
                                          headers={"Cache-Control": "no-store"})

    async def api_state(request: Request) -> Response:
        return JSONResponse(state(), headers={"Cache-Control": "no-store"})

    async def metrics(request: Request) -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    async def is_reachable(request: Request) -> Response:
        peer_id = request.path_params["peer_id"]
        if not PEER_ID.fullmatch(peer_id):
            return JSONResponse({"error": f"{peer_id[:140]!r} is not a peer id; pass the base58 id a server prints, "
                                          "e.g. 12D3KooW..."}, status_code=400)
        result = await crawler.is_reachable(peer_id)
        return JSONResponse(reachability(result, config.show_ips), headers={"Cache-Control": "no-store"})

    return Starlette(routes=[
        Route("/", page),
        Route("/api/v1/state", api_state),
        Route("/api/v1/is_reachable/{peer_id}", is_reachable),
        Route("/metrics", metrics),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ])


async def serve_health(config: HealthConfig) -> None:
    """Joins the swarm, crawls it and serves the page until SIGINT/SIGTERM."""
    sock = listen(config.host, config.port)  # first: a busy port fails before joining the swarm
    try:
        async with Crawler(config) as crawler:
            url = url_of(sock)
            print(f"Health page: {url} (JSON: {url}api/v1/state, Prometheus: {url}metrics)", flush=True)
            await serve_until_signal(create_app(config, crawler), sock)
            logger.info("Stopping the health service")
    finally:
        sock.close()


def run_health(config: HealthConfig) -> int:
    """``swarm health``: runs :func:`serve_health` in a new event loop; returns the exit code."""
    aio.run(serve_health(config))
    return 0
