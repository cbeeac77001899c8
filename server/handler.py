"""The server's RPC surface: ``info``, ``forward``, ``backward`` (:mod:`server.passes`), ``inference``, ``push``
and ``steps`` stream handlers.

Every request is validated (:mod:`server.checks`) before it touches the model; a bad
request gets an :class:`~swarm.wire.ErrorReply` and the server goes on serving everyone else.
An exception nobody anticipated (a bug, out of memory) is this server's fault: it is logged here at
ERROR with its traceback and answered with :class:`~swarm.errors.ServerError`, which clients retry
on another server.

No peer holds resources for long or beyond its share. Every stream counts against its opener's
quotas (:mod:`server.quotas`: streams, sessions, KV cache pages, forward/backward passes); every
read and write has a deadline (``--idle-timeout``; a session's ``--session-timeout``); a pass or
step whose client goes away is cancelled (:mod:`server.streams`); long forwards run in chunks
(:mod:`server.chunked_forward`); deep prompts and LoRA weights a session holds are charged to the
cache budget; sessions idle while the cache is full make room for busy ones (:mod:`server.room`). A session takes steps
from the stream that opened it, and pushed steps only from the hop its client named, with that
hop's token (:mod:`swarm.push_tokens`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from swarm import __version__, aio
from swarm.blocks import Span
from swarm.compression import check_scheme, roundtrip
from swarm.errors import (BadRequest, ServerBusy, ServerError, ServerUnavailable, SessionLengthExceeded, SwarmError,
                          UnknownSession, to_wire)
from swarm.lora import AppliedLora
from swarm.push_tokens import KEY_BYTES, check_push_token
from swarm.transport import check_opener
from swarm.wire import (
    HANDLERS,
    MAX_PROBE_BYTES,
    PROTOCOL_VERSION,
    ErrorReply,
    FetchOutputs,
    InferenceStep,
    InfoRequest,
    InfoResponse,
    OpenSession,
    SessionOpened,
    SessionOutputs,
    StepOutput,
    WireLimits,
    read_message,
    write_error,
)

from server.adapters import Adapter
from server.batching import StepBatcher
from server.checks import RequestChecks
from server.passes import PassHandlers
from server.compute import ComputeExecutor
from server.kv_cache import PagedKV, PagePool, ReorderMark, SessionCache
from server.push import MAX_NEXT_SERVERS, PushSender
from server.quotas import QuotaLimits, Quotas, StreamSlot
from server.room import make_room, room
from server.step_frames import serve_step_frames
from server.streams import read, send

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class HandlerLimits:
    max_session_length: int
    max_batch_size: int
    max_forward_tokens: int
    session_timeout: float
    max_backward_tokens: int = 8192
    max_lora_rank: int = 128
    max_adapter_bytes: int = 256 << 20
    max_batch_tokens: int = 512  # tokens of one batched inference forward; longer steps run in chunks
    batching: bool = True  # concurrent sessions' steps share a forward (off: one session's step at a time)
    forward_chunk_tokens: int = 2048  # a longer forward pass runs in chunks (server.chunked_forward)
    idle_timeout: float = 60.0  # a stream waiting this long for a request or for its client to read is closed
    evict_idle: float = 5.0  # when the cache is full, sessions idle this long make room for busy ones


@dataclasses.dataclass
class Session:
    session_id: str
    start: int
    end: int
    max_length: int
    batch_size: int
    cache: SessionCache  # its pages of the server's KV cache, its length and padding
    writer: asyncio.StreamWriter  # the client's stream: every answer for this session goes there
    peer: str = ""  # who opened it: its pages count against that peer's share, only it may send steps
    task: asyncio.Task | None = None  # the handler serving it (cancelled to evict the session)
    push_key: bytes = b""  # pushes into this session need a token under this key (swarm.push_tokens)
    lora: AppliedLora | None = None  # the adapter every step of this session runs with
    prompts: torch.Tensor | None = None  # deep prompts, added to the positions below their length
    echo: bool = True  # pushed steps are answered with their outputs too; off: acknowledged, outputs kept here
    outputs: torch.Tensor | None = None  # [batch, position, hidden] as sent on, kept when echo is off
    outputs_pages: int = 0  # cache pages charged for them
    outputs_reordered: ReorderMark = dataclasses.field(default_factory=ReorderMark)  # each beam reorder once
    position: int = 0
    last_step_id: int = 0
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)  # steps come from the client and pushes


class SpanHandler(PassHandlers, RequestChecks):
    """Serves one :class:`Span`; register with :meth:`add_to` and remove with :meth:`remove_from`."""

    def __init__(self, span: Span, *, model_name: str, dtype: torch.dtype, device: torch.device,
                 pool: PagePool, limits: HandlerLimits, executor: ComputeExecutor, public_name: str = "",
                 adapters: dict[str, Adapter] | None = None, quotas: Quotas | None = None):
        self.span, self.model_name, self.dtype, self.device = span, model_name, dtype, device
        self.pool, self.limits, self.executor, self.public_name = pool, limits, executor, public_name
        self.quotas = quotas or Quotas(QuotaLimits(), pool.capacity)
        self.batcher = StepBatcher(span, PagedKV(pool, span.start, len(span.blocks), device), executor, dtype,
                                   limits.max_batch_tokens, limits.batching)
        self.adapters = adapters or {}  # preloaded with --adapters, selected per request by name
        self.hidden_size = span.config.hidden_size
        # {global block index: {module path: module}}: where request LoRA weights go
        self._modules = {span.start + i: dict(block.named_modules()) for i, block in enumerate(span.blocks)}
        self.sessions: dict[str, Session] = {}
        self.leaving: str | None = None  # why this server takes no new sessions (it is leaving the swarm)
        self.pusher: PushSender | None = None
        self.p2p: Any = None  # set by add_to
        self._streams: set[asyncio.Task] = set()
        self._wire_limits = WireLimits(max_message_bytes=self._max_message_bytes())

    def _max_message_bytes(self) -> int:
        per_token = self.hidden_size * 4
        tokens = max(self.limits.max_forward_tokens, 2 * self.limits.max_backward_tokens,
                     self.limits.max_batch_size * 1024)
        return tokens * per_token + self.limits.max_adapter_bytes + (1 << 20)

    async def add_to(self, p2p) -> None:
        self.p2p = p2p
        self.pusher = PushSender(p2p)
        await p2p.add_binary_stream_handler(HANDLERS["push"], self._guard(self._handle_push))
        await p2p.add_binary_stream_handler(HANDLERS["info"], self._guard(self._handle_info))
        await p2p.add_binary_stream_handler(HANDLERS["forward"], self._guard(self._handle_forward))
        await p2p.add_binary_stream_handler(HANDLERS["backward"], self._guard(self._handle_backward))
        await p2p.add_binary_stream_handler(HANDLERS["inference"], self._guard(self._handle_inference))
        await p2p.add_binary_stream_handler(HANDLERS["steps"], self._guard(self._handle_steps))

    async def remove_from(self, p2p) -> None:
        for name in HANDLERS.values():
            with contextlib.suppress(Exception):
                await p2p.remove_binary_stream_handler(name)

    async def close_all(self) -> None:
        """Ends every open stream (and so every session); called on shutdown."""
        if self.pusher is not None:
            self.pusher.close()
        self.batcher.close()
        for task in list(self._streams):
            task.cancel()
        if self._streams:
            await asyncio.wait(list(self._streams), timeout=5)

    def _guard(self, handler):
        async def guarded(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            self._streams.add(task)
            slot = None
            try:
                slot, evicted = self.quotas.open_stream(stream_info.peer_id.to_base58(), task)
                if evicted is not None:  # the stream idle longest makes room (all streams together are capped)
                    evicted.key.cancel()
                # private swarms: a stranger's stream holds a slot (streams stay capped) until it fails the check
                await check_opener(self.p2p, stream_info, reader, self.limits.idle_timeout)
                await handler(slot, reader, writer)
            except (EOFError, ConnectionError, asyncio.IncompleteReadError):
                pass  # the peer went away; its sessions are freed by the handler's finally blocks
            except asyncio.TimeoutError:
                pass  # idle past --idle-timeout: the stream is closed below
            except SwarmError as e:
                with contextlib.suppress(Exception):
                    await aio.wait_for(write_error(writer, e), 5)
            except asyncio.CancelledError:
                pass
            except Exception as e:
                logger.exception("handler %s failed", handler.__name__)
                with contextlib.suppress(Exception):
                    await aio.wait_for(write_error(writer, ServerError(f"the server failed: {type(e).__name__}: {e}")),
                                       5)
            finally:
                self._streams.discard(task)
                if slot is not None:
                    self.quotas.close_stream(slot)
                with contextlib.suppress(Exception):
                    writer.close()

        return guarded

    # ---------------------------------------------------------------- info

    def info(self) -> InfoResponse:
        return InfoResponse(
            protocol_version=PROTOCOL_VERSION, version=__version__, model=self.model_name,
            start=self.span.start, end=self.span.end, hidden_size=self.hidden_size,
            dtype=str(self.dtype).removeprefix("torch."), max_session_length=self.limits.max_session_length,
            max_batch_size=self.limits.max_batch_size, cache_tokens_left=self.room(),
            public_name=self.public_name, num_blocks=self.span.config.num_hidden_layers,
        )

    async def _read(self, slot: StreamSlot, reader, timeout: float | None = None) -> Any:
        msg = await read(reader, self._wire_limits, self.limits.idle_timeout if timeout is None else timeout)
        slot.touch()
        return msg

    async def _send(self, writer, msg: Any, compression: str = "none") -> None:
        await send(writer, msg, self.limits.idle_timeout, compression)

    async def _handle_info(self, slot: StreamSlot, reader, writer) -> None:
        msg = await self._read(slot, reader)
        if not isinstance(msg, InfoRequest):
            raise BadRequest(f"the info handler expects InfoRequest, got {type(msg).__name__}")
        if not 0 <= msg.probe_reply_bytes <= MAX_PROBE_BYTES:
            raise BadRequest(f"probe_reply_bytes {msg.probe_reply_bytes} is outside 0..{MAX_PROBE_BYTES}")
        info = self.info()
        if msg.probe_reply_bytes:
            info = dataclasses.replace(info, probe=bytes(msg.probe_reply_bytes))
        await self._send(writer, info)

    # ---------------------------------------------------------------- inference

    async def _handle_inference(self, slot: StreamSlot, reader, writer) -> None:
        msg = await self._read(slot, reader)
        if not isinstance(msg, OpenSession):
            raise BadRequest(f"an inference stream must start with OpenSession, got {type(msg).__name__}")
        if self.leaving is not None:
            raise ServerUnavailable(f"this server takes no new sessions: {self.leaving}")
        self._check_blocks(msg.start, msg.end)
        if not 0 < msg.max_length <= self.limits.max_session_length:
            raise SessionLengthExceeded(f"max_length {msg.max_length} is outside 1..{self.limits.max_session_length} "
                                        "(this server's --max-session-length)")
        if not 0 < msg.batch_size <= self.limits.max_batch_size:
            raise BadRequest(f"batch_size {msg.batch_size} is outside 1..{self.limits.max_batch_size} "
                             "(this server's --max-batch-size)")
        if msg.session_id in self.sessions or not msg.session_id or len(msg.session_id) > 128:
            raise BadRequest(f"session id {msg.session_id[:128]!r} is empty, too long or already open here")
        if len(msg.push_key) not in (0, KEY_BYTES):
            raise BadRequest(f"push_key must be {KEY_BYTES} random bytes (or empty: no pushes), got {len(msg.push_key)}")
        lora = self._lora(msg, msg.start, msg.end, dropout=0.0)
        prompts = self._check_prompts(msg.prompts, msg.batch_size, msg.start, msg.end)
        if lora is not None:  # cast once: every step of the session uses them
            lora.modules = [(m, a.to(self.device, self.dtype), b.to(self.device, self.dtype))
                            for m, a, b in lora.modules]
        if self.pool.tokens_left < msg.batch_size * self.pool.page_tokens:
            self._make_room(msg.batch_size)
        if self.pool.tokens_left < msg.batch_size * self.pool.page_tokens:
            raise ServerBusy(f"this server's KV cache is full ({self.pool.tokens_left} tokens free of --cache-tokens "
                             f"{self.pool.capacity * self.pool.page_tokens}); retry later or use another server")
        self.quotas.open_session(slot.peer)
        cache = SessionCache(self.pool, msg.batch_size, self.quotas.account(slot.peer))
        session = Session(msg.session_id, msg.start, msg.end, msg.max_length, msg.batch_size, cache, writer,
                          slot.peer, asyncio.current_task(), push_key=msg.push_key, lora=lora, prompts=prompts,
                          echo=msg.echo)
        try:
            # what the session holds besides its keys and values counts against the budget as well
            held = (0 if prompts is None else prompts.nbytes) + (0 if lora is None or msg.adapter else sum(
                a.nbytes + b.nbytes for _, a, b in lora.modules))
            cache.charge(held, "this session's deep prompts and LoRA weights")
            self.sessions[session.session_id] = session
            try:
                await self._send(writer, SessionOpened(session.session_id, self.pool.tokens_left))
                await self._serve_session(session, slot, reader)
            finally:
                del self.sessions[session.session_id]
                self.batcher.forget(session)
        finally:
            cache.close()
            self.quotas.close_session(slot.peer)
            self.batcher.release_memory()

    async def _serve_session(self, session: Session, slot: StreamSlot, reader) -> None:
        """Steps from the client until it closes the stream or the session is idle (no step from the client
        nor pushed) for --session-timeout; a step still running when the client goes away is cancelled."""
        read_next = asyncio.ensure_future(read_message(reader, self._wire_limits))
        try:
            while True:
                idle = time.monotonic() - session.last_used
                if idle >= self.limits.session_timeout:
                    logger.info("session %s idle for %.0fs: closed", session.session_id[:8], idle)
                    return
                await asyncio.wait({read_next}, timeout=self.limits.session_timeout - idle)
                if not read_next.done():
                    continue
                msg = read_next.result()  # raises EOFError when the client closed the stream
                slot.touch()
                read_next = asyncio.ensure_future(read_message(reader, self._wire_limits))
                step = asyncio.ensure_future(self._send_outputs(session, msg) if isinstance(msg, FetchOutputs)
                                             else self._process_step(session, msg))
                await asyncio.wait({step, read_next}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done() and read_next.done() and read_next.exception() is not None:
                    step.cancel()  # the client went away (or sent garbage): its step is not worth finishing
                await asyncio.gather(step, return_exceptions=True)
                if not step.cancelled():
                    step.result()
        finally:
            read_next.cancel()
            await asyncio.gather(read_next, return_exceptions=True)

    async def _send_outputs(self, session: Session, msg: FetchOutputs) -> None:
        """The outputs a session without echo kept (a client replays them to the next server's replacement);
        a bad request gets an error and the session lives on."""
        async with session.lock:
            held = 0 if session.outputs is None else session.outputs.shape[1]
            if msg.session_id != session.session_id:
                error: SwarmError = UnknownSession(f"session {msg.session_id[:40]!r} is not the one open on this "
                                                   "stream")
            elif session.echo:
                error = BadRequest("this session was opened with echo: it sent its outputs and keeps none")
            elif not 0 <= msg.start < msg.end <= held:
                error = BadRequest(f"outputs of tokens {msg.start}:{msg.end} asked; this session holds 0:{held}")
            else:
                await self._send(session.writer, SessionOutputs(hidden=session.outputs[:, msg.start:msg.end],
                                                                start=msg.start))
                return
            await aio.wait_for(write_error(session.writer, error), self.limits.idle_timeout)

    def room(self) -> int:
        """Tokens (of one row) a new session can get (:func:`server.room.room`)."""
        return room(self.pool, self.sessions.values(), self.limits.evict_idle)

    def _make_room(self, pages: int, busy: Session | None = None) -> None:
        make_room(self.pool, list(self.sessions.values()), pages, self.limits.evict_idle, busy)

    async def _handle_push(self, slot: StreamSlot, reader, writer) -> None:
        """Steps pushed by the previous server of a chain, for any session open here.

        The previous server pushes every session's steps through one stream; each step runs as a task of
        its own, so the pushed steps of concurrent sessions batch like steps their clients send. A
        session's next pushed step waits for its last (its steps run in order, and a peer cannot queue
        more steps than sessions are open)."""
        last: dict[str, asyncio.Task] = {}  # each session's latest pushed step
        while True:
            msg = await self._read(slot, reader)
            if not isinstance(msg, InferenceStep):
                raise BadRequest(f"the push handler expects InferenceStep, got {type(msg).__name__}")
            session = self.sessions.get(msg.session_id)
            if session is None:  # closed meanwhile, or never here; the client's timeout covers it
                logger.info("push for unknown session %r ignored", msg.session_id[:40])
                continue
            hidden = msg.hidden
            new_tokens = hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.ndim == 3 else -1
            if not check_push_token(session.push_key, msg.push_token, slot.peer, msg.step_id, msg.start_position,
                                    new_tokens, msg.hypo_ids):
                logger.warning("push from %s into session %s refused: not the hop its client named for step %d "
                               "(or a wrong token)", slot.peer, session.session_id[:8], msg.step_id)
                continue
            previous = last.get(session.session_id)
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            for key in [key for key, task in last.items() if task.done()]:
                del last[key]
            task = asyncio.create_task(self._process_pushed(session, msg))
            last[session.session_id] = task
            self._streams.add(task)  # cancelled by close_all like a stream
            task.add_done_callback(self._streams.discard)

    async def _handle_steps(self, slot: StreamSlot, reader, writer) -> None:
        await serve_step_frames(self, slot, reader, writer)

    async def _process_pushed(self, session: Session, msg: InferenceStep) -> None:
        try:
            await self._process_step(session, msg)
        except (EOFError, ConnectionError, SwarmError, asyncio.TimeoutError) as e:  # its client went away meanwhile
            logger.info("pushed step of session %s not answered: %s", session.session_id[:8], e)
        except Exception:
            logger.exception("pushed step of session %s failed", session.session_id[:8])

    async def _process_step(self, session: Session, msg, answer: Callable[..., Awaitable[None]] | None = None
                            ) -> None:
        """Runs one step and answers on the session's stream (or with ``answer(reply, compression="none")``: a
        step of InferenceSteps); a bad step gets an error, the session lives on."""
        answer = answer or (lambda reply, compression="none": self._send(session.writer, reply, compression))
        async with session.lock:
            step_id = getattr(msg, "step_id", 0)
            if 0 < step_id <= session.last_step_id:
                return  # already answered: it was pushed and then sent by the client too
            try:
                step = self._check_step(session, msg)
                missing = session.cache.missing_pages(step.start_position + step.hidden.shape[1])
                kept = self._outputs_to_charge(session, step)
                if missing + kept > self.pool.tokens_left // self.pool.page_tokens:
                    self._make_room(missing + kept, busy=session)
                if kept:
                    session.cache.charge(kept * self.pool.page_bytes, "the outputs this session keeps (opened "
                                                                     "without echo)")
                    session.outputs_pages += kept
                out = await self.batcher.run(session, step)
            except (BadRequest, ServerBusy) as e:
                # the session stays usable: the client may correct the request, retry, or go elsewhere
                session.position = session.cache.length
                await answer(ErrorReply(*to_wire(e)))
                return
            except Exception as e:
                # its cache may be half-updated: the session ends, the client replays it elsewhere
                if not isinstance(e, SwarmError):
                    logger.exception("inference step of session %s failed", session.session_id[:8])
                    e = ServerError(f"the server failed: {type(e).__name__}: {e}")
                with contextlib.suppress(Exception):
                    await answer(ErrorReply(*to_wire(e)))
                session.writer.close()
                return
            session.position = session.cache.length
            session.last_used = time.monotonic()
            session.last_step_id = max(session.last_step_id, step_id)
            pushed = False
            scheme = step.compression[0] if step.compression else "none"  # the next link's, as the client chose
            if not session.echo:  # keep what the next server gets, for a replay if it fails
                kept = session.outputs if session.outputs is not None else out[:, :0]
                if step.hypo_ids is not None and session.outputs_reordered.first(step.start_position, step.hypo_ids):
                    kept = kept[step.hypo_ids]
                session.outputs = torch.cat([kept[:, :step.start_position], roundtrip(out, scheme)], dim=1)
            if step.next_servers and self.pusher is not None:
                (peer_id, next_session_id, token), rest = step.next_servers[0], step.next_servers[1:]
                pushed = await self.pusher.push(peer_id, InferenceStep(
                    session_id=next_session_id, hidden=out, start_position=step.start_position,
                    hypo_ids=step.hypo_ids, step_id=step_id, next_servers=rest, push_token=token,
                    attention_mask=None if step.attention_mask is None else step.attention_mask.long(),
                    position_ids=step.position_ids, compression=step.compression[1:]), scheme)
            # the same scheme as the push: what the client keeps for replays is what the next server got
            echoed = None if pushed and not session.echo else out
            await answer(StepOutput(hidden=echoed, position=session.position, step_id=step_id, pushed=pushed), scheme)

    def _outputs_to_charge(self, session: Session, step: InferenceStep) -> int:
        """Pages still to charge for the outputs a session without echo keeps once ``step`` ran
        ([batch, position, hidden] in the compute dtype; charged as they grow, given back when it closes)."""
        if session.echo:
            return 0
        rows, new, hidden = step.hidden.shape
        nbytes = rows * (step.start_position + new) * hidden * torch.empty((), dtype=self.dtype).element_size()
        return max(0, -(-nbytes // self.pool.page_bytes) - session.outputs_pages)

    def _check_step(self, session: Session, msg) -> InferenceStep:
        if not isinstance(msg, InferenceStep):
            raise BadRequest(f"expected InferenceStep, got {type(msg).__name__}")
        if msg.session_id != session.session_id:
            known = "another stream" if msg.session_id in self.sessions else "no stream on this server"
            raise UnknownSession(f"session {msg.session_id[:40]!r} is not the one open on this stream "
                                 f"({session.session_id[:40]!r}); it belongs to {known}")
        hidden = self._check_hidden(msg.hidden, "InferenceStep.hidden")
        if msg.step_id < 0:
            raise BadRequest(f"step_id must be 0 (none) or positive, got {msg.step_id}")
        if len(msg.next_servers) > MAX_NEXT_SERVERS or any(
                len(peer) > 128 or len(sid) > 128 or len(token) > 64 for peer, sid, token in msg.next_servers):
            raise BadRequest(f"next_servers must list at most {MAX_NEXT_SERVERS} (peer id, session id, push token) "
                             "of at most 128, 128 and 64 bytes each")
        if len(msg.compression) > MAX_NEXT_SERVERS + 1:
            raise BadRequest(f"compression lists at most {MAX_NEXT_SERVERS + 1} schemes, one per link")
        for scheme in msg.compression:
            check_scheme(scheme)
        batch, new_tokens = hidden.shape[0], hidden.shape[1]
        if batch != session.batch_size:
            raise BadRequest(f"step batch {batch} differs from the session's batch_size {session.batch_size}")
        if not 0 <= msg.start_position <= session.position:
            raise BadRequest(f"start_position {msg.start_position} must be within 0..{session.position} "
                             "(the tokens this session holds)")
        if msg.start_position + new_tokens > session.max_length:
            raise SessionLengthExceeded(
                f"the session would hold {msg.start_position + new_tokens} tokens, more than its max_length "
                f"{session.max_length}; open a session with a larger max_length")
        if msg.hypo_ids is not None:
            ids = msg.hypo_ids
            if ids.dtype != torch.int64 or ids.shape != (batch,) or (ids.numel() and not (
                    0 <= int(ids.min()) and int(ids.max()) < batch)):
                raise BadRequest(f"hypo_ids must be int64 of shape [{batch}] with values in 0..{batch - 1}")
        mask, positions = self._check_padding(msg.attention_mask, msg.position_ids, hidden, "InferenceStep")
        if hidden is msg.hidden and mask is msg.attention_mask:
            return msg
        return dataclasses.replace(msg, hidden=hidden, attention_mask=mask, position_ids=positions)
