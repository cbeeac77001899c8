"""An inference session: server-side KV caches kept across steps along one chain of servers.

The chain is chosen when the first step arrives (its batch size decides how much cache each server
must have free). Each step sends ``[batch, new_tokens, hidden]`` through every span's stream and
advances :attr:`InferenceSession.position`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid

import torch

from swarm.errors import BadRequest, RetryableError, SessionLengthExceeded
from swarm.routing import ChainLink
from swarm.wire import InferenceStep, OpenSession, SessionOpened, StepOutput, expect

from client.loop import run_sync
from client.remote_sequence import RemoteSequence, check_output
from swarm.transport import Stream


@dataclasses.dataclass
class _SpanSession:
    link: ChainLink
    stream: Stream
    session_id: str


class InferenceSession:
    """Use as ``with model.inference_session(max_length=N) as session:``; :meth:`step` is sync."""

    def __init__(self, sequence: RemoteSequence, max_length: int):
        if max_length <= 0:
            raise BadRequest(f"max_length must be positive, got {max_length}")
        self.sequence = sequence
        self.max_length = max_length
        self.position = 0  # tokens every server of the chain holds for this session
        self.token_ids: torch.Tensor | None = None  # [batch, tokens] generated so far, for generate(session=)
        self.pending_hypo_ids: torch.Tensor | None = None  # beam reorder to apply with the next step
        self.batch_size: int | None = None
        self._spans: list[_SpanSession] = []
        self._step_id = 0
        self.closed = False

    @property
    def chain(self) -> list[ChainLink]:
        return [s.link for s in self._spans]

    async def _open(self, batch_size: int) -> None:
        self.batch_size = batch_size
        position = 0
        n = self.sequence.num_blocks
        config = self.sequence.config
        while position < n:
            start = position

            async def attempt() -> _SpanSession:
                link = (await self.sequence.chain(start, n, min_cache_tokens=self.max_length * batch_size))[0]
                peer = await self.sequence.peer()
                try:
                    stream = await Stream.open(peer.p2p, link.peer_id, "inference", config.connect_timeout)
                    session_id = uuid.uuid4().hex
                    try:
                        await stream.send(OpenSession(session_id=session_id, start=link.start, end=link.end,
                                                      max_length=self.max_length, batch_size=batch_size))
                        expect(await stream.receive(config.request_timeout), SessionOpened)
                    except BaseException:
                        stream.close()
                        raise
                except RetryableError:
                    self.sequence.ban(link.peer_id)
                    raise
                return _SpanSession(link, stream, session_id)

            span = await self.sequence.retrying(f"opening a session on blocks {start}:{n}", attempt)
            self._spans.append(span)
            position = span.link.end

    async def astep(self, hidden: torch.Tensor, start_position: int | None = None) -> torch.Tensor:
        """``hidden``: [batch, new_tokens, hidden] -> [batch, new_tokens, hidden] after every block."""
        if self.closed:
            raise BadRequest("this inference session is closed; open a new one with model.inference_session()")
        if hidden.ndim != 3:
            raise BadRequest(f"hidden states must be [batch, new_tokens, hidden], got {list(hidden.shape)}")
        position = self.position if start_position is None else start_position
        if position + hidden.shape[1] > self.max_length:
            raise SessionLengthExceeded(f"this step would make the session hold {position + hidden.shape[1]} "
                                        f"tokens, more than its max_length {self.max_length}; open the session "
                                        "with a larger max_length")
        if not self._spans:
            await self._open(hidden.shape[0])
        hypo_ids, self.pending_hypo_ids = self.pending_hypo_ids, None
        dtype = hidden.dtype
        timeout = self.sequence.config.request_timeout
        push = self.sequence.config.use_push
        self._step_id += 1
        step_id = self._step_id
        i = 0
        while i < len(self._spans):
            # send to span i; with push, each server passes its output straight on to the next one
            rest = self._spans[i + 1:] if push else []
            await self._spans[i].stream.send(InferenceStep(
                session_id=self._spans[i].session_id, hidden=hidden, start_position=position, hypo_ids=hypo_ids,
                step_id=step_id, next_servers=tuple((s.link.peer_id, s.session_id) for s in rest)))
            while True:  # read span i's answer, then the next span's while outputs were pushed on
                out = await self._receive(self._spans[i], step_id, timeout)
                check_output(out.hidden, hidden, self._spans[i].link.peer_id)
                hidden = out.hidden
                i += 1
                if i == len(self._spans) or not out.pushed:
                    break
        self.position = position + hidden.shape[1]
        return hidden.to(dtype)

    @staticmethod
    async def _receive(span: _SpanSession, step_id: int, timeout: float) -> StepOutput:
        for _ in range(1000):  # bounded: a server answers each step once, stale answers are rare
            out = expect(await span.stream.receive(timeout), StepOutput)
            if out.step_id == step_id:
                return out
        raise BadRequest(f"server {span.link.peer_id} keeps sending answers to old steps")

    def step(self, hidden: torch.Tensor, start_position: int | None = None) -> torch.Tensor:
        return run_sync(self.astep(hidden, start_position))

    async def aclose(self) -> None:
        self.closed = True
        for span in self._spans:
            span.stream.close()
        self._spans.clear()

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                run_sync(self.aclose(), timeout=10)
            self.closed = True

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
