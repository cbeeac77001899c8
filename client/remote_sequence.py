"""The remote part of a model: all its blocks, served by whoever holds them in the swarm.

:class:`RemoteSequence` runs forward and backward passes through chains of servers; which servers, and
whom it avoids, is its base :class:`~client.routing.Routing` (the DHT peer, lookups, chains, pings, bans).
Every pass retries under one budget of the client's :class:`~swarm.retry.RetryPolicy`
(``config.retry_policy``): on retryable errors only, banning the server each failure is blamed on
(:meth:`~client.routing.Routing.ban`); a server slower than it advertised is hedged (:mod:`client.hedging`).

Whatever a server answers is checked before it is used (:func:`check_output`): hidden states of the
wrong shape or dtype, non-finite or implausibly large ones are that server's fault. A sample of the
work is also re-run on other servers (:mod:`client.verifier`); servers found computing wrong are
reported (:meth:`~client.routing.Routing.report`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from swarm.config import ClientConfig
from swarm.errors import ServerError, SwarmError, WrongResult
from swarm.routing import ChainLink
from swarm.wire import BackwardRequest, BackwardResponse, ForwardRequest, ForwardResponse

from swarm import transport

from client import hedging
from client.routing import Routing
from client.step_frames import StepFrames
from client.tuning import Extras
from client.verifier import Verifier

Records = list[tuple[ChainLink, torch.Tensor]]  # (link, the hidden states it was sent) of a forward pass

# the largest |hidden state| believed without question: real models stay far below (the largest activations
# measured, e.g. SmolLM2's, are ~2e4); above this, an output must be within 1000x of its input's largest entry
PLAUSIBLE_ABS = 1e6


class RemoteSequence(Routing):
    """Every block of the model in the swarm, as a client sees them (``prefix``: see :class:`Routing`)."""

    def __init__(self, config: ClientConfig, prefix: str, num_blocks: int, model_name: str, config_digest: str = ""):
        super().__init__(config, prefix, num_blocks, model_name, config_digest)
        self.verifier = Verifier(self, config.verify_rate)
        self._frames: dict[str, StepFrames] = {}  # peer id -> steps of concurrent sessions sent together

    def extras(self, training: bool = False) -> Extras:
        """What every request of a pass carries now: the current prompts and adapter, if any."""
        return self.tuning.extras(training) if self.tuning is not None else Extras()

    def session_fields(self, start: int, end: int) -> dict[str, Any]:
        """OpenSession keywords for blocks ``start:end`` (the adapter a session's steps run with)."""
        return self.extras().session_fields(start, end) if self.tuning is not None else {}

    async def step_frames(self, peer_id: str) -> StepFrames | None:
        """Where steps of this client's sessions to ``peer_id`` go together (None: ``config.step_frames`` off, or the
        server takes no frames now: ``StepFrames.usable``)."""
        if not self.config.step_frames:
            return None
        frames = self._frames.get(peer_id)
        if frames is None:
            p2p = (await self.peer()).p2p
            frames = self._frames[peer_id] = StepFrames(
                lambda: transport.Stream.open(p2p, peer_id, "steps", self.config.connect_timeout), peer_id)
        return frames if await frames.usable() else None

    def frames_to(self, peer_id: str) -> StepFrames | None:
        """The frames to ``peer_id`` if steps went there in frames."""
        return self._frames.get(peer_id)

    async def shutdown(self) -> None:
        for frames in list(self._frames.values()):
            await frames.close()
        self._frames.clear()
        await super().shutdown()

    async def forward(self, hidden: torch.Tensor, extras: Extras | None = None,
                      records: Records | None = None) -> torch.Tensor:
        """``hidden``: [batch, seq, hidden] -> the same after every block (no grad).

        ``extras``: the prompts/adapter every request carries. ``records`` (if given) receives each
        link and its input, which :meth:`backward` needs.
        """
        extras = extras or self.extras()
        await self.peer()  # joining the swarm is not retried: a wrong address gets its one answer at once
        attempts = self.policy.begin(f"forward through blocks 0:{self.num_blocks}", self.ban)
        device = hidden.device  # the reply comes back to where the client's own layers are (CPU or GPU)
        position = 0
        while position < self.num_blocks:
            link: ChainLink | None = None
            try:
                link = (await self.chain(position, self.num_blocks, purpose="forward", attempts=attempts))[0]
                out, hedged = await self._forward_hedged(link, hidden, extras)
            except SwarmError as e:
                await attempts.failed(e, where=_where(link, position, self.num_blocks),
                                      peer_id=link.peer_id if link else None)
                continue
            if not hedged and self.verifier.draw():  # (what another server answered is not link's claim)
                verdict = await self.verifier.check(link, hidden, out, extras)
                if verdict is not None and link.peer_id in verdict.wrong:
                    await attempts.failed(WrongResult(f"server {link.peer_id} computed blocks {link.start}:{link.end} "
                                                      "wrong"), where=_where(link, position, self.num_blocks),
                                          peer_id=link.peer_id)
                    continue
            if records is not None:
                records.append((link, hidden))
            position = link.end
            hidden = out.to(hidden.dtype)
            attempts.progress(f"blocks 0:{position} done")
        return hidden.to(device)

    async def _forward_hedged(self, link: ChainLink, hidden: torch.Tensor,
                              extras: Extras) -> tuple[torch.Tensor, bool]:
        """Blocks ``link`` on ``hidden``; if its server is slower than it advertised, on others too (first wins).
        Returns the output and whether other servers gave it."""

        async def elsewhere() -> torch.Tensor:
            out = hidden
            for other in await self.chain(link.start, link.end, purpose="forward", exclude={link.peer_id}, wait=False):
                t0 = time.monotonic()
                try:
                    out = (await self.forward_link(other, out, extras)).to(hidden.dtype)
                except SwarmError as e:
                    self.ban(other.peer_id, e, time.monotonic() - t0)
                    raise
            return out

        t0 = time.monotonic()
        raced = await hedging.race(self.forward_link(link, hidden, extras), self.hedge_after(link, hidden.shape[0] *
                                                                                      hidden.shape[1]), elsewhere)
        if raced.backup_won:
            self.lost_race(link, time.monotonic() - t0, raced.primary_error)
        return raced.value, raced.backup_won

    async def forward_link(self, link: ChainLink, hidden: torch.Tensor, extras: Extras) -> torch.Tensor:
        request = ForwardRequest(start=link.start, end=link.end, hidden=hidden, **extras.fields(link.start, link.end))
        out = (await self._call(link.peer_id, "forward", request, ForwardResponse)).hidden
        check_output(out, hidden, link.peer_id)
        return out

    async def _call(self, peer_id: str, handler: str, request: Any, expected: type) -> Any:
        """One request to ``peer_id`` and its reply of type ``expected`` (errors: :mod:`swarm.transport`)."""
        peer = await self.peer()
        reply = await transport.call(peer.p2p, peer_id, handler, request, expected, self.config.connect_timeout,
                                     self.config.request_timeout)
        self.bans.succeeded(peer_id)
        return reply

    async def backward(self, records: Records, grad: torch.Tensor, extras: Extras) -> tuple[
            torch.Tensor, torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        """Gradients of a forward pass (its ``records``) given ``grad`` of its output.

        Returns the gradient of its input, of ``extras.prompts`` (or None) and of each LoRA A and B.
        Each span goes to the server that ran its forward, unless that server failed since (every
        failure bans its server); then the span is recomputed on others: a new chain over its blocks,
        with a forward through all but the last link to get their inputs.
        """
        grad_prompts = None if extras.prompts is None else torch.zeros_like(extras.prompts)
        grads_a = [torch.zeros_like(a) for a in extras.lora_a]
        grads_b = [torch.zeros_like(b) for b in extras.lora_b]
        await self.peer()
        attempts = self.policy.begin(f"backward through blocks 0:{self.num_blocks}", self.ban)
        for link, hidden in reversed(records):
            while True:
                current: ChainLink | None = None
                try:
                    usable = link.peer_id not in self.bans.banned(time.monotonic()) | set(attempts.refused)
                    chain = [link] if usable else await self.chain(link.start, link.end, purpose="forward",
                                                                   attempts=attempts)
                    inputs = [hidden]
                    for current in chain[:-1]:
                        inputs.append((await self.forward_link(current, inputs[-1], extras)).to(hidden.dtype))
                    span_grads = []  # applied only if the whole chain succeeds
                    out_grad = grad
                    for current, sub_input in zip(reversed(chain), reversed(inputs)):
                        reply = await self._backward_link(current, sub_input, out_grad, extras)
                        span_grads.append((current, reply))
                        out_grad = reply.grad_input.to(grad.dtype)
                except SwarmError as e:
                    await attempts.failed(e, where=_where(current, link.start, link.end),
                                          peer_id=current.peer_id if current else None)
                    continue
                break
            for sub, reply in span_grads:
                if grad_prompts is not None:
                    grad_prompts[sub.start:sub.end] += reply.grad_prompts.to(grad_prompts.dtype)
                for i, ga, gb in zip(extras.indices(sub.start, sub.end), reply.grad_lora_a, reply.grad_lora_b):
                    grads_a[i] += ga.to(grads_a[i].dtype)
                    grads_b[i] += gb.to(grads_b[i].dtype)
            grad = out_grad
            attempts.progress(f"gradients of blocks {link.start}:{self.num_blocks} done")
        return grad, grad_prompts, grads_a, grads_b

    async def _backward_link(self, link: ChainLink, hidden: torch.Tensor, grad: torch.Tensor,
                             extras: Extras) -> BackwardResponse:
        fields = extras.fields(link.start, link.end)
        request = BackwardRequest(start=link.start, end=link.end, hidden=hidden, grad_output=grad, **fields)
        reply = await self._call(link.peer_id, "backward", request, BackwardResponse)
        check_output(reply.grad_input, hidden, link.peer_id)
        if len(reply.grad_lora_a) != len(fields["lora_a"]) or len(reply.grad_lora_b) != len(
                fields["lora_b"]) or (fields["prompts"] is None) != (reply.grad_prompts is None):
            raise ServerError(f"server {link.peer_id} answered a backward request with gradients that do not "
                              "match it; not using it")
        return reply


def _where(link: ChainLink | None, start: int, end: int) -> str:
    """Where an attempt failed, for logs and the final error."""
    if link is None:
        return f"blocks {start}:{end} (finding servers)"
    return f"blocks {link.start}:{link.end} on server {link.peer_id}"


def check_output(out: torch.Tensor | None, sent: torch.Tensor, peer_id: str) -> None:
    """A server must answer with finite, plausible hidden states of the shape it was sent; anything else is
    its fault. Plausible: every entry within :data:`PLAUSIBLE_ABS`, or within 1000x of the input's largest
    (a server never gets the blame for what the client sent: a non-finite input gets no check)."""
    if out is None:
        raise ServerError(f"server {peer_id} answered a step without its hidden states; not using it")
    if out.shape != sent.shape or not out.is_floating_point():
        raise ServerError(f"server {peer_id} returned {out.dtype} {list(out.shape)} for hidden states "
                          f"{list(sent.shape)}; not using it")
    if out.numel() == 0:
        return
    limit = max(PLAUSIBLE_ABS, 1e3 * float(sent.abs().amax()))
    peak = float(out.abs().amax())
    if limit == limit and limit < float("inf") and not peak <= limit:  # NaN compares false
        what = "non-finite" if not peak < float("inf") else f"implausibly large (up to {peak:.3g})"
        raise ServerError(f"server {peer_id} returned {what} hidden states; not using it")
