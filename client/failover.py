"""Failover of an inference session: routing around a failed or wrong server and rebuilding its caches.

A failed span's server is already banned; the session opens the same blocks on other servers (possibly
over several), replays the span's inputs (the client's history of them, or the outputs the server before it
kept when they were pushed without echo, fetched then) so the new servers hold what the failed one held, and
retries the step. A server a check found wrong (:mod:`client.verifier`) gets the same treatment, with every
cache after it recomputed from correct inputs.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from swarm.errors import ServerError, SwarmError
from swarm.retry import Attempts
from swarm.routing import ChainLink
from swarm.transport import Stream
from swarm.wire import ErrorReply, FetchOutputs, InferenceStep, SessionOutputs, StepOutput

from client.remote_sequence import RemoteSequence, check_output

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SpanSession:
    link: ChainLink
    stream: Stream
    session_id: str
    push_key: bytes = b""  # the server accepts a pushed step only with a token under this key
    history: torch.Tensor | None = None  # [batch, position, hidden]: every input this span has cached
    patience: float = 1.0  # times the hedging delay to wait for it: doubles each time it was slow but won
    # some inputs came pushed without an echo: the server before it holds them (FetchOutputs), not the client
    held_upstream: bool = False

    def remember(self, hidden: torch.Tensor, start_position: int) -> None:
        if self.held_upstream:  # the client lacks its earlier inputs: the server before it keeps them all
            return
        kept = self.history[:, :start_position] if self.history is not None else hidden[:, :0]
        self.history = torch.cat([kept, hidden], dim=1)


class SpanFailed(Exception):
    """Span ``index`` of the chain failed with ``cause`` (any :class:`SwarmError`; the retry policy judges it)."""

    def __init__(self, index: int, cause: SwarmError):
        super().__init__(str(cause))
        self.index, self.cause = index, cause


class Failover:
    """Routing around failed and wrong servers, a mixin of :class:`client.inference_session.InferenceSession`
    (which opens spans, keeps ``_spans`` and the padding of every token)."""

    sequence: RemoteSequence
    batch_size: int | None
    failovers: int
    fetches: int
    _spans: list[SpanSession]
    _outputs: torch.Tensor | None

    async def _drop_wrong(self, position: int, attempts: Attempts) -> None:
        """If a check found a server of the chain wrong, rebuilds the session from its span on: new sessions
        for those blocks and every block after them, replaying the history of the first (so every cache after
        it is recomputed from correct inputs)."""
        distrusted = self.sequence.bans.distrusted()
        wrong = next((j for j, span in enumerate(self._spans) if span.link.peer_id in distrusted), None)
        if wrong is None:
            return
        first = self._spans[wrong]
        if first.held_upstream:  # pushed without echo: the server before it kept its inputs
            try:
                history = (await self._fetch_inputs(wrong, position))[:, :position]
            except SpanFailed as failed:
                raise failed.cause from None
        else:
            history = first.history[:, :position] if first.history is not None else None
        logger.warning("Server %s was caught computing wrong: rebuilding the session from blocks %d:%d on",
                       first.link.peer_id, first.link.start, first.link.end)
        after = self._spans[wrong - 1].link.peer_id if wrong > 0 else None
        replacements, outputs = await self._open_and_replay(first.link.start, self.sequence.num_blocks, history,
                                                            attempts, after)
        if history is not None:
            self._outputs = outputs
        for span in self._spans[wrong:]:
            span.stream.close()
        self._spans[wrong:] = replacements
        self.failovers += 1

    async def _replace(self, index: int, position: int, end: int,
                       attempts: Attempts) -> tuple[int, torch.Tensor, list[SpanSession]]:
        """Routes around span ``index`` (its server is banned already) and rebuilds its caches on other
        servers; returns (the span to resume at, its input, the replacements). Its inputs come from the
        client's history, or from the server before it when they were pushed without an echo (if that
        server fails too, it raises SpanFailed for it: it is replaced first)."""
        broken = self._spans[index]
        logger.warning("Server %s failed on blocks %d:%d; routing around it", broken.link.peer_id,
                       broken.link.start, broken.link.end)
        broken.stream.close()
        # [batch, end, hidden]: inputs up to and including this step
        history = await self._fetch_inputs(index, end) if broken.held_upstream else broken.history
        prefix, current = history[:, :position], history[:, position:]
        after = self._spans[index - 1].link.peer_id if index > 0 else None
        then = self._spans[index + 1].link.peer_id if index + 1 < len(self._spans) else None
        replacements, _ = await self._open_and_replay(broken.link.start, broken.link.end, prefix, attempts, after, then)
        self._spans[index:index + 1] = replacements
        self.failovers += 1
        logger.info("Session now goes through %s", self._describe())
        return index, current, replacements

    async def _open_and_replay(self, start: int, end: int, history: torch.Tensor | None, attempts: Attempts,
                               after: str | None = None, then: str | None = None,
                               ) -> tuple[list[SpanSession], torch.Tensor | None]:
        """New sessions over blocks ``start:end`` holding ``history`` (their inputs so far), routing around
        servers that fail (priced between ``after`` and ``then``, see :meth:`_open_spans`); returns them and
        their output for ``history``."""
        while True:
            replacements = await self._open_spans(start, end, attempts, after, then)
            if history is None:
                return replacements, None
            try:
                return replacements, await self._replay(replacements, history)
            except SpanFailed as failed:  # a replacement failed too: route around it as well
                for span in replacements:
                    span.stream.close()
                link = replacements[failed.index].link
                await attempts.failed(failed.cause, where=f"replaying blocks {link.start}:{link.end} on server "
                                                          f"{link.peer_id}", peer_id=link.peer_id)

    async def _fetch_inputs(self, index: int, end: int) -> torch.Tensor:
        """Span ``index``'s inputs of tokens ``0:end``: the outputs the server before it kept."""
        source = self._spans[index - 1]
        self.fetches += 1
        try:
            await source.stream.send(FetchOutputs(session_id=source.session_id, start=0, end=end))
            for _ in range(1000):  # bounded: answers to steps may still be queued before it
                out = await source.stream.receive(self.sequence.config.request_timeout)
                if isinstance(out, SessionOutputs):
                    break
                if not isinstance(out, StepOutput):
                    raise (out.to_exception() if isinstance(out, ErrorReply) else ServerError(
                        f"server {source.link.peer_id} answered {type(out).__name__} where SessionOutputs was due"))
            else:
                raise ServerError(f"server {source.link.peer_id} never answered a request for its outputs")
            if out.start != 0 or out.hidden.ndim != 3 or out.hidden.shape[:2] != (self.batch_size, end) \
                    or not out.hidden.is_floating_point():
                raise ServerError(f"server {source.link.peer_id} sent outputs {list(out.hidden.shape)} from "
                                  f"{out.start} for tokens 0:{end} of batch {self.batch_size}")
        except SwarmError as e:
            raise SpanFailed(index - 1, e) from None
        return out.hidden

    async def _replay(self, spans: list[SpanSession], states: torch.Tensor) -> torch.Tensor:
        """Sends the cached prefix through new spans so they hold what the failed server held; returns their
        output."""
        if states.shape[1] == 0:
            return states
        for i, span in enumerate(spans):
            span.remember(states, 0)
            try:
                await span.stream.send(InferenceStep(session_id=span.session_id, hidden=states, start_position=0,
                                                     **self._padding_fields(0, states.shape[1])))
                out = await self._receive(span, 0, self.sequence.config.request_timeout)
                check_output(out.hidden, states, span.link.peer_id)
            except SwarmError as e:
                raise SpanFailed(i, e) from None
            self.sequence.bans.succeeded(span.link.peer_id)
            states = out.hidden
        return states

    @staticmethod
    async def _receive(span: SpanSession, step_id: int, timeout: float) -> StepOutput:
        for _ in range(1000):  # bounded: a server answers each step once, stale answers are rare
            out = await span.stream.receive(timeout, StepOutput)
            if out.step_id == step_id:
                return out
        raise ServerError(f"server {span.link.peer_id} keeps sending answers to old steps")
