"""DHT access shared by servers, clients and the health service.

A peer is one hivemind :class:`P2P` (one ``p2pd`` child) with a :class:`DHTNode` on top, both in the
caller's event loop. Swarm holds the peer's libp2p key (:mod:`swarm.identity`) and signs every entry
it stores with it; every entry's subkey is its signer's peer id, and :mod:`swarm.signed_records`
refuses anything else, so no peer can write (or erase) another peer's records. With a swarm key
(:mod:`swarm.swarm_key`) every DHT request is authenticated too, and peers without it get no answer.

Joining is where first mistakes show, so :meth:`Peer.start` answers each in one line, the same for
every role (serve, finetune, health, the Python client): unreachable initial peers
(:func:`join_failure`), a busy port, an identity file another peer uses. ``p2pd`` runs in its own
session (and, on Linux, dies with its parent): a signal to the whole process group (Ctrl-C in a
terminal, systemd, ``timeout``, ``kill -- -PGID``) reaches the Python process alone, which can then
still announce OFFLINE through its daemon before stopping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import glob
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from swarm.config import INITIAL_PEERS_ENV
from swarm.errors import BadRequest, ConfigError, ServerUnavailable
from swarm.first_contact import check_maddrs
from swarm.identity import Identity, identity_file, load_identity, new_identity
from swarm.records import (
    MODEL_INDEX_KEY,
    ModelRecord,
    R,
    ReportRecord,
    ServerRecord,
    block_key,
    decode_record,
    encode_record,
    reports_key,
)
from swarm.signed_records import MAX_RECORD_TTL, SignedRecordValidator
from swarm.swarm_key import SwarmKey, SwarmKeyAuthorizer, use_swarm_key

logger = logging.getLogger(__name__)


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
    swarm_key: str | None = None  # key file of a private swarm (swarm.swarm_key)

    def __post_init__(self) -> None:
        check_maddrs("initial peer", self.initial_peers)


def join_failure(initial_peers: Sequence[str], reason: str) -> str:
    """The one message every role gives when it cannot join the swarm through ``initial_peers``."""
    shown = ", ".join(initial_peers[:3]) + (f" (and {len(initial_peers) - 3} more)" if len(initial_peers) > 3 else "")
    return (f"could not join the swarm via {shown}: {reason}. Check that a peer runs there (`swarm dht` or "
            "`swarm serve` prints the address to join) and that this machine can reach it; give that address "
            f"with --initial-peers (initial_peers=[...] in Python, or ${INITIAL_PEERS_ENV})")


@dataclasses.dataclass
class Peer:
    """A running P2P daemon + DHT node. Use ``await Peer.start(config)`` and ``await peer.shutdown()``."""

    p2p: P2P
    node: DHTNode
    identity: Identity
    swarm_key: SwarmKey | None = None
    identity_lock: IO[bytes] | None = None  # held while this peer runs: no second peer here with its identity

    @classmethod
    async def start(cls, config: NetworkConfig) -> "Peer":
        """Starts ``p2pd`` and the DHT node; a mistake in ``config`` or an unreachable swarm raises a
        :class:`ConfigError` or :class:`ServerUnavailable` whose one-line message names the fix."""
        swarm_key = SwarmKey.from_file(config.swarm_key) if config.swarm_key else None
        if swarm_key is not None:
            logger.info("Private swarm: swarm key %s (fingerprint %s)", config.swarm_key, swarm_key.fingerprint)
        _spawn_p2pd_in_own_session()
        _ignore_dropped_daemon_streams(asyncio.get_running_loop())
        for maddr in config.host_maddrs:
            _check_port_free(maddr)
        lock = _lock_identity(config.identity_path)
        try:
            identity, check_if_free = _identity(config.identity_path)
            lock = lock or _lock_identity(config.identity_path)  # a new identity file exists only now
            try:
                with contextlib.ExitStack() as files:
                    path = config.identity_path or files.enter_context(identity_file(identity))
                    p2p = await P2P.create(
                        initial_peers=list(config.initial_peers) or None,
                        host_maddrs=list(config.host_maddrs),
                        announce_maddrs=list(config.announce_maddrs) or None,
                        identity_path=path,
                        check_if_identity_free=check_if_free,
                        dht_mode="client" if config.client_mode else "server",
                        use_relay=config.use_relay,
                        use_auto_relay=config.use_auto_relay,
                        startup_timeout=config.startup_timeout,
                    )
            except P2PDaemonError as e:
                raise _daemon_failure(config, e) from None
            try:
                if p2p.peer_id.to_base58() != identity.peer_id:
                    raise ConfigError(f"p2pd runs as {p2p.peer_id}, not as the identity Swarm signs for "
                                      f"({identity.peer_id}); is --identity-path a libp2p key file?")
                use_swarm_key(p2p, swarm_key)
                node = await DHTNode.create(
                    p2p=p2p,
                    initial_peers=list(config.initial_peers) or None,
                    client_mode=config.client_mode,
                    record_validator=SignedRecordValidator(identity),
                    authorizer=SwarmKeyAuthorizer(swarm_key) if swarm_key is not None else None,
                    num_workers=8,
                    wait_timeout=3,
                    cache_locally=False,
                    reuse_get_requests=False,
                )
            except BaseException as e:
                await p2p.shutdown()
                if isinstance(e, RuntimeError) and "bootstrap failed" in str(e) and config.initial_peers:
                    hint = (f"check that swarm key {swarm_key.fingerprint} (--swarm-key) is the swarm's" if swarm_key
                            else "a private swarm answers only peers with its key: --swarm-key FILE (swarm_key=FILE "
                                 "in Python)")
                    raise ServerUnavailable(join_failure(config.initial_peers,
                                                         f"no peer answered a DHT ping; {hint}")) from None
                if isinstance(e, (P2PDaemonError, OSError, asyncio.TimeoutError)) and config.initial_peers:
                    raise ServerUnavailable(join_failure(config.initial_peers, _reason(e))) from None
                raise
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        return cls(p2p=p2p, node=node, identity=identity, swarm_key=swarm_key, identity_lock=lock)

    @property
    def peer_id(self) -> PeerID:
        return self.p2p.peer_id

    async def visible_maddrs(self) -> list[str]:
        """Full multiaddrs another machine joins with: ``/ip4/.../tcp/.../p2p/<peer id>``."""
        maddrs = await self.p2p.get_visible_maddrs()
        return [str(m) for m in maddrs]

    def daemon_alive(self) -> bool:
        child = getattr(self.p2p, "_child", None)  # hivemind keeps the p2pd process here
        return child is not None and child.returncode is None

    async def shutdown(self) -> None:
        try:
            if self.daemon_alive():  # with p2pd gone (e.g. SIGKILLed), node shutdown would hang
                await self.node.shutdown()
        finally:
            try:
                await self.p2p.shutdown()
            finally:
                if self.identity_lock is not None:
                    self.identity_lock.close()


# ---------------------------------------------------------------- starting a peer: first mistakes, p2pd

_GO_TIMESTAMP = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ")


def _reason(error: BaseException) -> str:
    """The daemon's own words, without hivemind's prefix and Go's timestamp."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.removeprefix("Daemon failed to start: ")
    return _GO_TIMESTAMP.sub("", text)


def _daemon_failure(config: NetworkConfig, error: P2PDaemonError) -> Exception:
    reason = _reason(error)
    if "already taken" in reason and config.identity_path:
        return ConfigError(f"--identity-path {config.identity_path} is the identity of a peer already in the swarm; "
                           "give each peer its own identity file (a missing one is created)")
    if "address already in use" in reason:
        return ConfigError(f"a port of {', '.join(config.host_maddrs)} is already in use on this machine: {reason}; "
                           "pass another --port, or leave it out for a free one")
    if "failed to parse multiaddr" in reason:
        return ConfigError(f"{reason}; expected e.g. /ip4/10.0.0.5/tcp/31337/p2p/12D3Koo... as printed by "
                           "`swarm dht` or `swarm serve`")
    if config.initial_peers:
        return ServerUnavailable(join_failure(config.initial_peers, reason))
    return ServerUnavailable(f"could not start this peer's p2p daemon (p2pd): {reason}")


def _check_port_free(maddr: str) -> None:
    """Refuses a TCP port another program (or another swarm peer) listens on. libp2p binds with
    SO_REUSEPORT, so without this check two servers on one port would silently share it."""
    match = re.fullmatch(r"/(ip4|ip6)/([^/]+)/tcp/(\d+)", maddr)
    if match is None or int(match[3]) == 0:
        return
    family = socket.AF_INET6 if match[1] == "ip6" else socket.AF_INET
    port = int(match[3])
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            probe.bind((match[2], port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} is already in use on this machine (by another swarm peer or "
                                  "program); pass another --port, or leave it out for a free one") from None
            raise ConfigError(f"cannot listen on {maddr}: {e.strerror or e}; pass another --port or "
                              "--host-maddrs") from None


def _lock_identity(identity_path: str | None) -> IO[bytes] | None:
    """Locks an existing identity file for this process: a second peer on this machine with the same
    identity is refused at once (hivemind finds one elsewhere in the swarm only after joining)."""
    if identity_path is None or not os.path.isfile(identity_path):
        return None
    try:
        import fcntl
    except ImportError:  # no flock (Windows): hivemind's own check in the swarm remains
        return None
    handle = open(identity_path, "rb")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(f"--identity-path {identity_path} is in use by another peer on this machine; give each "
                          "peer its own identity file (a missing one is created)") from None
    return handle


if sys.platform.startswith("linux"):
    import ctypes

    _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a forked child must not load libraries


def die_with_parent() -> None:
    """In a child, before exec (Linux): get SIGTERM when the parent dies, however it dies."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn_p2pd_in_own_session() -> None:
    """Makes hivemind start ``p2pd`` in a session of its own (and, on Linux, tied to this process's
    life). hivemind starts it with ``asyncio.subprocess.create_subprocess_exec``; the wrapper changes
    only the spawns of ``p2pd`` and is installed once."""
    original = asyncio.subprocess.create_subprocess_exec
    if getattr(original, "swarm_p2pd_session", False):
        return

    async def create_subprocess_exec(program: Any, *args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        if os.path.basename(str(program)) == "p2pd":
            kwargs.setdefault("start_new_session", True)
            if sys.platform.startswith("linux"):
                kwargs.setdefault("preexec_fn", die_with_parent)
        return await original(program, *args, **kwargs)

    create_subprocess_exec.swarm_p2pd_session = True  # type: ignore[attr-defined]
    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec  # type: ignore[assignment]


def _ignore_dropped_daemon_streams(loop: asyncio.AbstractEventLoop) -> None:
    """``p2pd`` now and then opens a connection for an incoming stream and closes it before the stream
    starts; hivemind's handler then raises ``IncompleteReadError`` in a callback nobody awaits, which
    asyncio would log at ERROR every few seconds. That one case is logged at DEBUG; everything else goes
    to the loop's handler as before."""
    previous = loop.get_exception_handler()
    if getattr(previous, "swarm_daemon_streams", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if (isinstance(context.get("exception"), asyncio.IncompleteReadError)
                and "client_connected_cb" in str(context.get("message", ""))):
            logger.debug("p2pd dropped a stream before it started: %s", context["exception"])
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.swarm_daemon_streams = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


def _identity(identity_path: str | None) -> tuple[Identity, bool]:
    """The identity to run as, and whether hivemind should check that no running peer uses it already."""
    if identity_path is None:
        return new_identity(), False  # fresh: nobody else has it
    if not os.path.isfile(identity_path):
        P2P.generate_identity(identity_path)  # hivemind's RSA key file, as p2pd would get without Swarm
        return load_identity(identity_path), False
    identity = load_identity(identity_path)
    return identity, bool(identity.carried_public_key)  # hivemind's check reads RSA key files only


async def declare_server(
    peer: Peer, prefix: str, record: ServerRecord, expiration: float, model: ModelRecord | None = None,
    blocks: Sequence[int] | None = None,
) -> bool:
    """Stores ``record`` under every block key of its span (or of ``blocks``, e.g. an OFFLINE record for the
    blocks a moving server leaves) and the model index entry; True if all stored. Every entry's subkey is
    this peer's id and is signed by it.

    A later call supersedes an earlier one for the same (block, server): its expiration is later. Each call
    stamps the record with its time (``announced_at``), so every announcement differs from the last.
    """
    if not 0 < expiration <= MAX_RECORD_TTL:
        raise ConfigError(f"records live 0 to {MAX_RECORD_TTL:.0f}s (other peers refuse longer), got {expiration}s")
    if model is not None and model.prefix != prefix:
        raise ConfigError(f"the model index entry is for prefix {model.prefix!r}, the records for {prefix!r}")
    now = get_dht_time()
    expiration_time = now + expiration
    value = encode_record(dataclasses.replace(record, announced_at=now))
    keys: list[str] = [block_key(prefix, b) for b in (range(record.start, record.end) if blocks is None else blocks)]
    values: list[bytes] = [value] * len(keys)
    if model is not None:
        keys.append(MODEL_INDEX_KEY)
        values.append(encode_record(model))
    subkeys = [peer.peer_id.to_base58()] * len(keys)
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


def _entries(entry: ValueWithExpiration | None, cls: type[R]) -> Iterator[tuple[str, R]]:
    """``(peer id, record)`` for each entry of a key's dictionary that decodes as ``cls``. The DHT's validator
    let only entries signed by the peer their subkey names through; malformed records (from buggy or hostile
    peers) are skipped: they never stop a lookup."""
    if entry is None or not isinstance(entry.value, dict):
        return
    for peer_id, item in entry.value.items():
        try:
            record = decode_record(cls, item.value)
        except BadRequest:
            continue
        if isinstance(peer_id, str):
            yield peer_id, record


async def fetch_servers(peer: Peer, prefix: str, blocks: Sequence[int]) -> dict[int, dict[str, ServerRecord]]:
    """For each block, the records of servers that announced it: ``{block: {peer_id: record}}``."""
    keys = [block_key(prefix, b) for b in blocks]
    found = await peer.node.get_many(keys, sufficient_expiration_time=float("inf"))
    return {b: {peer_id: record for peer_id, record in _entries(found.get(key), ServerRecord)
                if record.start <= b < record.end}
            for b, key in zip(blocks, keys)}


async def publish_report(peer: Peer, prefix: str, record: ReportRecord, expiration: float) -> bool:
    """Stores this peer's report (it replaces its earlier one) under the model's reports key, signed with its
    peer id as subkey; True if stored."""
    if not 0 < expiration <= MAX_RECORD_TTL:
        raise ConfigError(f"records live 0 to {MAX_RECORD_TTL:.0f}s (other peers refuse longer), got {expiration}s")
    return bool(await peer.node.store(reports_key(prefix), encode_record(record), get_dht_time() + expiration,
                                      subkey=peer.peer_id.to_base58()))


async def fetch_reports(peer: Peer, prefix: str) -> dict[str, dict[str, str]]:
    """The model's reports: ``{peer id of a server: {reporter's peer id: why}}`` (malformed ones skipped)."""
    reports: dict[str, dict[str, str]] = {}
    for reporter, record in _entries(await peer.node.get(reports_key(prefix), latest=True), ReportRecord):
        for accused, why in record.wrong.items():
            reports.setdefault(accused, {})[reporter] = why
    return reports


async def fetch_models(peer: Peer) -> dict[str, dict[str, ModelRecord]]:
    """The model index as its servers claim it: ``{prefix: {peer_id: ModelRecord}}``, one signed claim per
    server (malformed ones skipped). Claims may disagree: :func:`swarm.swarm_state.pick_model` decides."""
    models: dict[str, dict[str, ModelRecord]] = {}
    for peer_id, record in _entries(await peer.node.get(MODEL_INDEX_KEY, latest=True), ModelRecord):
        models.setdefault(record.prefix, {})[peer_id] = record
    return models


async def fetch_index(peer: Peer) -> dict[str, ModelRecord]:
    """``{prefix: ModelRecord}``: per prefix, the claim most of its servers signed (unconfirmed:
    :func:`swarm.swarm_state.likeliest_model`; the health service confirms claims over ``info``)."""
    from swarm.swarm_state import likeliest_model

    claims = await fetch_models(peer)
    return {prefix: record for prefix, c in claims.items() if (record := likeliest_model(c)) is not None}


def peer_sockets() -> set[str]:
    """The ``hivemind-*.sock`` files now in the temp dir (hivemind hard-codes /tmp)."""
    return {p for d in {"/tmp", tempfile.gettempdir()} for p in glob.glob(os.path.join(d, "hivemind-*.sock"))}


def _listening_unix_paths() -> set[str]:
    """Paths of the unix sockets that listen in this network namespace (Linux /proc/net/unix; empty elsewhere)."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return set()
    paths = set()
    for fields in (line.split() for line in lines):  # Num RefCount Protocol Flags Type St Inode [Path]
        if len(fields) >= 8 and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: a listening socket
            paths.add(fields[7])
    return paths


def stale_peer_sockets(candidates: set[str] | None = None) -> set[str]:
    """``hivemind-*.sock`` files (of ``candidates``, default all) that no live p2pd daemon or client listens on.

    A socket listed as listening in /proc/net/unix is live and left alone: connecting to a live peer's socket
    to test it would make that peer log an error (its handler reads a stream that ends at once). Only the
    others (stale, or a peer in another network namespace) are probed with a connect.
    """
    listening = _listening_unix_paths()
    stale = set()
    for path in sorted(peer_sockets() if candidates is None else candidates):
        if path in listening or os.path.realpath(path) in listening:
            continue
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
    for path in sorted(stale_peer_sockets(peer_sockets() - set(keep))):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
            removed += 1
    return removed
