"""client/step_frames.py against a fake server stream: which steps share a frame, and errors per step."""

from __future__ import annotations

import asyncio

import pytest
import torch

from client.step_frames import StepFrames, plain
from swarm.errors import ServerRefused, ServerUnavailable, ServerUnreachable
from swarm.wire import InferenceStep, InferenceSteps, StepOutputs

ROUND = 0.02  # the fake server's seconds per frame


class FakeServer:
    """A steps stream whose server answers each frame after ROUND seconds, one frame at a time; sessions named in
    ``refuse`` get bad_request; ``broken`` makes the next receive fail (the stream closed)."""

    def __init__(self):
        self.frames: list[tuple[str, ...]] = []
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.refuse: set[str] = set()
        self.opens = 0
        self.open_errors: list[Exception] = []  # raised by the next opens, in order
        self.send_errors: list[Exception] = []  # raised by the next sends (the stream was closed)
        self.unread = 0  # the next frames sent are never read (the server closed the stream meanwhile)
        self.task = asyncio.ensure_future(self._serve())

    async def open(self) -> "FakeServer":
        self.opens += 1
        if self.open_errors:
            raise self.open_errors.pop(0)
        return self

    async def send(self, msg: InferenceSteps) -> None:
        if self.send_errors:
            raise self.send_errors.pop(0)
        self.frames.append(msg.session_ids)
        if self.unread:
            self.unread -= 1
            return
        await self.inbox.put(msg)

    async def receive(self, timeout, expected):
        reply = await self.outbox.get()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        pass

    async def _serve(self) -> None:
        while True:
            msg = await self.inbox.get()
            await asyncio.sleep(ROUND)
            bad = [sid in self.refuse for sid in msg.session_ids]
            await self.outbox.put(StepOutputs(
                session_ids=msg.session_ids, step_ids=msg.step_ids,
                hidden=tuple(torch.zeros(0) if b else h + 1 for h, b in zip(msg.hidden, bad)),
                positions=tuple(p + 1 for p in msg.start_positions),
                error_codes=tuple("bad_request" if b else "" for b in bad),
                error_messages=tuple("refused" if b else "" for b in bad)))


def _step(session: str, position: int, step_id: int) -> InferenceStep:
    return InferenceStep(session_id=session, hidden=torch.full((1, 1, 4), float(position)), start_position=position,
                         step_id=step_id)


async def _session(frames: StepFrames, name: str, steps: int, delay: float) -> list[float]:
    await asyncio.sleep(delay)
    outs = []
    for t in range(steps):
        out = await frames.answer(frames.submit(_step(name, t, t + 1)), 5)
        assert out.position == t + 1 and out.step_id == t + 1
        outs.append(out.hidden.flatten()[0].item())
    frames.forget(name)
    return outs


def test_sessions_started_apart_come_to_share_frames():
    async def scenario():
        server = FakeServer()
        frames = StepFrames(server.open, "server")
        names = [f"s{i}" for i in range(4)]
        # each starts ~ a third of a round after the one before: at first every frame carries one step
        outs = await asyncio.gather(*(_session(frames, n, 12, i * ROUND / 3) for i, n in enumerate(names)))
        server.task.cancel()
        return server.frames, outs

    sent, outs = asyncio.run(scenario())
    assert all(o == [t + 1.0 for t in range(12)] for o in outs)  # each step got its own answer
    assert len(sent[0]) == 1  # the first frame went out alone
    # then all four together: a frame waits (at most a round) for the sessions still out (s0 and s1, one step
    # ahead, end one frame earlier)
    assert sum(sorted(f) == ["s0", "s1", "s2", "s3"] for f in sent) >= 8, str([len(f) for f in sent])
    assert sum(len(f) for f in sent) == 4 * 12


def test_a_lone_session_is_not_held_and_errors_stay_per_step():
    async def scenario():
        server = FakeServer()
        frames = StepFrames(server.open, "server")
        loop = asyncio.get_running_loop()
        began = loop.time()
        await _session(frames, "alone", 10, 0)
        alone = loop.time() - began
        server.refuse.add("bad")
        good, bad = frames.submit(_step("good", 0, 1)), frames.submit(_step("bad", 0, 1))
        assert (await frames.answer(good, 5)).position == 1
        with pytest.raises(ServerRefused, match="bad_request"):  # as on a session stream: the server's fault
            await frames.answer(bad, 5)
        # the stream breaks: every step waiting fails with the server's error, the next one opens a new stream
        # (a frame sent on the idle stream goes once more on a new stream: this server, gone, accepts none)
        server.task.cancel()
        server.open_errors.append(ServerUnavailable("server did not accept a steps stream"))
        waiting = frames.submit(_step("good", 1, 2))
        await asyncio.sleep(0.01)
        await server.outbox.put(ServerUnavailable("server closed the stream"))
        with pytest.raises(ServerUnavailable):
            await frames.answer(waiting, 5)
        await frames.close()
        return alone, server.frames

    alone, sent = asyncio.run(scenario())
    assert alone < 10 * ROUND * 1.8  # one round per step (held a round each time it would be ~2x)
    assert sent[:10] == [("alone",)] * 10 and sorted(sent[10]) == ["bad", "good"]


def test_only_plain_steps_go_in_frames():
    hidden = torch.zeros(2, 1, 4)
    assert plain(InferenceStep(session_id="s", hidden=hidden, start_position=3, step_id=1))
    assert not plain(InferenceStep(session_id="s", hidden=hidden, start_position=3, step_id=0))
    assert not plain(InferenceStep(session_id="s", hidden=hidden, start_position=3, step_id=1,
                                   hypo_ids=torch.tensor([1, 0])))
    assert not plain(InferenceStep(session_id="s", hidden=hidden, start_position=3, step_id=1,
                                   attention_mask=torch.ones(2, 1, dtype=torch.int64)))
    assert not plain(InferenceStep(session_id="s", hidden=hidden, start_position=3, step_id=1,
                                   next_servers=(("p", "s2", b"t"),)))
    # a prefill leaves the frames: a frame is answered whole, so it would hold the decode steps beside it
    assert not plain(InferenceStep(session_id="s", hidden=torch.zeros(2, 5, 4), start_position=3, step_id=1))


NOT_SERVED = ServerUnreachable("cannot reach server p: Connect failed. msg=failed to negotiate protocol: protocols not "
                               "supported: [/swarm/steps/1.0.0]")  # what p2pd answers (an older server)


def test_a_server_without_the_steps_protocol_or_unreachable_now_leaves_steps_on_session_streams():
    async def scenario():
        server = FakeServer()
        frames = StepFrames(server.open, "server")
        server.open_errors.append(ServerUnavailable("server did not accept a steps stream in 5s"))
        # sessions asking at once share one try to open; it fails: their steps go on their own streams
        assert await asyncio.gather(*(frames.usable() for _ in range(5))) == [False] * 5
        assert server.opens == 1 and frames.served
        assert await frames.usable() and server.opens == 2  # opens now: frames again
        assert (await frames.answer(frames.submit(_step("s", 0, 1)), 5)).position == 1

        older = FakeServer()
        frames = StepFrames(older.open, "older")
        older.open_errors.append(NOT_SERVED)
        assert not await frames.usable() and not frames.served
        assert not await frames.usable() and older.opens == 1  # not asked again
        for fake in (server, older):
            fake.task.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_frame_on_a_stream_the_server_closed_while_idle_goes_again_once():
    async def scenario():
        server = FakeServer()
        frames = StepFrames(server.open, "server")
        assert (await frames.answer(frames.submit(_step("s", 0, 1)), 5)).position == 1
        # the server closed the idle stream: the send fails, the frame goes on a new stream
        server.send_errors.append(ServerUnavailable("server closed the stream"))
        assert (await frames.answer(frames.submit(_step("s", 1, 2)), 5)).position == 2
        assert server.opens == 2
        # it closed it as the frame went out: nothing answered, the stream breaks, the frame goes again
        server.unread = 1
        waiting = frames.submit(_step("s", 2, 3))
        await asyncio.sleep(0.01)
        await server.outbox.put(ServerUnavailable("server closed the stream"))
        assert (await frames.answer(waiting, 5)).position == 3
        assert server.opens == 3 and server.frames[-2:] == [("s",), ("s",)]
        # only once: the new stream breaks too before answering, and the step fails (a new stream's break is no
        # idle close)
        server.unread = 2
        waiting = frames.submit(_step("s", 3, 4))
        for _ in range(2):
            await asyncio.sleep(0.01)
            await server.outbox.put(ServerUnavailable("server closed the stream"))
        with pytest.raises(ServerUnavailable):
            await frames.answer(waiting, 5)
        assert server.opens == 4
        server.task.cancel()
        await frames.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))
