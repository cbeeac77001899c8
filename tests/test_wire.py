"""The wire protocol (swarm/wire.py) and the error tree's wire form (swarm/errors.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import struct

import msgpack
import pytest
import torch

from swarm import errors
from swarm.errors import BadRequest, ProtocolVersionError, SwarmError, from_wire, to_wire
from swarm.wire import (
    MAX_HEADER_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    BackwardRequest,
    BackwardResponse,
    ErrorReply,
    FetchOutputs,
    ForwardRequest,
    ForwardResponse,
    InferenceStep,
    InferenceSteps,
    InfoRequest,
    InfoResponse,
    KeyProof,
    OpenSession,
    SessionOpened,
    SessionOutputs,
    StepOutput,
    StepOutputs,
    WireLimits,
    encode,
    expect,
    read_message,
    write_error,
    write_message,
)


def read_bytes(data: bytes, limits: WireLimits | None = None, count: int = 1):
    """Feeds ``data`` to a fresh StreamReader and reads ``count`` messages from it."""

    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return [await read_message(reader, limits) for _ in range(count)]

    out = asyncio.run(run())
    return out[0] if count == 1 else out


def to_bytes(msg) -> bytes:
    return b"".join(bytes(part) for part in encode(msg))


def raw_frame(header, buffers: bytes = b"") -> bytes:
    header_bytes = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    return struct.pack("<I", len(header_bytes)) + header_bytes + buffers


def tensor_header(dtype="float32", shape=(2,), size=8, msg_type="ForwardResponse", **meta_extra) -> dict:
    meta = {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "__tensor__": 0,
            **meta_extra}
    return {"type": msg_type, "fields": {"hidden": meta}, "sizes": [size]}


def assert_same(a, b):
    """Deep equality of two messages, comparing tensors by dtype, shape and values."""
    assert type(a) is type(b)
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, tuple) and x and isinstance(x[0], torch.Tensor):
            assert isinstance(y, tuple) and len(x) == len(y), field.name
            for xi, yi in zip(x, y):
                assert xi.dtype == yi.dtype and xi.shape == yi.shape and torch.equal(xi, yi), field.name
        elif isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), field.name
            assert x.dtype == y.dtype and x.shape == y.shape, field.name
            assert torch.equal(x, y), field.name
        else:
            assert x == y, field.name


EXAMPLES = [
    InfoRequest(),
    InfoResponse(protocol_version=PROTOCOL_VERSION, version="0.1.0", model="Qwen/Qwen2.5-7B", start=2, end=5,
                 hidden_size=3584, dtype="bfloat16", max_session_length=8192, max_batch_size=64,
                 cache_tokens_left=12345, public_name="alice", num_blocks=28),
    KeyProof(proof=bytes(range(32))),
    ForwardRequest(start=0, end=3, hidden=torch.randn(2, 5, 8)),
    ForwardResponse(hidden=torch.randn(1, 3, 4).to(torch.bfloat16)),
    BackwardRequest(start=1, end=3, hidden=torch.randn(1, 4, 8), grad_output=torch.randn(1, 4, 8),
                    prompts=torch.randn(2, 1, 2, 8), lora_modules=("1.self_attn.q_proj", "2.mlp.down_proj"),
                    lora_a=(torch.randn(2, 8), torch.randn(2, 16)), lora_b=(torch.randn(8, 2), torch.randn(8, 2)),
                    lora_scaling=2.0, lora_dropout=0.05, seed=123),
    BackwardResponse(grad_input=torch.randn(1, 4, 8), grad_prompts=torch.randn(2, 1, 2, 8),
                     grad_lora_a=(torch.randn(2, 8),), grad_lora_b=(torch.randn(8, 2),)),
    OpenSession(session_id="s-1", start=1, end=4, max_length=512, batch_size=3),
    SessionOpened(session_id="s-1", cache_tokens_left=77),
    InferenceStep(session_id="s-1", hidden=torch.randn(2, 1, 4).to(torch.float16), start_position=9),
    InferenceStep(session_id="s-1", hidden=torch.randn(2, 1, 4), start_position=0,
                  hypo_ids=torch.tensor([1, 0], dtype=torch.int64)),
    StepOutput(hidden=torch.randn(2, 1, 4), position=10),
    InferenceSteps(session_ids=("s-1", "s-2"), hidden=(torch.randn(1, 1, 4), torch.randn(3, 1, 4)),
                   start_positions=(9, 0), step_ids=(4, 1)),
    StepOutputs(session_ids=("s-1", "s-2"), step_ids=(4, 1), hidden=(torch.randn(1, 1, 4), torch.zeros(0)),
                positions=(10, 0), error_codes=("", "server_busy"), error_messages=("", "out of cache")),
    InferenceSteps(session_ids=(), hidden=(), start_positions=(), step_ids=()),
    StepOutput(hidden=None, position=11, step_id=3, pushed=True),  # pushed on without an echo
    FetchOutputs(session_id="s-1", start=0, end=11),
    SessionOutputs(hidden=torch.randn(2, 11, 4), start=0),
    ErrorReply(code="server_busy", message="out of cache"),
]


def test_examples_cover_every_message_type():
    assert {type(m).__name__ for m in EXAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert_same(read_bytes(to_bytes(msg)), msg)


def test_many_messages_on_one_stream():
    data = b"".join(to_bytes(m) for m in EXAMPLES)
    out = read_bytes(data, count=len(EXAMPLES))
    for got, sent in zip(out, EXAMPLES):
        assert_same(got, sent)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32])
def test_tensor_dtypes_round_trip_exactly(dtype):
    values = torch.arange(-6, 6).reshape(3, 4)
    tensor = values.to(dtype) if not dtype.is_floating_point else (values.to(torch.float32) / 3).to(dtype)
    got = read_bytes(to_bytes(ForwardResponse(hidden=tensor))).hidden
    assert got.dtype == dtype and got.shape == (3, 4)
    assert torch.equal(got, tensor)
    # the receiver gets a writable tensor of its own, not a view of the sender's memory
    got.add_(1)
    assert not torch.equal(got, tensor)


@pytest.mark.parametrize("shape", [(0,), (2, 0, 4), (0, 0), (), (1,), (1, 1, 1)])
def test_small_and_empty_shapes(shape):
    tensor = torch.ones(shape, dtype=torch.float32)
    got = read_bytes(to_bytes(ForwardResponse(hidden=tensor))).hidden
    assert got.shape == tensor.shape and got.dtype == torch.float32
    assert torch.equal(got, tensor)


def test_non_contiguous_tensor_is_sent_by_value():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert not tensor.is_contiguous()
    got = read_bytes(to_bytes(ForwardResponse(hidden=tensor))).hidden
    assert torch.equal(got, tensor)


def test_hypo_ids_none_vs_tensor():
    hidden = torch.zeros(2, 1, 4)
    without = read_bytes(to_bytes(InferenceStep(session_id="s", hidden=hidden, start_position=0)))
    assert without.hypo_ids is None
    ids = torch.tensor([1, 1], dtype=torch.int64)
    with_ids = read_bytes(to_bytes(InferenceStep(session_id="s", hidden=hidden, start_position=0, hypo_ids=ids)))
    assert with_ids.hypo_ids is not None and with_ids.hypo_ids.dtype == torch.int64
    assert torch.equal(with_ids.hypo_ids, ids)


def test_frame_layout():
    tensor = torch.zeros(2, 3)
    parts = encode(ForwardResponse(hidden=tensor))
    assert len(parts) == 2  # header, one tensor buffer
    (header_len,) = struct.unpack("<I", bytes(parts[0][:4]))
    header = msgpack.unpackb(bytes(parts[0][4:]), raw=False)
    assert header_len == len(parts[0]) - 4
    assert header["type"] == "ForwardResponse"
    assert header["sizes"] == [tensor.numel() * 4] == [len(bytes(parts[1]))]
    assert header["fields"]["hidden"] == {"dtype": "float32", "shape": [2, 3], "__tensor__": 0}


def test_encoding_an_unsupported_dtype_fails():
    with pytest.raises(BadRequest, match="cannot cross the wire"):
        encode(ForwardResponse(hidden=torch.zeros(2, dtype=torch.float64)))


def test_write_message_and_write_error():
    class Writer:
        def __init__(self):
            self.data = bytearray()

        def write(self, part):
            self.data += bytes(part)

        async def drain(self):
            pass

    writer = Writer()

    async def run():
        await write_message(writer, SessionOpened(session_id="x", cache_tokens_left=1))
        await write_error(writer, errors.ServerBusy("queue full"))
        await write_error(writer, KeyError("boom"))

    asyncio.run(run())
    opened, busy, other = read_bytes(bytes(writer.data), count=3)
    assert opened == SessionOpened(session_id="x", cache_tokens_left=1)
    assert busy == ErrorReply(code="server_busy", message="queue full")
    assert other.code == "swarm_error" and "KeyError" in other.message and "boom" in other.message


# ---------------------------------------------------------------- malformed frames


def test_header_length_over_limit():
    data = struct.pack("<I", MAX_HEADER_BYTES + 1)
    with pytest.raises(BadRequest, match=f"header is {MAX_HEADER_BYTES + 1} bytes; the limit is {MAX_HEADER_BYTES}"):
        read_bytes(data)


def test_header_not_msgpack():
    with pytest.raises(BadRequest, match="header is not valid msgpack"):
        read_bytes(raw_frame(b"\xc1\xc1\xc1"))


@pytest.mark.parametrize("header", [[1, 2], "InfoRequest", 7, {"type": "InfoRequest"},
                                    {"type": "InfoRequest", "fields": [1]}])
def test_header_not_a_map_with_fields(header):
    with pytest.raises(BadRequest, match="header must be a map with 'type' and 'fields'"):
        read_bytes(raw_frame(header))


@pytest.mark.parametrize("msg_type", ["NoSuchMessage", None, 3, "message", [1], {"a": 1}])
def test_unknown_message_type(msg_type):
    with pytest.raises(BadRequest, match="unknown message type"):
        read_bytes(raw_frame({"type": msg_type, "fields": {}}))


@pytest.mark.parametrize("sizes", [[-1], [1.5], ["4"], 4, [None], {"0": 4}])
def test_bad_sizes(sizes):
    with pytest.raises(BadRequest, match="'sizes' must be a list of non-negative ints"):
        read_bytes(raw_frame({"type": "InfoRequest", "fields": {}, "sizes": sizes}, b"\0" * 8))


@pytest.mark.parametrize("size", [4, 12, 0])
def test_tensor_meta_with_wrong_byte_count(size):
    with pytest.raises(BadRequest, match=f"need 8 bytes, the message declares {size}"):
        read_bytes(raw_frame(tensor_header(size=size), b"\0" * 16))


@pytest.mark.parametrize("dtype", ["float64", "complex64", "uint8", "", None, 5, ["float32"], {"a": 1}])
def test_unsupported_dtype(dtype):
    with pytest.raises(BadRequest, match="tensor dtype .* is not one of"):
        read_bytes(raw_frame(tensor_header(dtype=dtype), b"\0" * 8))


@pytest.mark.parametrize("shape", [5, [-1], [2.0], ["2"], None, [2**31], [True, 2]])
def test_bad_shape(shape):
    with pytest.raises(BadRequest, match="tensor shape must be a list of non-negative ints"):
        read_bytes(raw_frame(tensor_header(shape=shape), b"\0" * 8))


def test_too_many_dimensions():
    with pytest.raises(BadRequest, match="9 dimensions; at most 8"):
        read_bytes(raw_frame(tensor_header(shape=[1] * 9, size=4), b"\0" * 4))


@pytest.mark.parametrize("index", [1, -1, "0", None])
def test_tensor_refers_to_missing_buffer(index):
    header = tensor_header()
    header["fields"]["hidden"]["__tensor__"] = index
    with pytest.raises(BadRequest, match="refers to tensor buffer"):
        read_bytes(raw_frame(header, b"\0" * 8))


def test_buffers_over_message_limit():
    data = to_bytes(ForwardResponse(hidden=torch.zeros(4)))  # 16 bytes of tensor data
    assert read_bytes(data, WireLimits(max_message_bytes=16)).hidden.shape == (4,)
    with pytest.raises(BadRequest, match="carries 16 bytes of tensors; this peer accepts at most 15"):
        read_bytes(data, WireLimits(max_message_bytes=15))


def test_limit_is_checked_before_buffers_are_read():
    # a huge declared size is refused from the header alone, with no data behind it
    header = tensor_header(shape=[2**30], size=2**32)
    with pytest.raises(BadRequest, match="bytes of tensors"):
        read_bytes(raw_frame(header))


def test_tensor_in_a_non_tensor_field_is_rejected():
    header = {"type": "SessionOpened",
              "fields": {"session_id": "s", "cache_tokens_left": {"dtype": "int64", "shape": [1], "__tensor__": 0}},
              "sizes": [8]}
    with pytest.raises(BadRequest, match=r"SessionOpened\.cache_tokens_left must be int"):
        read_bytes(raw_frame(header, b"\0" * 8))


def test_missing_and_mistyped_fields_are_rejected():
    with pytest.raises(BadRequest, match="SessionOpened lacks the required field 'cache_tokens_left'"):
        read_bytes(raw_frame({"type": "SessionOpened", "fields": {"session_id": "s"}}))
    with pytest.raises(BadRequest, match=r"OpenSession\.start must be int"):
        read_bytes(raw_frame({"type": "OpenSession",
                              "fields": {"session_id": "s", "start": "0", "end": 1, "max_length": 4}}))
    with pytest.raises(BadRequest, match=r"ForwardResponse\.hidden must be"):
        read_bytes(raw_frame({"type": "ForwardResponse", "fields": {"hidden": [1.0, 2.0]}}))


def test_unknown_fields_are_ignored():
    got = read_bytes(raw_frame({"type": "SessionOpened",
                                "fields": {"session_id": "s", "cache_tokens_left": 3, "future": [1]}}))
    assert got == SessionOpened(session_id="s", cache_tokens_left=3)


@pytest.mark.parametrize("msg", [
    InfoRequest(protocol_version=PROTOCOL_VERSION + 1),
    ForwardRequest(start=0, end=1, hidden=torch.zeros(1, 1, 2), protocol_version=PROTOCOL_VERSION + 1),
    OpenSession(session_id="s", start=0, end=1, max_length=4, protocol_version=0),
], ids=lambda m: type(m).__name__)
def test_wrong_protocol_version(msg):
    with pytest.raises(ProtocolVersionError, match=f"swarm protocol v{msg.protocol_version}"):
        read_bytes(to_bytes(msg))


def test_protocol_version_error_is_not_a_bad_request():
    # callers treat the two differently: a version mismatch says "upgrade", not "your request is wrong"
    assert not issubclass(ProtocolVersionError, BadRequest)


# ---------------------------------------------------------------- closed streams


def test_empty_stream_is_eof():
    with pytest.raises(EOFError):
        read_bytes(b"")


@pytest.mark.parametrize("cut", [1, 3, 4, 10])
def test_truncated_stream_is_eof(cut):
    data = to_bytes(ForwardResponse(hidden=torch.zeros(2, 3)))
    assert cut < len(data)
    with pytest.raises(EOFError):
        read_bytes(data[:cut])


def test_truncated_tensor_data_is_eof():
    data = to_bytes(ForwardResponse(hidden=torch.zeros(2, 3)))
    with pytest.raises(EOFError):
        read_bytes(data[:-1])


def test_eof_after_a_complete_message():
    data = to_bytes(SessionOpened(session_id="x", cache_tokens_left=1))

    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        first = await read_message(reader)
        with pytest.raises(EOFError):
            await read_message(reader)
        return first

    assert asyncio.run(run()) == SessionOpened(session_id="x", cache_tokens_left=1)


# ---------------------------------------------------------------- errors across the wire

ERROR_CLASSES = [
    errors.SwarmError,
    errors.RetryableError,
    errors.ServerUnavailable,
    errors.ServerUnreachable,
    errors.ServerError,
    errors.ServerRefused,
    errors.WrongResult,
    errors.ServerBusy,
    errors.FatalError,
    errors.BadRequest,
    errors.UnknownSession,
    errors.SessionLengthExceeded,
    errors.MissingBlocksError,
    errors.AccessDenied,
    errors.ProtocolVersionError,
    errors.ModelError,
    errors.ConfigError,
    errors.RetriesExhausted,
]


def test_error_list_covers_the_whole_tree():
    found = {obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, SwarmError)}
    assert found == set(ERROR_CLASSES)
    assert len({cls.code for cls in ERROR_CLASSES}) == len(ERROR_CLASSES)  # codes are unique


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_error_to_wire_from_wire(cls):
    code, message = to_wire(cls("something went wrong"))
    assert code == cls.code and message == "something went wrong"
    error = from_wire(code, message)
    assert type(error) is cls and str(error) == "something went wrong"


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_error_reply_round_trips_to_same_class(cls):
    code, message = to_wire(cls("details"))
    reply = read_bytes(to_bytes(ErrorReply(code=code, message=message)))
    error = reply.to_exception()
    assert type(error) is cls and str(error) == "details"
    with pytest.raises(cls, match="details") as info:
        expect(reply, SessionOpened)
    assert type(info.value) is cls


def test_foreign_errors_and_unknown_codes_become_swarm_error():
    code, message = to_wire(ValueError("bad value"))
    assert code == "swarm_error" and message == "ValueError: bad value"
    error = from_wire("some_future_code", "new kind of failure")
    assert type(error) is SwarmError and str(error) == "new kind of failure"


def test_expect():
    opened = SessionOpened(session_id="s", cache_tokens_left=1)
    assert expect(opened, SessionOpened) is opened
    with pytest.raises(BadRequest, match="expected StepOutput, got SessionOpened"):
        expect(opened, StepOutput)
    with pytest.raises(errors.UnknownSession, match="no session 's'"):
        expect(ErrorReply(code="unknown_session", message="no session 's'"), StepOutput)


def test_protocol_version_is_checked_before_the_fields():
    # a future version may drop or retype fields: the reader must say "version", not "bad field"
    header = msgpack.packb({"type": "OpenSession", "fields": {"protocol_version": PROTOCOL_VERSION + 1,
                                                                "session_id": 5}, "sizes": []})

    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack("<I", len(header)) + header)
        reader.feed_eof()
        return await read_message(reader)

    with pytest.raises(ProtocolVersionError):
        asyncio.run(read())
