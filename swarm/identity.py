"""A peer's libp2p identity: the private key its peer id is derived from, held by Swarm as well as p2pd.

A libp2p peer id is a multihash of the peer's public key (protobuf ``PublicKey``): for Ed25519 keys
the key itself (the "identity" multihash, ids ``12D3KooW...``), for RSA keys its SHA-256 (ids
``Qm...``). So whoever holds a peer id can check a signature of that peer with nothing else
(Ed25519), or with a public key whose hash must equal the id (RSA). Swarm signs its DHT records
with this key (:mod:`swarm.signed_records`): a record under a peer id is believed only if that
peer signed it.

p2pd keeps the key it generates to itself, so Swarm makes the key and hands it to p2pd as an
identity file: a fresh Ed25519 key per start, or the key in ``--identity-path`` (hivemind writes
RSA keys there; both kinds are read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Iterator

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

from swarm.errors import ConfigError

_IDENTITY_HASH, _SHA2_256 = 0x00, 0x12  # multihash codes a peer id may use
MIN_RSA_BITS, MAX_RSA_BITS = 2048, 4096  # bigger keys would let a peer make every check of its records slow


@dataclasses.dataclass(frozen=True)
class Identity:
    """A private key and the peer id p2pd derives from it."""

    private_key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    peer_id: str  # base58

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(data)
        return self.private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    @property
    def carried_public_key(self) -> bytes:
        """What a signed record must carry so others can check it: nothing for Ed25519 (the peer id is
        the key), the protobuf public key for RSA (the peer id is only its hash)."""
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return b""
        return _public_key_protobuf(self.private_key.public_key())

    def to_protobuf(self) -> bytes:
        """The libp2p private key file p2pd reads (``-id``)."""
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            seed = self.private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                  serialization.NoEncryption())
            public = self.private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                serialization.PublicFormat.Raw)
            return crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=seed + public).SerializeToString()
        der = self.private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                             serialization.NoEncryption())
        return crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()


def new_identity() -> Identity:
    """A fresh Ed25519 identity (what p2pd would generate itself)."""
    return _identity(ed25519.Ed25519PrivateKey.generate())


def load_identity(path: str) -> Identity:
    """The identity in a libp2p private key file (Ed25519 or RSA, as hivemind and p2pd write them)."""
    try:
        with open(path, "rb") as f:
            key = crypto_pb2.PrivateKey.FromString(f.read())
        if key.key_type == crypto_pb2.Ed25519 and len(key.data) in (64, 96):  # seed + public key (+ public key)
            return _identity(ed25519.Ed25519PrivateKey.from_private_bytes(key.data[:32]))
        if key.key_type == crypto_pb2.RSA:
            private_key = serialization.load_der_private_key(key.data, password=None)
            if isinstance(private_key, rsa.RSAPrivateKey) and MIN_RSA_BITS <= private_key.key_size <= MAX_RSA_BITS:
                return _identity(private_key)
    except OSError as e:
        raise ConfigError(f"--identity-path {path!r} cannot be read: {e}") from None
    except Exception as e:
        raise ConfigError(f"--identity-path {path!r} is not a libp2p private key file: {e}") from None
    raise ConfigError(f"--identity-path {path!r} holds a key Swarm cannot sign with (Ed25519 or RSA "
                      f"{MIN_RSA_BITS}-{MAX_RSA_BITS} bits); remove it to get a new one")


@contextlib.contextmanager
def identity_file(identity: Identity) -> Iterator[str]:
    """A private (0600) temporary copy of ``identity`` for p2pd to read at start; removed on exit."""
    fd, path = tempfile.mkstemp(prefix="swarm-identity-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(identity.to_protobuf())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def verify(peer_id: str, data: bytes, signature: bytes, carried_public_key: bytes = b"") -> bool:
    """True iff ``signature`` over ``data`` was made by the key ``peer_id`` is derived from.

    ``carried_public_key`` (protobuf) is needed for RSA peer ids and must hash to the id. Never raises:
    any malformed input is a failed check.
    """
    try:
        digest = PeerID.from_base58(peer_id).to_bytes()
        if len(digest) < 2 or digest[1] != len(digest) - 2:
            return False
        if digest[0] == _IDENTITY_HASH:
            key = crypto_pb2.PublicKey.FromString(digest[2:])
            if key.key_type != crypto_pb2.Ed25519 or len(key.data) != 32 or carried_public_key:
                return False
            ed25519.Ed25519PublicKey.from_public_bytes(key.data).verify(signature, data)
            return True
        if digest[0] == _SHA2_256 and carried_public_key and hashlib.sha256(carried_public_key).digest() == digest[2:]:
            key = crypto_pb2.PublicKey.FromString(carried_public_key)
            if key.key_type != crypto_pb2.RSA:
                return False
            public_key = serialization.load_der_public_key(key.data)
            if not isinstance(public_key, rsa.RSAPublicKey) or not MIN_RSA_BITS <= public_key.key_size <= MAX_RSA_BITS:
                return False
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            return True
    except Exception:  # InvalidSignature, or malformed base58, protobuf or key bytes: the check fails
        return False
    return False


def _public_key_protobuf(public_key: ed25519.Ed25519PublicKey | rsa.RSAPublicKey) -> bytes:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return crypto_pb2.PublicKey(key_type=crypto_pb2.Ed25519, data=raw).SerializeToString()
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()


def _identity(private_key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> Identity:
    encoded = _public_key_protobuf(private_key.public_key())
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        digest = bytes([_IDENTITY_HASH, len(encoded)]) + encoded
    else:
        digest = bytes([_SHA2_256, 32]) + hashlib.sha256(encoded).digest()
    return Identity(private_key=private_key, peer_id=PeerID(digest).to_base58())
