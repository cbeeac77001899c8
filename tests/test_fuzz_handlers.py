"""Malformed frames on every handler of a real server: each gets a clear error or a closed stream.

A fixed seed draws 240 frames per handler (info, forward, backward, inference: at open and as
steps of an open session, push, steps: frames of steps for an open session): random bytes, broken headers, unknown types, fields of the wrong
type or out of range, dropped fields, bad tensor metadata and sizes, messages for another handler,
and valid frames cut short. Every complete frame must be answered within 10 s by an ``ErrorReply``
with a code a client can act on (never ``server_error``, which would mean an exception nobody
anticipated) or a valid answer (a mutation may leave a valid request), or by closing the stream;
a frame cut short is followed by closing the stream. Afterwards the server answers ``info`` and an
honest session step, and its log holds no ERROR.
"""

from __future__ import annotations

import asyncio
import random
import struct
import uuid

import msgpack
import pytest
import torch

from swarm.dht import Peer
from swarm.errors import SwarmError
from swarm.transport import Stream
from swarm.wire import (
    BackwardRequest,
    ErrorReply,
    ForwardRequest,
    InferenceStep,
    InferenceSteps,
    InfoRequest,
    OpenSession,
    SessionOpened,
    StepOutput,
    StepOutputs,
    encode,
    expect,
)

from peer_helpers import join, server_info, server_of

pytestmark = pytest.mark.integration
PER_HANDLER = 240
HANDLERS = ("info", "forward", "backward", "open", "step", "push", "steps")
ANSWER_WITHIN = 10.0
CLEAR_CODES = {"bad_request", "unknown_session", "session_length_exceeded", "server_busy", "protocol_version"}
WEIRD = [None, -1, 0, 2**63 - 1, -(2**63), 1.5, float("nan"), float("inf"), "", "x" * 300, b"\xff" * 9, [], {},
         [1, "a"], {"__tensor__": 0}, {"__tensor__": 99, "dtype": "float32", "shape": [1]}, True]


def _valid(handler: str, session_id: str) -> object:
    hidden = torch.randn(1, 3, 64)
    if handler == "info":
        return InfoRequest()
    if handler == "forward":
        return ForwardRequest(hidden=hidden, start=1, end=3)
    if handler == "backward":
        return BackwardRequest(hidden=hidden, grad_output=torch.randn(1, 3, 64), start=1, end=3)
    if handler == "open":
        return OpenSession(session_id=uuid.uuid4().hex, start=1, end=3, max_length=16)
    if handler == "steps":
        return InferenceSteps(session_ids=(session_id,), hidden=(hidden[:, :1],), start_positions=(0,), step_ids=(1,))
    return InferenceStep(session_id=session_id, hidden=hidden[:, :1], start_position=0, step_id=0)


def _frame(header: object, buffers: list[bytes]) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<I", len(packed)) + packed + b"".join(buffers)


def _mutate(msg: object, rng: random.Random) -> tuple[bytes, bool]:
    """A malformed frame built from ``msg``, and whether it is complete (else it is cut short)."""
    parts = encode(msg)
    header = msgpack.unpackb(parts[0][4:], raw=False)
    buffers = [bytes(p) for p in parts[1:]]
    fields = header["fields"]
    kind = rng.randrange(11)
    if kind == 0:  # noise
        return bytes(rng.randrange(256) for _ in range(rng.randrange(4, 64))), False
    if kind == 1:  # a header longer than any peer accepts
        return struct.pack("<I", 2**31) + b"\0" * 16, True
    if kind == 2:  # a header of the declared length that is not msgpack, or not a map
        body = rng.choice([bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))),
                           msgpack.packb(rng.choice([[1, 2], 7, "type", None]))])
        return struct.pack("<I", len(body)) + body, True
    if kind == 3:  # an unknown or missing type, or fields that are not a map
        header = dict(header)
        header[rng.choice(["type", "fields"])] = rng.choice(WEIRD[:12] + ["NoSuchMessage", "ErrorReply"])
        return _frame(header, buffers), True
    if kind in (4, 5, 6):  # a field of the wrong type or out of range, or several
        for _ in range(rng.randrange(1, 3)):
            if fields:
                fields[rng.choice(sorted(fields))] = rng.choice(WEIRD)
        return _frame(header, buffers), True
    if kind == 7:  # a field dropped
        if fields:
            del fields[rng.choice(sorted(fields))]
        return _frame(header, buffers), True
    if kind == 8:  # tensor metadata that does not match its bytes
        metas = [v for v in fields.values() if isinstance(v, dict) and "__tensor__" in v]
        if metas:
            meta = rng.choice(metas)
            key = rng.choice(["dtype", "shape", "__tensor__"])
            meta[key] = rng.choice({"dtype": ["float64", "int8", "bool", 3, "complex64", "int64"],
                                    "shape": [[-1], [2**40], [1] * 9, "3", [1, 3, 65], [0, 3, 64], [3, 1, 64]],
                                    "__tensor__": [-1, 5, "0", None]}[key])
        return _frame(header, buffers), True
    if kind == 9:  # sizes that lie or overflow
        header["sizes"] = rng.choice([[-5], "12", [2**40], [1] * 3, [0], [len(b) + 4 for b in buffers]])
        return _frame(header, buffers), not any(isinstance(s, int) and s > 0 for s in header["sizes"]) or (
            header["sizes"] == [2**40])
    data = b"".join(bytes(p) for p in parts)  # a valid frame cut short
    return data[:rng.randrange(1, len(data))], False


async def _answer(stream: Stream, case: str) -> object | None:
    """The server's answer within ANSWER_WITHIN, or None if it closed the stream."""
    try:
        return await stream.receive(ANSWER_WITHIN)
    except SwarmError as e:
        if "closed the stream" in str(e):
            return None
        raise AssertionError(f"no answer and no close within {ANSWER_WITHIN}s ({e}) to {case}") from None


def _check(answer: object, case: str) -> None:
    if isinstance(answer, ErrorReply):
        assert answer.code in CLEAR_CODES and answer.message, (case, answer)
    if isinstance(answer, StepOutputs):  # each step's own error must be as clear
        assert all(code in CLEAR_CODES | {""} for code in answer.error_codes), (case, answer)


def test_malformed_frames_on_every_handler_get_clear_errors(llama_swarm):
    server_log = llama_swarm.procs[2]  # blocks 1:3
    log_start = len(server_log.log())
    rng = random.Random(1234)
    counts = {"answered": 0, "error": 0, "closed": 0, "cut": 0}

    cases = []  # drawn up front, in a fixed order: the same frames on every run
    for i in range(PER_HANDLER):
        for handler in HANDLERS:
            session_id = f"fuzz-{handler}-{i}"
            cases.append((handler, session_id, *_mutate(_valid(handler, session_id), rng)))

    async def case(peer: Peer, server_id: str, handler: str, session_id: str, frame: bytes, complete: bool,
                   lock: asyncio.Semaphore) -> None:
        async with lock:
            stream = await Stream.open(peer.p2p, server_id, "inference" if handler in ("open", "step", "steps")
                                       else handler, 10)
            session = None
            try:
                if handler in ("step", "steps"):  # a malformed step (or frame of steps) for an open session
                    await stream.send(OpenSession(session_id=session_id, start=1, end=3, max_length=16))
                    expect(await stream.receive(10), SessionOpened)
                if handler == "steps":
                    session, stream = stream, await Stream.open(peer.p2p, server_id, "steps", 10)
                stream.writer.write(frame)
                await stream.writer.drain()
                if not complete:
                    counts["cut"] += 1
                    return
                if handler == "push":  # a push is never answered: a message of the wrong type shows it was read
                    stream.writer.write(b"".join(bytes(p) for p in encode(InfoRequest())))
                answer = await _answer(stream, f"{handler}: {frame[:300]!r}")
                _check(answer, f"{handler}: {frame[:200]!r}")
                counts["closed" if answer is None else "error" if isinstance(answer, ErrorReply) else "answered"] += 1
            finally:
                stream.close()
                if session is not None:
                    session.close()

    async def scenario():
        peer = await join(llama_swarm.initial_peers)
        try:
            server_id = await server_of(peer, "tiny-llama", 1, 3)
            lock = asyncio.Semaphore(16)
            await asyncio.gather(*(case(peer, server_id, *drawn, lock) for drawn in cases))
            await server_info(peer, server_id, 10)  # still serving
            opened = _valid("open", "")
            stream = await Stream.open(peer.p2p, server_id, "inference", 10)
            await stream.send(opened)
            expect(await stream.receive(10), SessionOpened)
            await stream.send(_valid("step", opened.session_id))
            assert expect(await stream.receive(10), StepOutput).position == 1
            stream.close()
        finally:
            await peer.shutdown()

    asyncio.run(asyncio.wait_for(scenario(), 600))
    assert sum(counts.values()) == PER_HANDLER * len(HANDLERS) and counts["error"] > PER_HANDLER, counts
    log = server_log.log()[log_start:]
    assert "[ERROR]" not in log and "Traceback" not in log, log[-5000:]
