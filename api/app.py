"""The HTTP edge (Starlette on uvicorn) and ``swarm api``'s entry point.

Routes: ``/`` the chat page, ``/static/*``, ``/health``, ``/metrics``, ``/v1/models`` (and
``/v1/models/{id}``), ``POST /v1/chat/completions``, ``POST /v1/completions`` (docs/api.md). With
``--api-key`` every ``/v1`` route needs ``Authorization: Bearer KEY``. Each generating request
watches its connection: when the client goes away, its generation is cancelled and its inference
session closed, which frees the servers' caches. Every error leaves as OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from swarm import aio
from swarm.command_config import ApiConfig
from swarm.web import listen, serve_until_signal, url_of

from api import responses
from api.errors import ApiError, from_exception
from api.schemas import parse_body, parse_chat, parse_completion, to_json
from api.serving import ApiService

logger = logging.getLogger(__name__)

HERE = pathlib.Path(__file__).resolve().parent
T = TypeVar("T")
CLIENT_GONE = 499  # what the metrics count a request as when its client disconnected first
MAX_BODY = 16 << 20  # bytes of JSON one request may send


class _Disconnected(Exception):
    pass


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status_code=status, media_type="application/json",
                    headers={"Cache-Control": "no-store"})


async def _wait_disconnect(receive: Receive) -> None:
    for _ in range(1_000_000):  # bounded: every message but the disconnect is a body part already read
        if (await receive())["type"] == "http.disconnect":
            return


async def _unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Runs ``work``; if the client disconnects first, cancels it and raises :class:`_Disconnected`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself was cancelled (the server is stopping)
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # its finally blocks close the session
        raise _Disconnected()
    return task.result()


class EventStream(Response):
    """Server-sent events from ``chunks``, as OpenAI streams them, ending with ``data: [DONE]``.

    The response starts only when the first chunk is ready, so an error before any output (the
    swarm has no server for a block, a server refused the session) still gets its HTTP status. A
    disconnect cancels the producer at once, wherever it waits.
    """

    def __init__(self, chunks: AsyncIterator[Any], done: Any):
        super().__init__(status_code=200, media_type="text/event-stream")
        self.chunks, self.done = chunks, done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _unless_disconnected(receive, self._produce(send))
        except _Disconnected:
            self.done(CLIENT_GONE, "client_disconnected")

    async def _produce(self, send: Send) -> None:
        async with contextlib.aclosing(self.chunks) as chunks:
            try:
                first = await anext(chunks, None)
            except Exception as e:
                error = from_exception(e)
                await _send_whole(send, error.status, json.dumps(error.body()).encode(), "application/json")
                self.done(error.status, error.code)
                return
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no")]})
            status, code = 200, None
            try:
                if first is not None:
                    await send(_event(to_json(first)))
                    async for chunk in chunks:
                        await send(_event(to_json(chunk)))
            except OSError:  # the client went away while we wrote
                self.done(CLIENT_GONE, "client_disconnected")
                return
            except Exception as e:  # after the 200 went out, the error travels as an event
                error = from_exception(e)
                status, code = error.status, error.code
                await send(_event(error.body()))
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            self.done(status, code)


def _event(body: Any) -> dict[str, Any]:
    return {"type": "http.response.body", "body": b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n",
            "more_body": True}


async def _send_whole(send: Send, status: int, body: bytes, media_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_body(request: Request) -> bytes:
    """The request body, refused (413) past :data:`MAX_BODY` bytes without reading the rest."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY >> 20} MiB", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(config: ApiConfig, service: ApiService) -> Starlette:
    metrics = service.metrics

    def counted(endpoint: str, status: int, code: str | None = None) -> None:
        metrics.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            metrics.errors.labels(endpoint, code or str(status)).inc()

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY' (the key `swarm api "
                                "--api-key` was started with)", code="invalid_api_key")

    def failed(endpoint: str, error: BaseException) -> Response:
        api_error = from_exception(error)
        counted(endpoint, api_error.status, api_error.code)
        return json_response(api_error.body(), api_error.status)

    async def models(request: Request) -> Response:
        try:
            check_key(request)
            cards = await service.models()
        except Exception as e:
            return failed("models", e)
        counted("models", 200)
        return json_response({"object": "list", "data": to_json(cards)})

    async def model(request: Request) -> Response:
        try:
            check_key(request)
            model_id = request.path_params["model_id"]
            card = next((c for c in await service.models() if c.id == model_id), None)
            if card is None:
                await service.catalog.entry(model_id)  # raises the 404 naming what is served
        except Exception as e:
            return failed("models", e)
        counted("models", 200)
        return json_response(to_json(card))

    async def generate(request: Request, chat: bool) -> Response:
        arrived = time.perf_counter()
        endpoint = "chat.completions" if chat else "completions"
        try:
            check_key(request)
            body = parse_body(await _read_body(request))
            parsed = parse_chat(body) if chat else parse_completion(body)
            prepare = service.prepare_chat(parsed, arrived) if chat else service.prepare_completion(parsed, arrived)
            job = await _unless_disconnected(request.receive, prepare)
            if parsed.stream:
                chunks = responses.chat_chunks(job, parsed.include_usage) if chat else \
                    responses.completion_chunks(job, parsed.include_usage)
                return EventStream(chunks, lambda status, code: counted(endpoint, status, code))
            whole = responses.chat_completion(job) if chat else responses.completion(job)
            result = await _unless_disconnected(request.receive, whole)
        except _Disconnected:
            counted(endpoint, CLIENT_GONE, "client_disconnected")
            return Response(status_code=CLIENT_GONE)
        except Exception as e:
            return failed(endpoint, e)
        counted(endpoint, 200)
        return json_response(to_json(result))

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def health(request: Request) -> Response:
        try:
            entries = await service.catalog.entries()
        except Exception as e:
            return json_response({"status": "unavailable", "error": str(from_exception(e).message)}, 503)
        return json_response({"status": "ok", "models": len(entries),
                              "complete_models": sum(e.complete for e in entries.values())})

    async def metrics_page(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def page(request: Request) -> Response:
        return FileResponse(HERE / "static" / "index.html", headers={"Cache-Control": "no-store"})

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "no such route; the API serves /v1/models, /v1/chat/completions, /v1/completions" \
            if status == 404 else f"{request.method} is not allowed on {request.url.path}"
        return json_response(ApiError(status, message).body(), status)

    return Starlette(routes=[
        Route("/", page),
        Route("/health", health),
        Route("/metrics", metrics_page),
        Route("/v1/models", models),
        Route("/v1/models/{model_id:path}", model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ], exception_handlers={404: not_found, 405: not_found})


async def serve_api(config: ApiConfig) -> None:
    """Joins the swarm and serves the API until SIGINT/SIGTERM."""
    sock = listen(config.host, config.port)  # first: a busy port fails before joining the swarm
    try:
        async with ApiService(config) as service:
            url = url_of(sock)
            print(f"OpenAI-compatible API: {url}v1 (chat page: {url}, Prometheus: {url}metrics)", flush=True)
            await serve_until_signal(create_app(config, service), sock)
            logger.info("Stopping the API")
    finally:
        sock.close()


def run_api(config: ApiConfig) -> int:
    """``swarm api``: runs :func:`serve_api` in a new event loop; returns the exit code."""
    aio.run(serve_api(config))
    return 0
