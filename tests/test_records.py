"""DHT records (swarm/records.py) and the dataclass codec under them (swarm/codec.py)."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from swarm.codec import build_dataclass, dataclass_to_map
from swarm.errors import BadRequest
from swarm.records import (
    MODEL_INDEX_KEY,
    SCHEMA_VERSION,
    ModelRecord,
    ServerRecord,
    ServerState,
    block_key,
    decode_record,
    encode_record,
)


def full_server_record() -> ServerRecord:
    """A record with every field away from its default, so a dropped field shows up in the round trip."""
    return ServerRecord(
        state=ServerState.JOINING,
        start=3,
        end=7,
        throughput=123.5,
        inference_rps=4.25,
        forward_rps=8.5,
        network_rps=99.0,
        dtype="bfloat16",
        quant="nf4",
        device="cuda",
        device_name="NVIDIA H100",
        cache_tokens_left=4096,
        max_session_length=2048,
        adapters=("lora-a", "lora-b"),
        public_name="alice",
        version="0.1.0",
        using_relay=True,
        next_pings={"QmPeerA": 0.012, "QmPeerB": 1.5},
        announced_at=1_700_000_000.5,
        next_bandwidth={"QmPeerA": 1.25e6},
        schema_version=SCHEMA_VERSION,
    )


def server_map(**changes) -> dict:
    raw = dataclass_to_map(ServerRecord(state=ServerState.ONLINE, start=0, end=4))
    raw.update(changes)
    return raw


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ---------------------------------------------------------------- round trips


def test_server_record_round_trip_keeps_every_field():
    record = full_server_record()
    # guard: the fixture really differs from the defaults in every field but schema_version
    defaults = ServerRecord(state=ServerState.OFFLINE, start=0, end=1)
    for field in dataclasses.fields(ServerRecord):
        if field.name != "schema_version":
            assert getattr(record, field.name) != getattr(defaults, field.name), field.name

    decoded = decode_record(ServerRecord, encode_record(record))
    assert decoded == record
    assert type(decoded.state) is ServerState and decoded.state is ServerState.JOINING
    assert isinstance(decoded.adapters, tuple) and decoded.adapters == ("lora-a", "lora-b")
    assert isinstance(decoded.next_pings, dict) and decoded.next_pings == {"QmPeerA": 0.012, "QmPeerB": 1.5}
    assert isinstance(decoded.throughput, float)


@pytest.mark.parametrize("state", list(ServerState))
def test_every_server_state_round_trips(state):
    decoded = decode_record(ServerRecord, encode_record(ServerRecord(state=state, start=0, end=1)))
    assert decoded.state is state


def test_server_record_defaults_survive_round_trip():
    record = ServerRecord(state=ServerState.ONLINE, start=0, end=1)
    decoded = decode_record(ServerRecord, encode_record(record))
    assert decoded == record
    assert decoded.adapters == () and decoded.next_pings == {}


def test_encoded_record_is_a_plain_msgpack_map():
    raw = msgpack.unpackb(encode_record(full_server_record()), raw=False)
    assert raw["state"] == int(ServerState.JOINING)
    assert raw["adapters"] == ["lora-a", "lora-b"]
    assert raw["schema_version"] == SCHEMA_VERSION


def test_model_record_round_trip():
    record = ModelRecord(prefix="Qwen2.5-7B-Instruct", name="Qwen/Qwen2.5-7B-Instruct", num_blocks=28, family="qwen2")
    assert decode_record(ModelRecord, encode_record(record)) == record


def test_int_accepted_for_float_fields_and_pings():
    decoded = decode_record(ServerRecord, pack(server_map(throughput=7, next_pings={"p": 2})))
    assert decoded.throughput == 7.0 and isinstance(decoded.throughput, float)
    assert decoded.next_pings == {"p": 2.0} and isinstance(decoded.next_pings["p"], float)


def test_missing_optional_fields_take_defaults():
    decoded = decode_record(ServerRecord, pack({"state": 2, "start": 1, "end": 2}))
    assert decoded == ServerRecord(state=ServerState.ONLINE, start=1, end=2)


# ---------------------------------------------------------------- tolerance and rejection


def test_unknown_fields_are_ignored():
    raw = server_map(some_future_field={"x": [1, 2]}, another=3)
    decoded = decode_record(ServerRecord, pack(raw))
    assert decoded == ServerRecord(state=ServerState.ONLINE, start=0, end=4)


@pytest.mark.parametrize("field", ["state", "start", "end"])
def test_missing_required_server_field_is_rejected_by_name(field):
    raw = server_map()
    del raw[field]
    with pytest.raises(BadRequest, match=f"ServerRecord lacks the required field '{field}'"):
        decode_record(ServerRecord, pack(raw))


@pytest.mark.parametrize("field", ["prefix", "name", "num_blocks", "family"])
def test_missing_required_model_field_is_rejected_by_name(field):
    raw = dataclass_to_map(ModelRecord(prefix="m", name="m", num_blocks=2, family="llama"))
    del raw[field]
    with pytest.raises(BadRequest, match=f"ModelRecord lacks the required field '{field}'"):
        decode_record(ModelRecord, pack(raw))


@pytest.mark.parametrize(
    "field, value",
    [
        ("start", "3"),
        ("end", 4.0),
        ("start", True),  # bool is an int subclass, but not an int on the wire
        ("cache_tokens_left", False),
        ("throughput", "fast"),
        ("throughput", True),
        ("dtype", 16),
        ("using_relay", 1),
        ("adapters", "lora-a"),
        ("adapters", ["ok", 3]),
        ("next_pings", [["p", 1.0]]),
        ("next_pings", {"p": "slow"}),
        ("next_pings", {7: 1.0}),
    ],
)
def test_wrong_field_type_is_rejected_by_name(field, value):
    with pytest.raises(BadRequest, match=rf"ServerRecord\.{field} must be"):
        decode_record(ServerRecord, pack(server_map(**{field: value})))


@pytest.mark.parametrize("state", [3, -1, "ONLINE", None])
def test_unknown_state_is_rejected(state):
    with pytest.raises(BadRequest, match=r"ServerRecord\.state"):
        decode_record(ServerRecord, pack(server_map(state=state)))


def test_model_record_wrong_types_rejected():
    raw = dataclass_to_map(ModelRecord(prefix="m", name="m", num_blocks=2, family="llama"))
    with pytest.raises(BadRequest, match=r"ModelRecord\.num_blocks must be int"):
        decode_record(ModelRecord, pack({**raw, "num_blocks": "2"}))
    with pytest.raises(BadRequest, match=r"ModelRecord\.name must be str"):
        decode_record(ModelRecord, pack({**raw, "name": b"m"}))


def test_model_record_needs_positive_num_blocks():
    raw = dataclass_to_map(ModelRecord(prefix="m", name="m", num_blocks=2, family="llama"))
    with pytest.raises(BadRequest, match="num_blocks > 0"):
        decode_record(ModelRecord, pack({**raw, "num_blocks": 0}))
    with pytest.raises(BadRequest, match="num_blocks > 0"):
        ModelRecord(prefix="m", name="m", num_blocks=-1, family="llama")


@pytest.mark.parametrize("cls", [ServerRecord, ModelRecord])
def test_newer_schema_version_is_rejected(cls):
    raw = server_map() if cls is ServerRecord else {"name": "m", "num_blocks": 1, "family": "llama"}
    raw["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(BadRequest, match=f"schema_version {SCHEMA_VERSION + 1}"):
        decode_record(cls, pack(raw))


@pytest.mark.parametrize("version", ["1", 1.0, [1], True])
def test_non_int_schema_version_is_rejected(version):
    with pytest.raises(BadRequest, match="schema_version"):
        decode_record(ServerRecord, pack(server_map(schema_version=version)))


def test_older_or_equal_schema_version_is_accepted():
    for version in (SCHEMA_VERSION, SCHEMA_VERSION - 1):
        decoded = decode_record(ServerRecord, pack(server_map(schema_version=version)))
        assert decoded.schema_version == version


@pytest.mark.parametrize("data", [b"\xc1", b"\x92\x01", b"", b"\x81\xa1"])  # reserved byte, trailing, empty, truncated
def test_non_msgpack_bytes_are_rejected(data):
    with pytest.raises(BadRequest, match="ServerRecord is not valid msgpack"):
        decode_record(ServerRecord, data)


@pytest.mark.parametrize("obj", [[1, 2, 3], "a string", 42, None, b"bytes"])
def test_non_map_msgpack_is_rejected(obj):
    with pytest.raises(BadRequest, match="ServerRecord must be a map"):
        decode_record(ServerRecord, pack(obj))


@pytest.mark.parametrize("start, end", [(4, 4), (5, 4), (-1, 3)])
def test_bad_span_is_rejected(start, end):
    with pytest.raises(BadRequest, match="start < end"):
        ServerRecord(state=ServerState.ONLINE, start=start, end=end)
    with pytest.raises(BadRequest, match="start < end"):
        decode_record(ServerRecord, pack(server_map(start=start, end=end)))


def test_build_dataclass_wraps_constructor_errors():
    @dataclasses.dataclass
    class Picky:
        x: int

        def __post_init__(self):
            if self.x == 13:
                raise ValueError("unlucky")

    assert build_dataclass(Picky, {"x": 1}) == Picky(1)
    with pytest.raises(BadRequest, match="Picky is invalid: unlucky"):
        build_dataclass(Picky, {"x": 13})


def test_block_key_format():
    assert block_key("Qwen2.5-7B-Instruct", 0) == "Qwen2.5-7B-Instruct.0"
    assert block_key("llama", 31) == "llama.31"
    assert block_key("a.b", 2) == "a.b.2"
    assert MODEL_INDEX_KEY not in {block_key("_swarm", b) for b in range(100)}
