"""Signed DHT entries: every entry Swarm stores or believes is signed by the peer it names.

Every entry in Swarm's DHT (block keys and the model index alike) is a dictionary entry whose
subkey is its owner's peer id (base58) and whose value is an envelope
``msgpack([TAG, value, signature, public key])``. The signature, made with the libp2p key the
peer id is derived from (:mod:`swarm.identity`), covers ``msgpack([TAG, key id, subkey, value,
expiration])``: an entry cannot be moved to another key or subkey, nor given another expiration.

:class:`SignedRecordValidator` plugs into hivemind's ``DHTNode`` (``record_validator=``), which
runs it on every entry another peer asks this node to store and on every value another node
returns to a lookup (a returned dictionary with one bad entry is dropped whole). It accepts an
entry only if:

- it is a dictionary entry: a plain value is refused under every key (one plain value with a late
  expiration would shadow a key's whole dictionary and refuse every re-announcement);
- its subkey is a peer id and the envelope is signed by that peer's key;
- it expires at most :data:`MAX_RECORD_TTL` seconds from now (an entry cannot outlive its owner
  for long, nor be pinned far in the future);
- its envelope is well formed and at most :data:`MAX_ENVELOPE_BYTES`.

The validator sees hashed key ids, not key names, so it holds every key to these rules: Swarm's
DHT stores nothing else.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable

import msgpack
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

from swarm.identity import Identity, verify

TAG = b"swarm-signed/1"
MAX_RECORD_TTL = 900.0  # seconds; servers announce with 2.5 x --update-period (<= 300 s), the rest is clock skew
MAX_ENVELOPE_BYTES = 64 << 10
MAX_PEER_ID_CHARS = 128
_CACHE_SIZE = 8192


def signed_payload(key_id: bytes, subkey: bytes, value: bytes, expiration_time: float) -> bytes:
    """The bytes an entry's signature covers (``subkey`` as the DHT serializes it)."""
    return msgpack.packb([TAG, key_id, subkey, value, float(expiration_time)], use_bin_type=True)


def owner_of(subkey: bytes) -> str | None:
    """The peer id a serialized subkey names, or None if it names none (canonical base58 only)."""
    try:
        peer_id = msgpack.unpackb(subkey, raw=False)
        if isinstance(peer_id, str) and 0 < len(peer_id) <= MAX_PEER_ID_CHARS \
                and PeerID.from_base58(peer_id).to_base58() == peer_id:
            return peer_id
    except Exception:  # not msgpack, not base58: names nobody
        pass
    return None


class SignedRecordValidator(RecordValidatorBase):
    """Signs this peer's entries and accepts only entries signed by the peer their subkey names."""

    def __init__(self, identity: Identity, clock: Callable[[], float] = get_dht_time,
                 max_ttl: float = MAX_RECORD_TTL):
        self.identity, self.clock, self.max_ttl = identity, clock, max_ttl
        self._verified: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def sign_value(self, record: DHTRecord) -> bytes:
        if owner_of(record.subkey) != self.identity.peer_id:
            return record.value  # not ours to sign: validate() refuses it, so the store fails
        signature = self.identity.sign(signed_payload(record.key, record.subkey, record.value,
                                                      record.expiration_time))
        return msgpack.packb([TAG, record.value, signature, self.identity.carried_public_key], use_bin_type=True)

    def validate(self, record: DHTRecord) -> bool:
        if not record.expiration_time <= self.clock() + self.max_ttl or len(record.value) > MAX_ENVELOPE_BYTES:
            return False
        peer_id = owner_of(record.subkey)  # the plain-value marker (msgpack None) names nobody either
        envelope = _unpack(record.value)
        if peer_id is None or envelope is None:
            return False
        digest = hashlib.sha256(msgpack.packb([record.key, record.subkey, record.value, record.expiration_time],
                                              use_bin_type=True)).digest()
        if digest in self._verified:
            self._verified.move_to_end(digest)
            return True
        value, signature, public_key = envelope
        if not verify(peer_id, signed_payload(record.key, record.subkey, value, record.expiration_time), signature,
                      public_key):
            return False
        self._verified[digest] = None
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        envelope = _unpack(record.value)
        return envelope[0] if envelope is not None else record.value

    @property
    def priority(self) -> int:
        return 10  # hivemind's signature validator's: run before anything that reads the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def _unpack(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """``(value, signature, public key)`` of an envelope, or None if ``data`` is not one."""
    try:
        envelope = msgpack.unpackb(data, raw=True)
    except Exception:
        return None
    if (isinstance(envelope, list) and len(envelope) == 4 and envelope[0] == TAG
            and all(isinstance(part, bytes) for part in envelope[1:])):
        return envelope[1], envelope[2], envelope[3]
    return None
