"""Concurrent steps of this client's sessions to one server travel as one frame (the ``steps`` stream).

Many sessions stepping through the same server at once (an API serving many users, a batch of
chats) each send a one-token step and wait for its answer. Sent one by one, on their sessions' own
streams, every step is a message through this process, both ``p2pd`` daemons and the server's event
loop; on a small model that costs more than the server's batched forward. :class:`StepFrames`
collects the steps that sessions hand it and sends them as one :class:`~swarm.wire.InferenceSteps`
on a ``steps`` stream to that server (opened once, kept); the server runs them as one batch and
answers with one :class:`~swarm.wire.StepOutputs`, which hands each step its own output or its own
error. Sessions answered together step again together, so their next steps share a frame too.

Sessions that started apart would stay apart (one frame out while the others' answers come back,
each frame a batch of its own), so a frame waits until every session the last answer freed has
stepped again and no frame to that server is still out -- for at most one round trip (the last
measured, and :data:`MAX_HOLD`): then sessions that were apart step together from the next round
on. A lone session never waits; a session that closed, failed or is busy elsewhere is waited for
at most that long, once.

Only plain one-token steps go this way (no prefill, beam reorder, padding or push); the session's stream still
opens it, replays it and carries every other step. Each step keeps its own timeout. If the frame
cannot be sent or the stream breaks, every step waiting on it fails with that server's error, and
each session routes around the server as it would after a failure of its own stream
(:mod:`client.inference_session`). Two exceptions: a server that does not serve the ``steps``
protocol (an older one), and a ``steps`` stream that cannot be opened just now, leave the step on
its session's own stream (:meth:`StepFrames.usable`); and a frame sent on a stream that had been
idle, which the server closes (it closes idle streams) before answering any of it, goes again once
on a new stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable

import torch

from swarm import aio
from swarm.errors import ServerError, ServerUnavailable, SwarmError, server_reply_error
from swarm.transport import Stream
from swarm.wire import InferenceStep, InferenceSteps, StepOutput, StepOutputs

logger = logging.getLogger(__name__)

MAX_HOLD = 0.05  # seconds a step may wait for other sessions' steps to join its frame (at most one round trip)
NOT_SERVED = "protocols not supported"  # what p2pd says when a server has no handler for a protocol


class StepFrames:
    """The ``steps`` stream of this client to one server, and the steps waiting on it.

    ``open_stream()`` opens the stream (a :class:`~swarm.transport.Stream`; tests pass fakes)."""

    def __init__(self, open_stream: Callable[[], Awaitable[Stream]], peer_id: str):
        self.open_stream, self.peer_id = open_stream, peer_id
        self._stream: Stream | None = None
        self._opening: asyncio.Future | None = None  # the stream being opened (one try for every step waiting)
        self._reader: asyncio.Task | None = None
        self._queue: list[tuple[InferenceStep, asyncio.Future]] = []  # to go out in the next frame
        self._waiting: dict[tuple[str, int], asyncio.Future] = {}  # sent: (session id, step id) -> answer
        self._sent: dict[tuple[str, int], _Sent] = {}  # each step in flight: when and on which stream it went out
        self._after_idle: set[tuple[str, int]] = set()  # the last frame, sent on an idle used stream, unanswered
        self.served = True  # False once the server turned the steps protocol down: sessions step on their streams
        self._returning: set[str] = set()  # sessions answered by the last reply that have not stepped again
        self._round = 0.0  # the last frame's round trip (seconds)
        self._wake = asyncio.Event()  # a step came, an answer came, or a step was given up
        self._flushing: asyncio.Task | None = None
        self.frames_sent = 0  # frames and steps sent (for tests and benchmarks)
        self.steps_sent = 0

    async def usable(self) -> bool:
        """Whether the next step may go in a frame: the steps stream is open (or opens now). False if the server
        does not serve the protocol (from now on), or if the stream cannot be opened just now (then the step goes
        on its session's stream, which fails over as usual if the server is gone)."""
        if not self.served:
            return False
        try:
            await self._open()
        except SwarmError as e:
            if NOT_SERVED in str(e):
                self.served = False
                logger.info("Server %s does not serve step frames: its sessions step on their own streams",
                            self.peer_id)
            return False
        return True

    def submit(self, step: InferenceStep) -> asyncio.Future:
        """Queues ``step`` (a plain step with a step id > 0) for the next frame; the future gets its
        :class:`StepOutput` or the server's error for it."""
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: self._wake.set())
        self._queue.append((step, future))
        self._returning.discard(step.session_id)
        self._wake.set()
        if self._flushing is None or self._flushing.done():  # runs after every step handed over in this turn
            self._flushing = asyncio.ensure_future(self._flush())
        return future

    async def answer(self, future: asyncio.Future, timeout: float) -> StepOutput:
        """The answer :meth:`submit` promised; ``ServerUnavailable`` after ``timeout`` seconds."""
        try:
            return await aio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise ServerUnavailable(f"server {self.peer_id} did not answer in {timeout:.0f}s") from None
        finally:
            if not future.done():  # given up (timed out or cancelled): its answer, if it comes, is dropped
                future.cancel()

    def forget(self, session_id: str) -> None:
        """The session closed: the next frame does not wait for it."""
        self._returning.discard(session_id)
        self._wake.set()

    def _gathering(self) -> bool:
        """Steps are still to join the next frame: sessions the last reply answered have not stepped again, or
        steps sent before are still out (their sessions will step again as soon as they are answered)."""
        return bool(self._returning) or any(not f.done() for f in self._waiting.values())

    async def _flush(self) -> None:
        """Sends the queued steps once every session about to step has (see :meth:`_gathering`), or after one
        round trip of holding: sessions answered apart come to step together, in one frame and one batch."""
        loop = asyncio.get_running_loop()
        while self._queue:
            deadline = loop.time() + min(MAX_HOLD, self._round)
            while self._gathering() and loop.time() < deadline:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await aio.wait_for(self._wake.wait(), deadline - loop.time())
            self._returning.clear()  # who did not come back in time is not waited for
            batch, self._queue = [(s, f) for s, f in self._queue if not f.done()], []
            if not batch:
                return
            self._waiting = {key: f for key, f in self._waiting.items() if not f.done()}  # given up: not answered
            self._sent = {key: sent for key, sent in self._sent.items() if key in self._waiting}
            try:
                await self._send(batch, loop.time())
            except SwarmError as e:
                self._fail(e, [f for _, f in batch])
                continue
            self.frames_sent += 1
            self.steps_sent += len(batch)

    async def _send(self, batch: list[tuple[InferenceStep, asyncio.Future]], now: float) -> None:
        """Sends one frame; on a used stream that had been idle, a failed send goes again once on a new stream."""
        fresh = self._stream is None
        stream = await self._open()
        idle = not fresh and not any(not f.done() for f in self._waiting.values())
        frame = InferenceSteps(
            session_ids=tuple(s.session_id for s, _ in batch), hidden=tuple(s.hidden for s, _ in batch),
            start_positions=tuple(s.start_position for s, _ in batch), step_ids=tuple(s.step_id for s, _ in batch))

        def sending(on: Stream | None) -> None:  # the frame's steps are in flight on ``on`` (None: on none)
            for step, future in batch:
                key = (step.session_id, step.step_id)
                if on is None:
                    self._waiting.pop(key, None), self._sent.pop(key, None)
                else:
                    self._waiting[key], self._sent[key] = future, _Sent(step, on, now)

        sending(stream)
        try:
            await stream.send(frame)
        except ServerUnavailable:
            if not idle:
                raise
            sending(None)  # the server closed it while idle (its reader must not fail them): a new stream, once
            self._drop(stream)
            stream = await self._open()
            sending(stream)
            await stream.send(frame)
            return
        self._after_idle = {(s.session_id, s.step_id) for s, _ in batch} if idle else set()

    async def _open(self) -> Stream:
        """The steps stream, opened if none is (one try at a time: every step waiting meanwhile shares it)."""
        if self._stream is not None:
            return self._stream
        if self._opening is None or self._opening.done():
            self._opening = asyncio.ensure_future(self._open_new())
        return await asyncio.shield(self._opening)

    async def _open_new(self) -> Stream:
        stream = self._stream = await self.open_stream()
        self._reader = asyncio.ensure_future(self._read(stream))
        return stream

    def _drop(self, stream: Stream) -> None:
        if self._stream is stream:
            self._stream = None
        stream.close()

    async def _read(self, stream: Stream) -> None:
        """Hands each answer to its step until the stream breaks; then every step waiting fails."""
        try:
            while True:
                reply = await stream.receive(None, StepOutputs)
                count = len(reply.session_ids)
                if not len(reply.step_ids) == len(reply.hidden) == len(reply.positions) == len(
                        reply.error_codes) == len(reply.error_messages) == count:
                    raise ServerError(f"server {self.peer_id} sent StepOutputs with fields of different lengths")
                now = asyncio.get_running_loop().time()
                self._after_idle = set()  # the server reads this stream
                for i, key in enumerate(zip(reply.session_ids, reply.step_ids)):
                    future, sent = self._waiting.pop(key, None), self._sent.pop(key, None)
                    if future is None or future.done():
                        continue  # a step given up meanwhile
                    self._round = now - (sent.at if sent is not None else now)
                    if reply.error_codes[i]:
                        future.set_exception(server_reply_error(reply.error_codes[i], reply.error_messages[i],
                                                                self.peer_id))
                    else:
                        self._returning.add(key[0])  # likely to step again soon
                        future.set_result(StepOutput(hidden=reply.hidden[i], position=reply.positions[i],
                                                     step_id=key[1]))
        except SwarmError as e:
            self._drop(stream)
            mine = {key: f for key, f in self._waiting.items() if key in self._sent and self._sent[key].stream is stream}
            again = [(self._sent[key].step, f) for key, f in mine.items() if key in self._after_idle and not f.done()]
            self._after_idle = set()
            if again:  # a frame sent on an idle stream that the server closed before reading it: once more
                for key in {(s.session_id, s.step_id) for s, _ in again}:
                    del self._waiting[key], self._sent[key]
                self._queue[:0] = again
                if self._flushing is None or self._flushing.done():
                    self._flushing = asyncio.ensure_future(self._flush())
            self._fail(e, [f for key, f in mine.items() if key in self._waiting])
        except asyncio.CancelledError:
            stream.close()
            raise

    def _fail(self, error: SwarmError, futures: list[asyncio.Future]) -> None:
        for future in futures:
            if not future.done():
                future.set_exception(error)
        self._waiting = {key: f for key, f in self._waiting.items() if not f.done()}
        self._sent = {key: sent for key, sent in self._sent.items() if key in self._waiting}

    async def close(self) -> None:
        for task in (self._flushing, self._reader, self._opening):
            if task is not None and not task.done():
                task.cancel()
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._fail(ServerUnavailable(f"the steps stream to server {self.peer_id} was closed"),
                   [f for _, f in self._queue] + list(self._waiting.values()))
        self._queue = []


@dataclasses.dataclass
class _Sent:
    """A step in flight: sent on ``stream`` at ``at`` (loop time)."""

    step: InferenceStep
    stream: Stream
    at: float


def plain(step: InferenceStep) -> bool:
    """A step that may travel in a frame: one new token per row (a frame is answered once all its steps ran, so a
    prefill in it would hold the decode steps beside it for its whole forward, not one chunk), no beam reorder,
    padding, push or compressed answer, and an id to answer it by."""
    return (step.step_id > 0 and step.hypo_ids is None and step.attention_mask is None and step.position_ids is None
            and not step.next_servers and all(scheme == "none" for scheme in step.compression)
            and isinstance(step.hidden, torch.Tensor) and step.hidden.ndim == 3 and step.hidden.shape[1] == 1)
