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

Only plain steps go this way (no beam reorder, no padding, no push); the session's stream still
opens it, replays it and carries every other step. Each step keeps its own timeout. If the frame
cannot be sent or the stream breaks, every step waiting on it fails with that server's error, and
each session routes around the server as it would after a failure of its own stream
(:mod:`client.inference_session`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import torch

from swarm import aio
from swarm.errors import ServerError, ServerUnavailable, SwarmError, server_reply_error
from swarm.transport import Stream
from swarm.wire import InferenceStep, InferenceSteps, StepOutput, StepOutputs

logger = logging.getLogger(__name__)

MAX_HOLD = 0.05  # seconds a step may wait for other sessions' steps to join its frame (at most one round trip)


class StepFrames:
    """The ``steps`` stream of this client to one server, and the steps waiting on it.

    ``open_stream()`` opens the stream (a :class:`~swarm.transport.Stream`; tests pass fakes)."""

    def __init__(self, open_stream: Callable[[], Awaitable[Stream]], peer_id: str):
        self.open_stream, self.peer_id = open_stream, peer_id
        self._stream: Stream | None = None
        self._reader: asyncio.Task | None = None
        self._queue: list[tuple[InferenceStep, asyncio.Future]] = []  # to go out in the next frame
        self._waiting: dict[tuple[str, int], asyncio.Future] = {}  # sent: (session id, step id) -> answer
        self._sent_at: dict[tuple[str, int], float] = {}  # when each step in flight went out
        self._returning: set[str] = set()  # sessions answered by the last reply that have not stepped again
        self._round = 0.0  # the last frame's round trip (seconds)
        self._wake = asyncio.Event()  # a step came, an answer came, or a step was given up
        self._flushing: asyncio.Task | None = None
        self.frames_sent = 0  # frames and steps sent (for tests and benchmarks)
        self.steps_sent = 0

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
            self._sent_at = {key: t for key, t in self._sent_at.items() if key in self._waiting}
            try:
                stream = await self._open()
                now = loop.time()
                for step, future in batch:
                    self._waiting[(step.session_id, step.step_id)] = future
                    self._sent_at[(step.session_id, step.step_id)] = now
                await stream.send(InferenceSteps(
                    session_ids=tuple(s.session_id for s, _ in batch), hidden=tuple(s.hidden for s, _ in batch),
                    start_positions=tuple(s.start_position for s, _ in batch),
                    step_ids=tuple(s.step_id for s, _ in batch)))
            except SwarmError as e:
                self._fail(e, [f for _, f in batch])
                continue
            self.frames_sent += 1
            self.steps_sent += len(batch)

    async def _open(self) -> Stream:
        if self._stream is None:
            self._stream = await self.open_stream()
            self._reader = asyncio.ensure_future(self._read(self._stream))
        return self._stream

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
                for i, key in enumerate(zip(reply.session_ids, reply.step_ids)):
                    future, sent_at = self._waiting.pop(key, None), self._sent_at.pop(key, now)
                    if future is None or future.done():
                        continue  # a step given up meanwhile
                    self._round = now - sent_at
                    if reply.error_codes[i]:
                        future.set_exception(server_reply_error(reply.error_codes[i], reply.error_messages[i],
                                                                self.peer_id))
                    else:
                        self._returning.add(key[0])  # likely to step again soon
                        future.set_result(StepOutput(hidden=reply.hidden[i], position=reply.positions[i],
                                                     step_id=key[1]))
        except SwarmError as e:
            if self._stream is stream:
                self._stream = None
            stream.close()
            self._fail(e, list(self._waiting.values()))
        except asyncio.CancelledError:
            stream.close()
            raise

    def _fail(self, error: SwarmError, futures: list[asyncio.Future]) -> None:
        for future in futures:
            if not future.done():
                future.set_exception(error)
        self._waiting = {key: f for key, f in self._waiting.items() if not f.done()}
        self._sent_at = {key: t for key, t in self._sent_at.items() if key in self._waiting}

    async def close(self) -> None:
        for task in (self._flushing, self._reader):
            if task is not None and not task.done():
                task.cancel()
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._fail(ServerUnavailable(f"the steps stream to server {self.peer_id} was closed"),
                   [f for _, f in self._queue] + list(self._waiting.values()))
        self._queue = []


def plain(step: InferenceStep) -> bool:
    """A step that may travel in a frame: no beam reorder, padding, push or compressed answer, and an id to answer
    it by."""
    return (step.step_id > 0 and step.hypo_ids is None and step.attention_mask is None and step.position_ids is None
            and not step.next_servers and all(scheme == "none" for scheme in step.compression)
            and isinstance(step.hidden, torch.Tensor))
