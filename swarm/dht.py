"""DHT access shared by servers, clients and the health service.

A peer is one hivemind :class:`P2P` (one ``p2pd`` child) with a :class:`DHTNode` on top, both in the
caller's event loop. Server records are signed: the subkey carries the server's public key, so
hivemind's :class:`RSASignatureValidator` rejects anyone else's writes to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import os
import socket
import tempfile
import time
from collections.abc import Sequence

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from swarm.errors import BadRequest, ConfigError
from swarm.records import MODEL_INDEX_KEY, ModelRecord, ServerRecord, block_key, decode_record, encode_record

_OWNER_MARK = b"[owner:"


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """How a peer joins the swarm; every role (dht, serve, client, health) takes one."""

    initial_peers: tuple[str, ...] = ()
    host_maddrs: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    announce_maddrs: tuple[str, ...] = ()
    identity_path: str | None = None
    client_mode: bool = False  # a client or crawler: reaches others, stores nothing for them
    use_relay: bool = True
    use_auto_relay: bool = False
    startup_timeout: float = 30.0

    def __post_init__(self) -> None:
        for addr in self.initial_peers:
            if not addr.startswith("/") or "/p2p/" not in addr:
                raise ConfigError(
                    f"initial peer {addr!r} is not a full multiaddr; expected e.g. "
                    "/ip4/10.0.0.5/tcp/31337/p2p/12D3Koo... as printed by `swarm dht` or `swarm serve`"
                )


@dataclasses.dataclass
class Peer:
    """A running P2P daemon + DHT node. Use ``await Peer.start(config)`` and ``await peer.shutdown()``."""

    p2p: P2P
    node: DHTNode
    validator: RSASignatureValidator

    @classmethod
    async def start(cls, config: NetworkConfig) -> "Peer":
        validator = RSASignatureValidator(RSAPrivateKey())
        p2p = await P2P.create(
            initial_peers=list(config.initial_peers) or None,
            host_maddrs=list(config.host_maddrs),
            announce_maddrs=list(config.announce_maddrs) or None,
            identity_path=config.identity_path,
            dht_mode="client" if config.client_mode else "server",
            use_relay=config.use_relay,
            use_auto_relay=config.use_auto_relay,
            startup_timeout=config.startup_timeout,
        )
        try:
            node = await DHTNode.create(
                p2p=p2p,
                initial_peers=list(config.initial_peers) or None,
                client_mode=config.client_mode,
                record_validator=validator,
                num_workers=8,
                wait_timeout=3,
                cache_locally=False,
                reuse_get_requests=False,
            )
        except BaseException:
            await p2p.shutdown()
            raise
        return cls(p2p=p2p, node=node, validator=validator)

    @property
    def peer_id(self) -> PeerID:
        return self.p2p.peer_id

    async def visible_maddrs(self) -> list[str]:
        """Full multiaddrs another machine joins with: ``/ip4/.../tcp/.../p2p/<peer id>``."""
        maddrs = await self.p2p.get_visible_maddrs()
        return [str(m) for m in maddrs]

    def server_subkey(self) -> bytes:
        return self.peer_id.to_base58().encode() + self.validator.local_public_key

    def daemon_alive(self) -> bool:
        child = getattr(self.p2p, "_child", None)  # hivemind keeps the p2pd process here
        return child is not None and child.returncode is None

    async def shutdown(self) -> None:
        try:
            if self.daemon_alive():  # with p2pd gone (Ctrl+C reaches it too), node shutdown would hang
                await self.node.shutdown()
        finally:
            await self.p2p.shutdown()


async def declare_server(
    peer: Peer, prefix: str, record: ServerRecord, expiration: float, model: ModelRecord | None = None,
    blocks: Sequence[int] | None = None,
) -> bool:
    """Stores ``record`` under every block key of its span (or of ``blocks``, e.g. an OFFLINE record for the
    blocks a moving server leaves) and the model index entry; True if all stored.

    A later call supersedes an earlier one for the same (block, server): its expiration is later.
    """
    expiration_time = get_dht_time() + expiration
    value = encode_record(record)
    keys: list[str] = [block_key(prefix, b) for b in (range(record.start, record.end) if blocks is None else blocks)]
    values: list[bytes] = [value] * len(keys)
    subkeys: list[bytes | str] = [peer.server_subkey()] * len(keys)
    if model is not None:
        keys.append(MODEL_INDEX_KEY)
        values.append(encode_record(model))
        subkeys.append(prefix)
    stored = await peer.node.store_many(keys, values, expiration_time, subkeys=subkeys)
    return all(stored.values())


async def dial(p2p: P2P, maddr: str, timeout: float) -> float:
    """Connects to the peer at the full multiaddr ``maddr`` (``/ip4/.../tcp/.../p2p/<id>``); returns the
    seconds it took. Raises ConfigError for a malformed address, TimeoutError or the daemon's error else."""
    from hivemind.utils.multiaddr import Multiaddr

    try:
        address = Multiaddr(maddr)
        peer_id = PeerID.from_base58(address.value_for_protocol("p2p"))
        transport = address.decapsulate(Multiaddr(f"/p2p/{peer_id.to_base58()}"))
    except Exception as e:
        raise ConfigError(f"{maddr!r} is not a full multiaddr (/ip4/HOST/tcp/PORT/p2p/PEER_ID): {e}") from None
    started = time.monotonic()
    await asyncio.wait_for(p2p._client.connect(peer_id, [transport]), timeout)  # hivemind has no public dial
    return time.monotonic() - started


def all_relayed(maddrs: Sequence[str]) -> bool:
    """True if a peer has addresses and every one goes through a relay (``/p2p-circuit``): nobody can dial
    it directly, e.g. behind a NAT with ``--use-auto-relay``."""
    return bool(maddrs) and all("/p2p-circuit" in str(m) for m in maddrs)


def parse_server_subkey(subkey: bytes | str) -> str:
    """The peer id (base58) from a block key subkey; raises BadRequest if it is not a signed server subkey."""
    if isinstance(subkey, str):
        subkey = subkey.encode()
    end = subkey.find(_OWNER_MARK)
    if end <= 0:
        raise BadRequest(f"block record subkey {subkey[:60]!r} does not carry an owner key")
    return subkey[:end].decode()


async def fetch_servers(peer: Peer, prefix: str, blocks: Sequence[int]) -> dict[int, dict[str, ServerRecord]]:
    """For each block, the records of servers that announced it: ``{block: {peer_id: record}}``.

    Malformed records (from buggy or hostile peers) are skipped; they never stop a lookup.
    """
    keys = [block_key(prefix, b) for b in blocks]
    found = await peer.node.get_many(keys, sufficient_expiration_time=float("inf"))
    out: dict[int, dict[str, ServerRecord]] = {}
    for b, key in zip(blocks, keys):
        servers: dict[str, ServerRecord] = {}
        entry = found.get(key)
        if entry is not None and isinstance(entry.value, dict):
            for subkey, item in entry.value.items():
                try:
                    peer_id = parse_server_subkey(subkey)
                    record = decode_record(ServerRecord, item.value)
                except BadRequest:
                    continue
                if record.start <= b < record.end:
                    servers[peer_id] = record
        out[b] = servers
    return out


async def fetch_models(peer: Peer) -> dict[str, ModelRecord]:
    """The model index: ``{prefix: ModelRecord}`` (malformed entries skipped)."""
    entry = await peer.node.get(MODEL_INDEX_KEY, latest=True)
    models: dict[str, ModelRecord] = {}
    if entry is not None and isinstance(entry.value, dict):
        for prefix, item in entry.value.items():
            try:
                models[str(prefix)] = decode_record(ModelRecord, item.value)
            except BadRequest:
                continue
    return models


def peer_sockets() -> set[str]:
    """The ``hivemind-*.sock`` files now in the temp dir (hivemind hard-codes /tmp)."""
    return {p for d in {"/tmp", tempfile.gettempdir()} for p in glob.glob(os.path.join(d, "hivemind-*.sock"))}


def stale_peer_sockets() -> set[str]:
    """``hivemind-*.sock`` files that no live p2pd daemon or client listens on (left by dead peers)."""
    stale = set()
    for path in sorted(peer_sockets()):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(0.2)
            probe.connect(path)
        except OSError:
            stale.add(path)
        finally:
            probe.close()
    return stale


def clean_peer_sockets(keep: set[str] = frozenset()) -> int:
    """Removes stale ``hivemind-*.sock`` files, except ``keep`` (pass :func:`peer_sockets` taken before
    starting your peers, to touch only what they left). Returns how many files were removed.

    hivemind names its unix sockets by random id, not pid; a socket is stale when nobody listens on it.
    """
    removed = 0
    for path in sorted(stale_peer_sockets() - set(keep)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            removed += 1
    return removed
