"""``swarm verify``: a volunteer checker that re-runs every server's work on other servers.

Each round, for every online server of the model (in random order), the checker

1. opens an inference session on the server's span and runs ``prompt_tokens`` random hidden states,
   then ``steps`` one-token steps (the KV-cache path clients use);
2. sends the same inputs to the server as one forward pass (the path training uses);

and has both outputs judged by :class:`client.verifier.Verifier`: recomputed on other servers of
those blocks, compared with the tolerance of their dtypes, a third server deciding a disagreement
(non-finite outputs, or outputs of the wrong shape, disagree with any finite recomputation).
Servers found wrong are reported in the DHT under the checker's identity (the health page shows
them) and printed. Random inputs are enough to tell a server that computes its blocks from one
that does not, though a server that recognized a checker's inputs could answer them honestly:
clients check their own work too (``verify_rate``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
import uuid

import torch

from swarm import aio
from swarm.command_config import VerifyConfig
from swarm.config import ClientConfig, default_prefix
from swarm.errors import SwarmError
from swarm.models import load_config
from swarm.records import ServerRecord, ServerState
from swarm.routing import ChainLink
from swarm.swarm_state import merge_servers
from swarm.transport import Stream
from swarm.verification import Verdict
from swarm.wire import ForwardRequest, ForwardResponse, InferenceStep, OpenSession, SessionOpened, StepOutput

from client.remote_sequence import RemoteSequence
from client.tuning import Extras

logger = logging.getLogger(__name__)


class Checker:
    """Checks the servers of one model; ``await checker.round()`` checks each online one once."""

    def __init__(self, config: VerifyConfig, seed: int | None = None):
        self.config = config
        model_config = load_config(config.model)
        self.hidden_size = model_config.hidden_size
        prefix = config.dht_prefix or default_prefix(config.model)
        client = ClientConfig(initial_peers=config.initial_peers, dht_prefix=prefix, verify_rate=1.0,
                              request_timeout=config.request_timeout, host_maddrs=config.host_maddrs)
        self.sequence = RemoteSequence(client, prefix, model_config.num_hidden_layers, config.model)
        self.rng = random.Random(seed)
        self.wrong: dict[str, str] = {}  # peer id -> what it got wrong
        self.failed: set[str] = set()  # servers that failed to recompute others' work this round

    async def round(self) -> list[str]:
        """Checks every online server once; returns one line per server."""
        self.failed = set()
        servers = merge_servers(await self.sequence.servers(force=True))
        online = [(p, r) for p, r in servers.items() if r.state == ServerState.ONLINE]
        self.rng.shuffle(online)
        return [await self.check(peer_id, record) for peer_id, record in online]

    async def check(self, peer_id: str, record: ServerRecord) -> str:
        link = ChainLink(peer_id, record.start, record.end)
        generator = torch.Generator().manual_seed(self.rng.randrange(2**31))
        length = self.config.prompt_tokens + self.config.steps
        inputs = torch.randn(1, length, self.hidden_size, generator=generator)  # [1, tokens, hidden]
        parts = []
        for kind, run in (("session", self._session), ("forward", self._forward)):
            try:
                outputs = await run(link, inputs)
            except SwarmError as e:
                parts.append(f"{kind} failed ({e})")
                continue
            verdict = await self.sequence.verifier.check(link, inputs, outputs, Extras(), self.failed)
            parts.append(f"{kind} {_describe(verdict, peer_id)}")
            if verdict is not None and peer_id in verdict.wrong:
                self.wrong[peer_id] = f"{kind}: {verdict.error:.2e} > {verdict.tolerance:.0e}"
        return f"server {peer_id} blocks {record.start}:{record.end} ({record.dtype}): {'; '.join(parts)}"

    async def _session(self, link: ChainLink, inputs: torch.Tensor) -> torch.Tensor:
        """The server's outputs for ``inputs`` in an inference session: a prefill, then one-token steps."""
        timeout = self.config.request_timeout
        peer = await self.sequence.peer()
        stream = await Stream.open(peer.p2p, link.peer_id, "inference", timeout)
        try:
            session_id = uuid.uuid4().hex
            await stream.send(OpenSession(session_id=session_id, start=link.start, end=link.end,
                                          max_length=inputs.shape[1]))
            await stream.receive(timeout, SessionOpened)
            cuts = [0, self.config.prompt_tokens, *range(self.config.prompt_tokens + 1, inputs.shape[1] + 1)]
            outputs = []
            for step_id, (a, b) in enumerate(zip(cuts, cuts[1:]), start=1):
                await stream.send(InferenceStep(session_id=session_id, hidden=inputs[:, a:b], start_position=a,
                                                step_id=step_id))
                out = (await stream.receive(timeout, StepOutput)).hidden  # judged as it is, NaN or not
                # [1, b - a, hidden]; of another shape, it is wrong as a whole (NaN disagrees with anything)
                outputs.append(out if out.shape == inputs[:, a:b].shape else torch.full_like(inputs[:, a:b], torch.nan))
            return torch.cat(outputs, dim=1)
        finally:
            stream.close()

    async def _forward(self, link: ChainLink, inputs: torch.Tensor) -> torch.Tensor:
        peer = await self.sequence.peer()
        stream = await Stream.open(peer.p2p, link.peer_id, "forward", self.config.request_timeout)
        try:
            await stream.send(ForwardRequest(start=link.start, end=link.end, hidden=inputs))
            return (await stream.receive(self.config.request_timeout, ForwardResponse)).hidden
        finally:
            stream.close()


def _describe(verdict: Verdict | None, peer_id: str) -> str:
    if verdict is None:
        return "not checked (no other server of these blocks and this quantization answered)"
    if verdict.agrees:
        return f"ok ({verdict.error:.1e} <= {verdict.tolerance:.0e})"
    if verdict.inconclusive:
        return f"inconclusive (three servers, three results {verdict.error:.2e} apart)"
    if peer_id in verdict.wrong:
        return f"WRONG ({verdict.error:.2e} > {verdict.tolerance:.0e}); reported"
    return f"ok; its checker {', '.join(verdict.wrong)} was wrong and is reported"


def run_verify(config: VerifyConfig) -> int:
    """``swarm verify``: checks every online server ``config.rounds`` times (0: until SIGINT/SIGTERM); exits 1
    if some server was found computing wrong."""

    async def main() -> int:
        checker = Checker(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            done = 0
            while not stop.is_set() and (config.rounds == 0 or done < config.rounds):
                started = time.monotonic()
                for line in await checker.round():
                    print(line, flush=True)
                done += 1
                if config.rounds == 0 or done < config.rounds:
                    try:
                        await asyncio.wait_for(stop.wait(), max(0.0, config.period - (time.monotonic() - started)))
                    except asyncio.TimeoutError:
                        pass
        finally:
            await checker.sequence.shutdown()
        stats = checker.sequence.verifier.stats
        print(f"Checked {stats.checks} results in {done} round(s): {len(checker.wrong)} server(s) found wrong"
              + "".join(f"\n  {peer_id}: {why}" for peer_id, why in checker.wrong.items()), flush=True)
        return 1 if checker.wrong else 0

    return aio.run(main())
