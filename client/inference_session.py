"""An inference session: server-side KV caches kept across steps along one chain of servers.

The chain is chosen when the first step arrives (its batch size decides how much cache each server
must have free). Each step sends ``[batch, new_tokens, hidden]`` through every span and advances
:attr:`InferenceSession.position`; with push, servers pass the states on themselves.

Without echo (with push, when the client does not verify servers, or ``push_echo=False``) a pushed
step is only acknowledged: the client never sees a pushed span's inputs, the server before it keeps
them as its outputs. The last span always echoes: its outputs are the chain's, which the client gets anyway.

Failover (:mod:`client.failover`): the session keeps every span's inputs it saw (its *history*). When a server fails (its
stream closes, it stops answering, it lost the session, it raised an unexpected error), the session
bans it, routes around the hole (possibly over several servers), replays the history (or the outputs
the server before it kept, fetched then) to rebuild their caches, and retries the step. Opening
sessions, replaying and retrying all spend one budget per step of the client's :class:`~swarm.retry.RetryPolicy`. Outputs equal the fault-free run.

Hedging (:mod:`client.hedging`): a server that keeps a step longer than it advertised is not waited
for until ``request_timeout``: the session rebuilds that span on other servers (replaying its history,
this step included) while still waiting, and the first answer wins; a server that lost is avoided.
Spans whose inputs were pushed without echo are not hedged (the client lacks their history).

Verification (:mod:`client.verifier`): after a step, each span is checked with probability
``verify_rate``, in the background: its whole history goes to another server as a forward pass and
the outputs are compared with the ones the session got. If a server is found wrong, the next step
first rebuilds the session from that span on (new servers, every cache downstream recomputed from
correct inputs).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import torch

from swarm.compression import choose, roundtrip
from swarm.errors import BadRequest, SessionLengthExceeded, SwarmError
from swarm.push_tokens import new_push_key, push_token
from swarm.retry import Attempts
from swarm.routing import ChainLink
from swarm.transport import Stream
from swarm.wire import InferenceStep, OpenSession, SessionOpened, StepOutput

from client import hedging
from client.failover import Failover, SpanFailed, SpanSession
from client.loop import run_sync
from client.remote_sequence import RemoteSequence, check_output
from client.step_frames import plain
from client.speculative import SpeculationStats

logger = logging.getLogger(__name__)


class _Hedged(Exception):
    """The spans before ``index`` hold this step (a hedge rebuilt a slow span elsewhere: ``replacements``);
    ``hidden`` is the input of span ``index``."""

    def __init__(self, index: int, hidden: torch.Tensor, replacements: list[SpanSession]):
        super().__init__(f"hedged up to span {index}")
        self.index, self.hidden, self.replacements = index, hidden, replacements


class InferenceSession(Failover):
    """Use as ``with model.inference_session(max_length=N) as session:``; :meth:`step` is sync."""

    def __init__(self, sequence: RemoteSequence, max_length: int):
        if max_length <= 0:
            raise BadRequest(f"max_length must be positive, got {max_length}")
        self.sequence = sequence
        self.max_length = max_length
        self.position = 0  # tokens every server of the chain holds for this session
        self.prompt_tokens = 0  # of them, soft prompt tokens put before the first input (prompt tuning)
        self.token_ids: torch.Tensor | None = None  # [batch, tokens] generated so far, for generate(session=)
        self.pending_hypo_ids: torch.Tensor | None = None  # beam reorder to apply with the next step
        self.batch_size: int | None = None
        self.failovers = 0  # how many times a failed server was routed around
        self.hedges = 0  # how many times a slow server was replaced by others that answered first
        self.fetches = 0  # how many times a failed span's inputs came from the server before it (no echo)
        self.speculation = SpeculationStats()  # draft tokens proposed and accepted (client/speculative.py)
        self.compressed_links = 0  # links a step's states crossed compressed (slow links, swarm/compression.py)
        # a padded batch's mask and positions of every token the session holds ([batch, position] each),
        # None while they are the servers' defaults (no padding, positions 0..position-1); replayed on failover
        self._key_mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._spans: list[SpanSession] = []
        self._outputs: torch.Tensor | None = None  # [batch, position, hidden]: the last span's outputs, for checks
        self._checks: dict[tuple[str, int, int], asyncio.Task] = {}  # checks in flight, by the link checked
        self._step_id = 0
        self.closed = False

    @property
    def chain(self) -> list[ChainLink]:
        return [s.link for s in self._spans]

    @property
    def _echo(self) -> bool:
        """Whether servers send pushed outputs back to the client too (else they keep them). By default they do
        when the client verifies servers (``verify_rate`` > 0): a check needs a span's inputs and outputs as the
        client saw them (:mod:`client.verifier`)."""
        config = self.sequence.config
        echo = config.verify_rate > 0 if config.push_echo is None else config.push_echo
        return not config.use_push or echo

    async def _open_spans(self, start: int, end: int, attempts: Attempts, after: str | None = None,
                          then: str | None = None) -> list[SpanSession]:
        """Plans one chain over blocks ``start:end`` and opens a session on each of its links at once.

        The whole plan is used: the chain is priced as a whole (:func:`~swarm.routing.make_latency_chain`),
        so the hops it chose are the hops the session takes. A replacement chain is priced where it sits,
        from the server ``after`` it to the server it hands over to (``then``). If a link fails to open,
        its server is banned and the chain is planned again without it."""
        while True:
            try:
                plan = await self.sequence.chain(start, end, min_cache_tokens=self.max_length * self.batch_size,
                                                 attempts=attempts, after=after, then=then)
            except SwarmError as e:
                await attempts.failed(e, where=f"finding servers for blocks {start}:{end}")
                continue
            results = await asyncio.gather(*(self._open(link) for link in plan), return_exceptions=True)
            spans = [r for r in results if isinstance(r, SpanSession)]
            failed = [(link, r) for link, r in zip(plan, results) if not isinstance(r, SpanSession)]
            if not failed:
                return spans
            for span in spans:
                span.stream.close()
            for link, error in failed:
                if not isinstance(error, SwarmError):
                    raise error
            for link, error in failed:
                await attempts.failed(error, where=f"opening a session on blocks {link.start}:{link.end} on server "
                                                   f"{link.peer_id}", peer_id=link.peer_id)

    async def _open(self, link: ChainLink) -> SpanSession:
        config = self.sequence.config
        peer = await self.sequence.peer()
        stream = await Stream.open(peer.p2p, link.peer_id, "inference", config.connect_timeout)
        session_id, push_key = uuid.uuid4().hex, new_push_key()
        try:
            await stream.send(OpenSession(session_id=session_id, start=link.start, end=link.end,
                                          max_length=self.max_length, batch_size=self.batch_size, push_key=push_key,
                                          # the last span's outputs come back to the client anyway: kept, they
                                          # would only take the server's cache budget
                                          echo=self._echo or link.end == self.sequence.num_blocks,
                                          **self.sequence.session_fields(link.start, link.end)))
            await stream.receive(config.request_timeout, SessionOpened)
        except BaseException:
            stream.close()
            raise
        return SpanSession(link, stream, session_id, push_key)

    async def astep(self, hidden: torch.Tensor, start_position: int | None = None,
                    attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden``: [batch, new_tokens, hidden] -> [batch, new_tokens, hidden] after every block.

        A padded batch gives ``attention_mask`` (1 for a token, 0 for padding) and ``position_ids`` of the
        new tokens ([batch, new_tokens] each); by default none is padding and positions count on from
        ``start_position``."""
        if self.closed:
            raise BadRequest("this inference session is closed; open a new one with model.inference_session()")
        if hidden.ndim != 3:
            raise BadRequest(f"hidden states must be [batch, new_tokens, hidden], got {list(hidden.shape)}")
        position = self.position if start_position is None else start_position
        if not 0 <= position <= self.position:
            raise BadRequest(f"start_position {position} must be within 0..{self.position}")
        if position + hidden.shape[1] > self.max_length:
            raise SessionLengthExceeded(f"this step would make the session hold {position + hidden.shape[1]} "
                                        f"tokens, more than its max_length {self.max_length}; open the session "
                                        "with a larger max_length")
        for name, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if value is not None and tuple(value.shape) != tuple(hidden.shape[:2]):
                raise BadRequest(f"{name} must be [batch, new_tokens] = {list(hidden.shape[:2])}, "
                                 f"got {list(value.shape)}")
        num_blocks = self.sequence.num_blocks
        await self.sequence.peer()  # joining the swarm is not retried
        attempts = self.sequence.policy.begin(
            f"inference step at position {position} (blocks 0:{num_blocks})", self.sequence.ban)
        if not self._spans:
            self.batch_size = hidden.shape[0]
            self._spans = await self._open_spans(0, num_blocks, attempts)
        hypo_ids, self.pending_hypo_ids = self.pending_hypo_ids, None
        if hypo_ids is not None:
            for span in self._spans:  # the servers reorder their caches; the histories must follow
                if span.history is not None:
                    span.history = span.history[hypo_ids]
            self._key_mask = None if self._key_mask is None else self._key_mask[hypo_ids]
            self._positions = None if self._positions is None else self._positions[hypo_ids]
            self._outputs = None if self._outputs is None else self._outputs[hypo_ids]
        else:
            await self._drop_wrong(position, attempts)
        padding = self._remember_padding(position, hidden, attention_mask, position_ids)
        dtype, device = hidden.dtype, hidden.device  # the output returns to the client's device (CPU or GPU)
        end = position + hidden.shape[1]
        first, broken_index = 0, None
        fresh: list[SpanSession] = []  # replacements rebuilt from already reordered histories
        while True:
            try:
                if broken_index is not None:
                    first, hidden, replacements = await self._replace(broken_index, position, end, attempts)
                    fresh += replacements
                    broken_index = None
                hidden = await self._run_from(first, hidden, position, hypo_ids, padding, fresh)
                break
            except _Hedged as hedged:  # the spans after the hedged one still reorder their caches for this step
                first, hidden = hedged.index, hedged.hidden
                fresh += hedged.replacements
            except SpanFailed as failed:
                broken = self._spans[failed.index]
                attempts.progress(f"blocks 0:{broken.link.start} done for this step")
                await attempts.failed(failed.cause, where=f"blocks {broken.link.start}:{broken.link.end} on "
                                                          f"server {broken.link.peer_id}", peer_id=broken.link.peer_id)
                broken_index = failed.index
        self.position = end
        kept = self._outputs[:, :position] if self._outputs is not None else hidden[:, :0]
        self._outputs = torch.cat([kept, hidden], dim=1)  # [batch, position, hidden], on the CPU like the histories
        self._schedule_checks()
        return hidden.to(device, dtype)

    def _schedule_checks(self) -> None:
        """Draws which spans to check after this step and starts their checks (in the background)."""
        verifier, held = self.sequence.verifier, self.position
        for j, span in enumerate(self._spans):
            key = (span.link.peer_id, span.link.start, span.link.end)
            outputs = self._spans[j + 1].history if j + 1 < len(self._spans) else self._outputs
            if not verifier.draw() or key in self._checks or span.history is None or outputs is None:
                continue  # (without echo the client saw no inputs or outputs of a pushed span: nothing to check)
            extras = dataclasses.replace(self.sequence.extras(), **self._padding_fields(0, held))
            self._checks[key] = asyncio.ensure_future(
                self._check(key, span.link, span.history[:, :held], outputs[:, :held], extras))

    async def _check(self, key: tuple[str, int, int], link: ChainLink, inputs: torch.Tensor, outputs: torch.Tensor,
                     extras) -> None:
        try:
            await self.sequence.verifier.check(link, inputs, outputs, extras)
        except Exception:  # a check must never break the session; a bug in it must be seen
            logger.exception("Checking blocks %d:%d of server %s failed", link.start, link.end, link.peer_id)
        finally:
            self._checks.pop(key, None)

    async def afinish_checks(self) -> None:
        """Waits for the checks in flight (:mod:`client.verifier`), e.g. before closing a session whose work
        must be verified."""
        while self._checks:
            await asyncio.wait(list(self._checks.values()))

    def finish_checks(self) -> None:
        run_sync(self.afinish_checks())

    def _remember_padding(self, position: int, hidden: torch.Tensor, mask: torch.Tensor | None,
                          positions: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """Keeps the step's mask and positions (for replays); returns the step's InferenceStep fields."""
        batch, new = hidden.shape[:2]
        if mask is not None or self._key_mask is not None:
            kept = self._key_mask[:, :position] if self._key_mask is not None else torch.ones(
                batch, position, dtype=torch.int64)
            mask = torch.ones(batch, new, dtype=torch.int64) if mask is None else mask.to("cpu", torch.int64)
            self._key_mask = torch.cat([kept, mask], dim=1)
        if positions is not None or self._positions is not None:
            kept = self._positions[:, :position] if self._positions is not None else torch.arange(
                position).expand(batch, position)
            positions = torch.arange(position, position + new).expand(batch, new) if positions is None else positions
            self._positions = torch.cat([kept, positions.to("cpu", torch.int64)], dim=1)
        return self._padding_fields(position, position + new)

    def _padding_fields(self, start: int, end: int) -> dict[str, torch.Tensor | None]:
        """InferenceStep fields of tokens ``start:end``: their mask and positions where not the defaults."""
        return dict(attention_mask=None if self._key_mask is None else self._key_mask[:, start:end].contiguous(),
                    position_ids=None if self._positions is None else self._positions[:, start:end].contiguous())

    async def _run_from(self, first: int, hidden: torch.Tensor, position: int, hypo_ids: torch.Tensor | None,
                        padding: dict[str, torch.Tensor | None], fresh: list[SpanSession]) -> torch.Tensor:
        """Runs the step from span ``first`` on; a retryable failure of span i raises SpanFailed(i).

        ``fresh`` spans were rebuilt during this step (failover, hedge) from histories ``hypo_ids`` had reordered
        already: they get the step without it, so it is not pushed past them (each span gets its own
        ``hypo_ids``). Every other span still gets it: its server may have the step already (pushed on by a
        slow server that was hedged), and applies each reorder once (:class:`server.kv_cache.ReorderMark`)."""
        timeout = self.sequence.config.request_timeout
        push = self.sequence.config.use_push and not (hypo_ids is not None and fresh)
        self._step_id += 1  # a fresh id: after a failover, servers must not take the retry for a duplicate
        step_id = self._step_id
        i = first
        while i < len(self._spans):
            span = self._spans[i]
            # each later span may take this step only from the span before it (swarm.push_tokens)
            rest = [(s.link.peer_id, s.session_id, push_token(s.push_key, before.link.peer_id, step_id, position,
                                                              hidden.shape[1], hypo_ids))
                    for before, s in zip(self._spans[i:], self._spans[i + 1:])] if push else []
            into, onwards = self._schemes(i, len(rest), hidden)
            self.compressed_links += sum(scheme != "none" for scheme in (into, *onwards))
            span.remember(roundtrip(hidden, into), position)  # what the server gets
            step = InferenceStep(session_id=span.session_id, hidden=hidden, start_position=position,
                                 hypo_ids=None if span in fresh else hypo_ids, step_id=step_id,
                                 next_servers=tuple(rest), compression=onwards, **padding)
            framed = None  # with other sessions' concurrent steps to this server, in one frame (client.step_frames)
            try:
                frames = await self.sequence.step_frames(span.link.peer_id) if plain(step) and into == "none" else None
                if frames is not None:
                    framed = frames.answer(frames.submit(step), timeout)
                else:
                    await span.stream.send(step, into)
            except SwarmError as e:
                raise SpanFailed(i, e) from None
            while True:  # span i's answer, then the next span's while outputs were pushed on
                try:
                    out = await self._answer(i, step_id, hidden.shape[0] * hidden.shape[1], position, timeout, framed)
                    framed = None
                    if out.hidden is not None or not out.pushed or i + 1 == len(self._spans):
                        check_output(out.hidden, hidden, self._spans[i].link.peer_id)
                except SwarmError as e:
                    raise SpanFailed(i, e) from None
                self.sequence.bans.succeeded(self._spans[i].link.peer_id)  # its failures are forgotten
                i += 1
                if out.hidden is None:  # pushed on without an echo: the next server got it, the client did not
                    self._spans[i].held_upstream, self._spans[i].history = True, None
                    continue
                hidden = out.hidden
                if i == len(self._spans) or not out.pushed:
                    break
                self._spans[i].remember(hidden, position)
        return hidden

    async def _answer(self, i: int, step_id: int, tokens: int, position: int, timeout: float,
                      framed: Coroutine[Any, Any, StepOutput] | None = None) -> StepOutput:
        """Span ``i``'s answer to the step (``tokens``: rows x new tokens; ``framed``: the step went in a frame,
        this awaits its answer); if its server takes longer than it advertised, the span is rebuilt on other
        servers meanwhile, and if they answer first they replace it (raises :class:`_Hedged`). A span whose
        inputs were pushed without echo is waited for: the client does not hold what a rebuild would replay (a
        failure still routes around it, see :meth:`_replace`)."""
        span = self._spans[i]
        if span.held_upstream:
            return await (framed if framed is not None else self._receive(span, step_id, timeout))
        after = self.sequence.hedge_after(span.link, tokens) * span.patience
        t0 = time.monotonic()
        answer = framed if framed is not None else self._receive(span, step_id, timeout)
        raced = await hedging.race(answer, after, lambda: self._rebuild_elsewhere(span))
        elapsed = time.monotonic() - t0
        if not raced.backup_won:
            if elapsed > after:
                span.patience *= 2  # slow this once, yet first: give it more time before hedging it again
            return raced.value
        replacements, states = raced.value
        self.sequence.lost_race(span.link, elapsed, raced.primary_error)
        span.stream.close()
        self._spans[i:i + 1] = replacements
        self.hedges += 1
        logger.info("Server %s kept blocks %d:%d waiting %.1fs; session now goes through %s", span.link.peer_id,
                    span.link.start, span.link.end, elapsed, self._describe())
        raise _Hedged(i + len(replacements), states[:, position:], replacements)

    async def _rebuild_elsewhere(self, span: SpanSession) -> tuple[list[SpanSession], torch.Tensor]:
        """Opens sessions for ``span``'s blocks on other servers and replays its whole history (the current step
        included); returns them and their output for it ([batch, position + new_tokens, hidden]). Servers that
        fail are banned; there are no retries (the span's own server may still answer)."""
        link = span.link
        spans: list[SpanSession] = []
        try:
            for other in await self.sequence.chain(link.start, link.end, min_cache_tokens=self.max_length
                                                   * self.batch_size, exclude={link.peer_id}, wait=False):
                t0 = time.monotonic()
                try:
                    spans.append(await self._open(other))
                except SwarmError as e:
                    self.sequence.ban(other.peer_id, e, time.monotonic() - t0)
                    raise
            t0 = time.monotonic()
            try:
                states = await self._replay(spans, span.history)
            except SpanFailed as failed:
                self.sequence.ban(spans[failed.index].link.peer_id, failed.cause, time.monotonic() - t0)
                raise
        except BaseException:
            for opened in spans:
                opened.stream.close()
            raise
        return spans, states

    def _schemes(self, first: int, pushes: int, hidden: torch.Tensor) -> tuple[str, tuple[str, ...]]:
        """Compression (:mod:`swarm.compression`) of the client's link into span ``first``, and of the links out
        of it and the ``pushes`` spans its output is pushed through (the last one's goes back to the client)."""
        policy = self.sequence.config.compression
        nbytes = hidden.numel() * hidden.element_size()
        peers = [s.link.peer_id for s in self._spans[first:first + pushes + 1]]
        links = zip(peers, [*peers[1:], None])
        return (choose(policy, nbytes, self.sequence.link_bandwidth(None, peers[0])),
                tuple(choose(policy, nbytes, self.sequence.link_bandwidth(a, b)) for a, b in links))

    def _describe(self) -> str:
        return " -> ".join(f"{s.link.start}:{s.link.end}@{s.link.peer_id[-8:]}" for s in self._spans)

    def rollback(self, tokens: int) -> None:
        """Forgets the last ``tokens`` tokens: the next step starts where they began (the servers roll their
        caches back when it arrives). Soft prompt tokens cannot be dropped."""
        if not 0 <= tokens <= self.position - self.prompt_tokens:
            raise BadRequest(f"cannot drop {tokens} tokens of a session holding {self.position - self.prompt_tokens}")
        self.position -= tokens

    def step(self, hidden: torch.Tensor, start_position: int | None = None, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return run_sync(self.astep(hidden, start_position, attention_mask, position_ids))

    async def aclose(self) -> None:
        self.closed = True
        for task in list(self._checks.values()):
            task.cancel()
        if self._checks:
            await asyncio.wait(list(self._checks.values()), timeout=5)
        for span in self._spans:
            span.stream.close()
            frames = self.sequence.frames_to(span.link.peer_id)
            if frames is not None:
                frames.forget(span.session_id)
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
