"""An in-memory swarm for unit tests of the client's session logic: no p2pd, no model.

Each fake server holds blocks ``start:end`` of a toy model whose block ``h -> h + 0.1 * cumsum(h)``
(over the sequence) depends on everything the session cached, so a replacement server that was not
given the right history answers differently. Servers answer inference streams the way
``server/handler.py`` does: sessions, steps with ``start_position`` (rolling back), ``step_id``
dedup, push to ``next_servers`` (``pushed=True``; a push is taken only with the client's token for that
hop, :mod:`swarm.push_tokens`; with ``echo=False`` an answer without hidden states, and outputs kept for
``FetchOutputs``) and, when killed, closed streams.

    net = FakeNet({"a": record(0, 2), "b": record(2, 4)})
    sequence = net.sequence(num_blocks=4, pings={"a": 0.01, "b": 0.01})
    monkeypatch.setattr(client.inference_session, "Stream", net.Stream)
"""

from __future__ import annotations

import asyncio
import dataclasses
import types

import torch

from swarm.compression import roundtrip
from swarm.config import ClientConfig
from swarm.errors import ServerUnavailable
from swarm.push_tokens import check_push_token
from swarm.records import ServerRecord, ServerState
from swarm.wire import FetchOutputs, InferenceStep, OpenSession, SessionOpened, SessionOutputs, StepOutput

from client.remote_sequence import RemoteSequence

FAKE_PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWFakeSwarmPeerIdNeverDialed111111111111111111"  # never dialed


def record(start: int, end: int, next_pings: dict[str, float] | None = None, rps: float = 1000.0) -> ServerRecord:
    return ServerRecord(state=ServerState.ONLINE, start=start, end=end, inference_rps=rps, cache_tokens_left=10 ** 6,
                        throughput=1.0, next_pings=next_pings or {})


def toy_blocks(hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The toy model's blocks ``start:end`` over a whole sequence ``[batch, seq, hidden]``."""
    for _ in range(start, end):
        hidden = hidden + 0.1 * hidden.cumsum(dim=1)
    return hidden


@dataclasses.dataclass
class _Session:
    start: int
    end: int
    stream: "FakeStream"
    echo: bool = True
    push_key: bytes = b""
    inputs: torch.Tensor | None = None  # [batch, position, hidden]
    outputs: torch.Tensor | None = None  # [batch, position, hidden] as sent on (kept when echo is off)
    last_step_id: int = 0


class FakeServer:
    def __init__(self, net: "FakeNet", peer_id: str, record: ServerRecord):
        self.net, self.peer_id, self.record = net, peer_id, record
        self.alive = True
        self.sessions: dict[str, _Session] = {}
        self.steps: list[InferenceStep] = []  # every step it computed (pushed or sent by the client)
        self.answers: list[StepOutput] = []  # every answer it gave
        self.fetches = 0  # FetchOutputs it answered
        self.refused_pushes = 0  # pushes without a good token
        self.die_on_fetch = False  # dies when asked for its outputs (as if it failed with the next server)

    def step(self, session: _Session, msg: InferenceStep) -> None:
        if msg.step_id and msg.step_id <= session.last_step_id:
            return
        session.last_step_id = max(session.last_step_id, msg.step_id)
        self.steps.append(msg)
        if msg.hypo_ids is not None:  # beam search: reorder what the session holds first
            session.inputs = session.inputs[msg.hypo_ids]
            session.outputs = None if session.outputs is None else session.outputs[msg.hypo_ids]
        kept = session.inputs[:, :msg.start_position] if session.inputs is not None else msg.hidden[:, :0]
        session.inputs = torch.cat([kept, msg.hidden], dim=1)
        out = toy_blocks(session.inputs, session.start, session.end)[:, msg.start_position:]
        pushed = False
        out = roundtrip(out, msg.compression[0] if msg.compression else "none")  # what the next link carries
        if not session.echo:
            kept = session.outputs[:, :msg.start_position] if session.outputs is not None else out[:, :0]
            session.outputs = torch.cat([kept, out], dim=1)
        if msg.next_servers:
            (peer_id, session_id, token), rest = msg.next_servers[0], msg.next_servers[1:]
            pushed = self.net.push(self.peer_id, peer_id, InferenceStep(
                session_id=session_id, hidden=out, start_position=msg.start_position, step_id=msg.step_id,
                hypo_ids=msg.hypo_ids, next_servers=rest, push_token=token, compression=msg.compression[1:]))
        answer = StepOutput(hidden=None if pushed and not session.echo else out, position=session.inputs.shape[1],
                            step_id=msg.step_id, pushed=pushed)
        self.answers.append(answer)
        session.stream.answers.put_nowait(answer)


class FakeStream:
    """What :class:`swarm.transport.Stream` offers the session: send, receive, close."""

    def __init__(self, server: FakeServer):
        self.server, self.peer_id = server, server.peer_id
        self.answers: asyncio.Queue = asyncio.Queue()
        self.closed = False
        self.session_id = ""

    async def send(self, msg, compression: str = "none") -> None:
        if not self.server.alive or self.closed:
            raise ServerUnavailable(f"server {self.peer_id} closed the stream")
        if isinstance(msg, OpenSession):
            self.session_id = msg.session_id
            self.server.sessions[msg.session_id] = _Session(msg.start, msg.end, self, echo=msg.echo,
                                                                push_key=msg.push_key)
            self.server.net.opened.append((self.peer_id, msg.start, msg.end))
            self.answers.put_nowait(SessionOpened(msg.session_id, 0))
        elif isinstance(msg, FetchOutputs):
            if self.server.die_on_fetch:
                self.server.alive = False
                raise ServerUnavailable(f"server {self.peer_id} closed the stream")
            session = self.server.sessions[msg.session_id]
            self.server.fetches += 1
            self.answers.put_nowait(SessionOutputs(hidden=session.outputs[:, msg.start:msg.end], start=msg.start))
        else:
            msg = dataclasses.replace(msg, hidden=roundtrip(msg.hidden, compression))
            self.server.step(self.server.sessions[msg.session_id], msg)

    async def receive(self, timeout: float, expected: type | None = None):
        if not self.server.alive:
            raise ServerUnavailable(f"server {self.peer_id} closed the stream")
        try:
            return await asyncio.wait_for(self.answers.get(), min(timeout, 2.0))
        except asyncio.TimeoutError:
            raise ServerUnavailable(f"server {self.peer_id} did not answer") from None

    def close(self) -> None:
        self.closed = True
        self.server.sessions.pop(self.session_id, None)


class FakeNet:
    def __init__(self, records: dict[str, ServerRecord]):
        self.servers = {peer_id: FakeServer(self, peer_id, r) for peer_id, r in records.items()}
        self.opened: list[tuple[str, int, int]] = []  # (peer, start, end) of every session opened
        net = self

        class Stream:
            @classmethod
            async def open(cls, p2p, peer_id: str, handler: str, timeout: float) -> FakeStream:
                server = net.servers[peer_id]
                if not server.alive:
                    raise ServerUnavailable(f"cannot reach server {peer_id}")
                return FakeStream(server)

        self.Stream = Stream

    def push(self, pusher: str, peer_id: str, msg: InferenceStep) -> bool:
        """``pusher`` pushes ``msg`` to ``peer_id``; True if it was delivered (a refused push is delivered and
        dropped, as a real server does)."""
        server = self.servers.get(peer_id)
        if server is None or not server.alive or msg.session_id not in server.sessions:
            return False
        session = server.sessions[msg.session_id]
        if not check_push_token(session.push_key, msg.push_token, pusher, msg.step_id, msg.start_position,
                                msg.hidden.shape[1], msg.hypo_ids):
            server.refused_pushes += 1
            return True
        server.step(session, msg)
        return True

    def kill(self, peer_id: str) -> None:
        self.servers[peer_id].alive = False

    def by_block(self) -> dict[int, dict[str, ServerRecord]]:
        out: dict[int, dict[str, ServerRecord]] = {}
        for peer_id, server in self.servers.items():
            if server.alive:
                for b in range(server.record.start, server.record.end):
                    out.setdefault(b, {})[peer_id] = server.record
        return out

    def sequence(self, num_blocks: int, pings: dict[str, float], **config) -> "FakeSequence":
        # the fake servers answer on session streams only (no steps stream for frames of several sessions' steps)
        config = {"step_frames": False, **config}
        return FakeSequence(self, num_blocks, pings, ClientConfig(initial_peers=(FAKE_PEER,), **config))


class FakeSequence(RemoteSequence):
    """The real routing and retry policy over the fake network (its DHT view: the live servers)."""

    def __init__(self, net: FakeNet, num_blocks: int, pings: dict[str, float], config: ClientConfig):
        super().__init__(config, "fake", num_blocks, "fake-model")
        self.net, self.fixed_pings = net, pings

    async def servers(self, force: bool = False) -> dict[int, dict]:
        return self.net.by_block()

    async def ping(self, peer_id: str) -> float | None:
        rtt = self.fixed_pings.get(peer_id, 0.05)
        self.pings[peer_id] = (rtt, 1e18)  # never stale
        return rtt

    async def peer(self):
        return types.SimpleNamespace(p2p=None)
