"""Private swarms: a shared secret that every member holds and every request proves.

The bundled p2pd has no libp2p private-network (pre-shared key) option, so the swarm key works in
Swarm's layer. One 32-byte secret (``--swarm-key FILE``; ``swarm keygen FILE`` makes one) gives
two keys, each derived for one use:

- **DHT requests** (:class:`SwarmKeyAuthorizer`, hivemind's ``authorizer=`` of ``DHTNode``): every
  ping, store and find carries an HMAC of the request, a timestamp and a nonce; every response an
  HMAC bound to the request's nonce. A peer without the key gets no answer from members (it cannot
  read, store, or enter their routing tables), and members ignore its answers.
- **RPC streams** (:func:`stream_proof`): the first frame of every stream to a server is a
  :class:`~swarm.wire.KeyProof`, an HMAC over the opener's and the server's peer ids (which libp2p
  authenticates) and the handler name. A server refuses a stream without a valid proof.

Key files use libp2p's ``swarm.key`` format (``/key/swarm/psk/1.0.0/``, ``/base16/``, 64 hex
digits); a file holding just the 64 hex digits (``openssl rand -hex 32 > swarm.key``) works too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import weakref

import msgpack
from hivemind.p2p import P2P
from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

from swarm.errors import ConfigError

KEY_BYTES = 32
PSK_HEADER, PSK_ENCODING = "/key/swarm/psk/1.0.0/", "/base16/"
MAX_CLOCK_SKEW = 120.0  # seconds a DHT request's timestamp may differ from this peer's clock
_NONCES_KEPT = 100_000


@dataclasses.dataclass(frozen=True)
class SwarmKey:
    secret: bytes = dataclasses.field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ConfigError(f"a swarm key is {KEY_BYTES} bytes, got {len(self.secret)}")

    @classmethod
    def from_file(cls, path: str) -> "SwarmKey":
        """Reads a key file; raises :class:`ConfigError` naming the flag on anything else."""
        try:
            with open(path) as f:
                lines = [line.strip() for line in f.read(4096).splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--swarm-key {path!r} cannot be read: {e}") from None
        if lines[:2] == [PSK_HEADER, PSK_ENCODING]:
            lines = lines[2:]
        try:
            secret = bytes.fromhex(lines[0]) if len(lines) == 1 else b""
        except ValueError:
            secret = b""
        if len(secret) != KEY_BYTES:
            raise ConfigError(f"--swarm-key {path!r} is not a swarm key file: expected {KEY_BYTES * 2} hex digits "
                              f"(after {PSK_HEADER} and {PSK_ENCODING} lines, or alone); make one with "
                              "`swarm keygen FILE` or `openssl rand -hex 32 > FILE`")
        return cls(secret)

    def derive(self, purpose: str) -> bytes:
        """A key for one use, so a proof made for one purpose is worth nothing in another."""
        return hmac.new(self.secret, b"swarm-key/1 " + purpose.encode(), hashlib.sha256).digest()

    @property
    def fingerprint(self) -> str:
        """A short public name of the key (safe to log), to tell two keys apart."""
        return self.derive("fingerprint").hex()[:12]


def write_key_file(path: str) -> SwarmKey:
    """Writes a new random key to ``path`` (readable by its owner only); refuses to overwrite a file."""
    key = SwarmKey(secrets.token_bytes(KEY_BYTES))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path!r} exists; a swarm key is never overwritten (remove it first)") from None
    except OSError as e:
        raise ConfigError(f"cannot create {path!r}: {e}") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{PSK_HEADER}\n{PSK_ENCODING}\n{key.secret.hex()}\n")
    return key


_KEYS: weakref.WeakKeyDictionary[P2P, SwarmKey] = weakref.WeakKeyDictionary()


def use_swarm_key(p2p: P2P, key: SwarmKey | None) -> None:
    """Every stream ``p2p`` opens from now on starts with a proof of ``key``, and every stream it accepts must
    (None: no proof either way). :func:`swarm.transport.Stream.open` and ``check_opener`` read it."""
    if key is None:
        _KEYS.pop(p2p, None)
    else:
        _KEYS[p2p] = key


def swarm_key_of(p2p: P2P) -> SwarmKey | None:
    return _KEYS.get(p2p)


def stream_proof(key: SwarmKey, opener: str, server: str, handler: str) -> bytes:
    """The proof an opener puts in the first frame of a stream to ``server``'s ``handler``."""
    return hmac.new(key.derive("streams"), msgpack.packb([opener, server, handler]), hashlib.sha256).digest()


def check_stream_proof(key: SwarmKey, proof: bytes, opener: str, server: str, handler: str) -> bool:
    return isinstance(proof, bytes) and hmac.compare_digest(proof, stream_proof(key, opener, server, handler))


class SwarmKeyAuthorizer(AuthorizerBase):
    """Signs and checks every DHT request and response with the swarm key (hivemind's ``authorizer=``)."""

    def __init__(self, key: SwarmKey):
        self._key = key.derive("dht")
        self._nonces: TimedStorage[bytes, None] = TimedStorage(maxsize=_NONCES_KEPT)

    def _mac(self, message) -> bytes:
        return hmac.new(self._key, message.SerializeToString(), hashlib.sha256).digest()

    def _check(self, message) -> bool:
        signature = message.auth.signature
        message.auth.signature = b""
        return hmac.compare_digest(signature, self._mac(message))

    async def sign_request(self, request: AuthorizedRequestBase, service_public_key=None) -> None:
        request.auth.time = get_dht_time()
        request.auth.nonce = secrets.token_bytes(16)
        request.auth.signature = b""
        request.auth.signature = self._mac(request)

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        if not self._check(request):
            return False
        now, nonce = get_dht_time(), request.auth.nonce
        if not abs(request.auth.time - now) <= MAX_CLOCK_SKEW or not nonce or self._nonces.get(nonce) is not None:
            return False  # too old, from the future, or replayed
        self._nonces.store(nonce, None, now + 3 * MAX_CLOCK_SKEW)
        return True

    async def sign_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> None:
        response.auth.nonce = request.auth.nonce
        response.auth.signature = b""
        response.auth.signature = self._mac(response)

    async def validate_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> bool:
        return self._check(response) and hmac.compare_digest(response.auth.nonce, request.auth.nonce)
