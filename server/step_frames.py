"""The ``steps`` stream: a client's concurrent steps to this server, several sessions' in one frame.

A client that steps many sessions through the same server at once (an API serving many users, a
batch of chats) would send one :class:`~swarm.wire.InferenceStep` per session, each on its session's
own stream: per step one message through the client, both ``p2pd`` daemons and this server's event
loop, which on a small model costs more than the batched forward itself. Instead it may send them
together as one :class:`~swarm.wire.InferenceSteps` on a ``steps`` stream. Each step runs exactly as
if it came on its session's stream (same checks, same batching, same errors: a bad step leaves its
session usable, a failed one ends it), and one :class:`~swarm.wire.StepOutputs` frame answers them
all, each step with its output or its own error. A peer may step only sessions it opened; frames are
served concurrently, at most :data:`MAX_FRAMES_IN_FLIGHT` at a time; a frame that breaks the
protocol ends the stream (not the sessions).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import torch

from swarm.errors import BadRequest, UnknownSession, to_wire
from swarm.wire import ErrorReply, InferenceStep, InferenceSteps, StepOutput, StepOutputs

from server.quotas import StreamSlot

if TYPE_CHECKING:
    from server.handler import SpanHandler

MAX_FRAMES_IN_FLIGHT = 8  # InferenceSteps frames of one steps stream served at once


async def serve_step_frames(handler: "SpanHandler", slot: StreamSlot, reader, writer) -> None:
    """Serves a ``steps`` stream until the client closes it (or it stays idle past the sessions' timeout)."""
    running: set[asyncio.Task] = set()
    limits = handler.limits
    try:
        while True:
            # sessions close after --session-timeout idle seconds: this stream may wait as long for them
            msg = await handler._read(slot, reader, timeout=max(limits.idle_timeout, limits.session_timeout))
            if not isinstance(msg, InferenceSteps):
                raise BadRequest(f"the steps handler expects InferenceSteps, got {type(msg).__name__}")
            count = len(msg.session_ids)
            if not len(msg.hidden) == len(msg.start_positions) == len(msg.step_ids) == count:
                raise BadRequest("InferenceSteps must give as many hidden states, start positions and step ids as "
                                 "session ids")
            if len(set(msg.session_ids)) != count:
                raise BadRequest("InferenceSteps may carry one step per session")
            while len(running) >= MAX_FRAMES_IN_FLIGHT:
                await asyncio.wait(set(running), return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(_answer_frame(handler, slot.peer, msg, writer))
            running.add(task)
            task.add_done_callback(running.discard)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _answer_frame(handler: "SpanHandler", peer: str, msg: InferenceSteps, writer) -> None:
    replies = await asyncio.gather(*(_run_step(handler, peer, msg, i) for i in range(len(msg.session_ids))))
    empty = torch.zeros(0)
    await handler._send(writer, StepOutputs(
        session_ids=msg.session_ids, step_ids=msg.step_ids,
        hidden=tuple(r.hidden if isinstance(r, StepOutput) else empty for r in replies),
        positions=tuple(r.position if isinstance(r, StepOutput) else 0 for r in replies),
        error_codes=tuple(r.code if isinstance(r, ErrorReply) else "" for r in replies),
        error_messages=tuple(r.message if isinstance(r, ErrorReply) else "" for r in replies)))


async def _run_step(handler: "SpanHandler", peer: str, msg: InferenceSteps, i: int) -> StepOutput | ErrorReply:
    """Step ``i`` of ``msg``, run as if it came on its session's stream; its answer."""
    session = handler.sessions.get(msg.session_ids[i])
    if session is None or session.peer != peer:
        return ErrorReply(*to_wire(UnknownSession(f"no session {msg.session_ids[i][:40]!r} of yours is open on "
                                                  "this server")))
    replies: list[StepOutput | ErrorReply] = []

    async def keep(reply: StepOutput | ErrorReply, compression: str = "none") -> None:
        replies.append(reply)  # (a frame's steps carry no compression: "none")

    step = InferenceStep(session_id=session.session_id, hidden=msg.hidden[i], start_position=msg.start_positions[i],
                         step_id=msg.step_ids[i])
    await handler._process_step(session, step, keep)
    return replies[0] if replies else ErrorReply(*to_wire(BadRequest(
        f"step {msg.step_ids[i]} of session {session.session_id[:8]} was answered already")))
