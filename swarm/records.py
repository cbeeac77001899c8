"""DHT records: what a server says about itself and what the model index says about a model.

Every record is a frozen dataclass encoded with msgpack in one place (:func:`encode_record`,
:func:`decode_record`). Decoding ignores unknown fields (newer peers may add some), rejects a
record that lacks a required field or has a field of the wrong type, and rejects a newer major
``schema_version``.

DHT layout (see DESIGN.md). Every entry's subkey is the peer id of the server that wrote it and its
value is signed with that peer's libp2p key (:mod:`swarm.signed_records`); peers refuse anything else.

- block key ``"{prefix}.{block}"``, subkey = the server's peer id, value = ServerRecord
- model index key :data:`MODEL_INDEX_KEY`, subkey = the server's peer id, value = ModelRecord (one claim per
  server about the model it serves; readers decide which claims to believe: :func:`swarm.swarm_state.pick_model`)
- reports key ``"{prefix}.reports"``, subkey = the reporting client's peer id, value = ReportRecord

Schema 2 (signed entries, ``ModelRecord.prefix``) is not readable by schema-1 peers and the other way
round: a swarm upgrades all its peers together.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TypeVar

import msgpack

from swarm.codec import build_dataclass, dataclass_to_map
from swarm.errors import BadRequest

SCHEMA_VERSION = 2
MODEL_INDEX_KEY = "_swarm.models"


class ServerState(enum.IntEnum):
    """A server's lifecycle, in the order it goes through it."""

    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


@dataclasses.dataclass(frozen=True)
class ServerRecord:
    """What one server announces under each block key of its span."""

    state: ServerState
    start: int  # first block it holds
    end: int  # one past the last block it holds
    throughput: float = 0.0  # tokens/s per block it offers the swarm (0: unknown yet)
    inference_rps: float = 0.0  # 1-token inference steps/s through one block (0: not measured)
    forward_rps: float = 0.0  # tokens/s through one block in a forward pass (0: not measured)
    network_rps: float = 0.0  # tokens/s its link carries, from --network-rps (0: not given, not limiting)
    dtype: str = "float32"
    quant: str = "none"
    device: str = "cpu"
    device_name: str = ""
    cache_tokens_left: int = 0
    max_session_length: int = 0
    adapters: tuple[str, ...] = ()
    public_name: str = ""
    version: str = ""
    using_relay: bool = False
    next_pings: dict[str, float] = dataclasses.field(default_factory=dict)
    # DHT time (seconds since the epoch) of this announcement: every announce differs, so a client that found
    # the server dead knows when it announced again (swarm.routing.Bans)
    announced_at: float = 0.0
    next_bandwidth: dict[str, float] = dataclasses.field(default_factory=dict)  # bytes/s to those it measured
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise BadRequest(f"a server record needs 0 <= start < end, got {self.start}:{self.end}")


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """One server's entry in the model index: enough for a crawler to find every block key of a model."""

    prefix: str  # the model's DHT namespace: its block keys are "{prefix}.{block}"
    name: str  # repository id or local name the servers were started with
    num_blocks: int
    family: str  # transformers model_type, e.g. "llama"
    config_digest: str = ""  # swarm.models.config_digest of its config.json: the same model in another folder
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.num_blocks <= 0:
            raise BadRequest(f"a model record needs num_blocks > 0, got {self.num_blocks}")
        if not self.prefix:
            raise BadRequest("a model record needs a non-empty prefix")


@dataclasses.dataclass(frozen=True)
class ReportRecord:
    """What one client (or ``swarm verify`` checker) caught servers computing wrong, stored under
    :func:`reports_key` with the reporter's peer id as subkey (signed by it): ``{peer id of the server: why}``."""

    wrong: dict[str, str]
    schema_version: int = SCHEMA_VERSION


R = TypeVar("R", ServerRecord, ModelRecord, ReportRecord)


def encode_record(record: ServerRecord | ModelRecord | ReportRecord) -> bytes:
    return msgpack.packb(dataclass_to_map(record), use_bin_type=True)


def decode_record(cls: type[R], data: bytes) -> R:
    """Decodes bytes from the DHT into ``cls``; raises :class:`BadRequest` on anything malformed."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:
        raise BadRequest(f"{cls.__name__} is not valid msgpack: {e}") from None
    if not isinstance(raw, dict):
        raise BadRequest(f"{cls.__name__} must be a map, got {type(raw).__name__}")
    version = raw.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise BadRequest(f"{cls.__name__} has schema_version {version!r}; this peer reads <= {SCHEMA_VERSION}")
    return build_dataclass(cls, raw)


def block_key(prefix: str, block: int) -> str:
    return f"{prefix}.{block}"


def reports_key(prefix: str) -> str:
    """Where clients report the servers of a model they caught computing wrong."""
    return f"{prefix}.reports"
