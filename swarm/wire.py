"""The Swarm wire protocol: typed messages and their framing on a libp2p stream.

One servicer, its stream handlers (names in :data:`HANDLERS`):

- ``info``: one :class:`InfoRequest` -> one :class:`InfoResponse`
- ``forward``: one :class:`ForwardRequest` -> one :class:`ForwardResponse` (no-grad, any length)
- ``backward``: one :class:`BackwardRequest` -> one :class:`BackwardResponse` (recomputes the forward)
- ``inference``: a session. :class:`OpenSession` -> :class:`SessionOpened`, then any number of
  :class:`InferenceStep` -> :class:`StepOutput` and :class:`FetchOutputs` -> :class:`SessionOutputs`.
  Closing the stream frees the session's cache.
- ``push``: server to server. :class:`InferenceStep` messages for sessions open on the receiving
  server, sent by the server before it in the chain; answers go to the session's own stream.
- ``steps``: a client's concurrent steps to one server in one frame. :class:`InferenceSteps` (steps
  of sessions the same peer opened there) -> :class:`StepOutputs` (each step's output or its own error).

Any request may be answered with :class:`ErrorReply` (code + message, see :mod:`swarm.errors`).
In a private swarm every stream opens with a :class:`KeyProof` (:mod:`swarm.swarm_key`) before its
first request; a server without a valid one answers :class:`~swarm.errors.AccessDenied`.

A frame is ``u32 header length | msgpack header | raw tensor buffers``. The header names the
message type, carries its fields, and describes each tensor (dtype, shape); tensor bytes follow
unencoded, so a tensor is serialized once per hop and large tensors stream without a size cap
of the transport. Header and buffer sizes are checked against limits before anything is read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from typing import Any

import msgpack
import torch

from swarm.codec import build_dataclass, buffer_to_tensor, dataclass_to_map, tensor_nbytes, tensor_to_buffer
from swarm.errors import BadRequest, ProtocolVersionError, SwarmError, from_wire, to_wire

PROTOCOL_VERSION = 1
HANDLERS = {
    "info": f"swarm.v{PROTOCOL_VERSION}.info",
    "forward": f"swarm.v{PROTOCOL_VERSION}.forward",
    "inference": f"swarm.v{PROTOCOL_VERSION}.inference",
    "push": f"swarm.v{PROTOCOL_VERSION}.push",
    "backward": f"swarm.v{PROTOCOL_VERSION}.backward",
    "steps": f"swarm.v{PROTOCOL_VERSION}.steps",
}
MAX_HEADER_BYTES = 1 << 20
MAX_PROBE_BYTES = 256 << 10  # a bandwidth probe's bytes each way (they ride in the header)
DEFAULT_MAX_MESSAGE_BYTES = 1 << 31  # 2 GiB of tensor data per message unless the server says less

_HEADER_LEN = struct.Struct("<I")
_JOIN_MAX_BYTES = 1 << 16
_MESSAGES: dict[str, type] = {}


def message(cls: type) -> type:
    """Registers a frozen dataclass as a wire message under its class name."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    _MESSAGES[cls.__name__] = cls
    return cls


@message
class InfoRequest:
    protocol_version: int = PROTOCOL_VERSION
    # a bandwidth probe: bytes sent along, and how many the reply should carry back (MAX_PROBE_BYTES at most)
    probe: bytes = b""
    probe_reply_bytes: int = 0


@message
class InfoResponse:
    protocol_version: int
    version: str
    model: str
    start: int
    end: int
    hidden_size: int
    dtype: str
    max_session_length: int
    max_batch_size: int
    cache_tokens_left: int
    public_name: str = ""
    num_blocks: int = 0  # blocks of the whole model: health checks the model index against it (0: not said)
    probe: bytes = b""  # InfoRequest.probe_reply_bytes zero bytes


@message
class KeyProof:
    """First frame of a stream in a private swarm: proof that the opener holds the swarm key."""

    proof: bytes  # swarm.swarm_key.stream_proof(key, opener peer id, server peer id, handler name)


# Fine-tuning fields, shared by ForwardRequest, BackwardRequest and OpenSession (see swarm.lora):
#   prompts       [blocks, batch or 1, prompt tokens, hidden]: deep prompt tuning, added to the first
#                 positions of the hidden states before each block of the request
#   lora_modules  "<block>.<module path>" of every adapted Linear; lora_a [rank, in] and lora_b
#                 [out, rank] give its weights, lora_scaling and lora_dropout how they apply
#   seed          the dropout seed: a backward request repeats its forward's masks
#   adapter       the name of an adapter the server preloaded (--adapters), instead of sent weights
#
# Padded batches, on ForwardRequest, BackwardRequest and InferenceStep (both optional; absent means
# no padding and positions counted from the first token):
#   attention_mask  [batch, seq] int: 1 for a token, 0 for padding, which no later token attends to
#                   (in a session: of the step's new tokens; the server keeps the earlier ones)
#   position_ids    [batch, seq] int64: each token's position (the rotary embedding's input)


@message
class ForwardRequest:
    start: int  # global index of the first block to run
    end: int
    hidden: torch.Tensor  # [batch, seq, hidden]
    prompts: torch.Tensor | None = None
    lora_modules: tuple[str, ...] = ()
    lora_a: tuple[torch.Tensor, ...] = ()
    lora_b: tuple[torch.Tensor, ...] = ()
    lora_scaling: float = 0.0
    lora_dropout: float = 0.0
    seed: int = 0
    adapter: str = ""
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    protocol_version: int = PROTOCOL_VERSION


@message
class ForwardResponse:
    hidden: torch.Tensor  # [batch, seq, hidden]


@message
class BackwardRequest:
    """Gradients of blocks ``start:end`` at ``hidden``: the server recomputes the forward, with grad."""

    start: int
    end: int
    hidden: torch.Tensor  # [batch, seq, hidden]: the inputs the forward had
    grad_output: torch.Tensor  # [batch, seq, hidden]: d loss / d outputs
    prompts: torch.Tensor | None = None
    lora_modules: tuple[str, ...] = ()
    lora_a: tuple[torch.Tensor, ...] = ()
    lora_b: tuple[torch.Tensor, ...] = ()
    lora_scaling: float = 0.0
    lora_dropout: float = 0.0
    seed: int = 0
    adapter: str = ""
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    protocol_version: int = PROTOCOL_VERSION


@message
class BackwardResponse:
    grad_input: torch.Tensor  # [batch, seq, hidden]
    grad_prompts: torch.Tensor | None = None  # the shape of the request's prompts
    grad_lora_a: tuple[torch.Tensor, ...] = ()  # in the order of the request's lora_modules
    grad_lora_b: tuple[torch.Tensor, ...] = ()


@message
class OpenSession:
    session_id: str
    start: int
    end: int
    max_length: int  # the most tokens this session will ever hold
    batch_size: int = 1
    lora_modules: tuple[str, ...] = ()  # an adapter the client sends, applied to every step (no dropout)
    lora_a: tuple[torch.Tensor, ...] = ()
    lora_b: tuple[torch.Tensor, ...] = ()
    lora_scaling: float = 0.0
    adapter: str = ""  # or one the server preloaded
    prompts: torch.Tensor | None = None  # deep prompts, added wherever a step covers positions below their length
    protocol_version: int = PROTOCOL_VERSION
    push_key: bytes = b""  # the secret of this session's push tokens (swarm.push_tokens); empty: no pushes
    # False: a step this server pushes on is acknowledged without its output (StepOutput.hidden None), and the
    # server keeps the session's outputs for the client to fetch if the next server fails (FetchOutputs)
    echo: bool = True


@message
class SessionOpened:
    session_id: str
    cache_tokens_left: int


@message
class InferenceStep:
    session_id: str
    hidden: torch.Tensor  # [batch, new_tokens, hidden]
    start_position: int  # position of hidden[:, 0]; < the cached length rolls the cache back to it
    hypo_ids: torch.Tensor | None = None  # [batch] int64: reorder cached hypotheses first (beam search)
    step_id: int = 0  # the client's step counter; a server answers each step id > 0 once
    # (peer id, session id, push token) of the spans after this one: push the output straight to the first;
    # each token lets the server before that span push this step into it (swarm.push_tokens)
    next_servers: tuple[tuple[str, str, bytes], ...] = ()
    attention_mask: torch.Tensor | None = None  # [batch, new_tokens]: see "Padded batches" above
    position_ids: torch.Tensor | None = None  # [batch, new_tokens]
    push_token: bytes = b""  # in a pushed step: the token the client gave for it
    # how this server sends its output on (swarm.compression schemes): [0] for the link to the next server
    # (or back to the client), [1] for the next server's output, ...; a push passes on compression[1:]
    compression: tuple[str, ...] = ()


@message
class StepOutput:
    hidden: torch.Tensor | None  # [batch, new_tokens, hidden]; None: pushed on, in a session opened with echo=False
    position: int  # tokens the session holds after this step
    step_id: int = 0
    pushed: bool = False  # the output also went to the next server, which will answer the step itself


@message
class InferenceSteps:
    """One step each of several sessions the sending peer opened on this server (on their inference streams),
    sent in one frame: plain steps only (no hypo_ids, padding or push); they run as if sent one by one."""

    session_ids: tuple[str, ...]
    hidden: tuple[torch.Tensor, ...]  # each step's [batch, new_tokens, hidden]
    start_positions: tuple[int, ...]
    step_ids: tuple[int, ...]


@message
class StepOutputs:
    """The answers to one :class:`InferenceSteps` (frames may be answered out of order; these name their steps):
    each step's output, or its own error."""

    session_ids: tuple[str, ...]
    step_ids: tuple[int, ...]
    hidden: tuple[torch.Tensor, ...]  # [batch, new_tokens, hidden]; empty (shape [0]) where the step failed
    positions: tuple[int, ...]  # tokens the session holds after the step
    error_codes: tuple[str, ...]  # "" where the step ran, else an ErrorReply code (swarm.errors)
    error_messages: tuple[str, ...]


@message
class FetchOutputs:
    """Asks a session opened with ``echo=False`` for its outputs of tokens ``start:end`` (for a failover replay)."""

    session_id: str
    start: int
    end: int


@message
class SessionOutputs:
    hidden: torch.Tensor  # [batch, end - start, hidden]: the outputs of FetchOutputs' tokens, as they were sent on
    start: int


@message
class ErrorReply:
    code: str
    message: str

    def to_exception(self) -> SwarmError:
        return from_wire(self.code, self.message)


@dataclasses.dataclass
class WireLimits:
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


def encode(msg: Any, compression: str = "none") -> list[bytes | memoryview]:
    """Returns the parts of one frame; write them in order. ``compression`` (a :mod:`swarm.compression`
    scheme) applies to the message's hidden states (its ``hidden`` field); the receiver decodes them
    without being told."""
    fields = dataclass_to_map(msg)
    buffers: list[memoryview] = []
    sizes: list[int] = []
    def add(tensor: torch.Tensor, scheme: str = "none") -> dict[str, Any]:
        meta, buf = tensor_to_buffer(tensor, scheme)
        meta["__tensor__"] = len(buffers)
        buffers.append(buf)
        sizes.append(buf.nbytes)
        return meta

    for key, value in fields.items():
        if isinstance(value, torch.Tensor):
            fields[key] = add(value, compression if key == "hidden" else "none")
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):  # tuple[Tensor, ...]
            fields[key] = [add(item) for item in value]
    header = msgpack.packb({"type": type(msg).__name__, "fields": fields, "sizes": sizes}, use_bin_type=True)
    return [_HEADER_LEN.pack(len(header)) + header, *buffers]


async def write_message(writer: asyncio.StreamWriter, msg: Any, compression: str = "none") -> None:
    # a frame goes out in one call (one syscall): written part by part, it leaves in several, and the
    # p2pd daemons on the way wake up and forward each piece separately
    parts = encode(msg, compression)
    if len(parts) == 1:
        writer.write(parts[0])
    elif sum(len(part) for part in parts) <= _JOIN_MAX_BYTES:
        writer.write(b"".join(parts))  # per-token steps: copying a few KB is cheaper than a writev
    else:
        writer.writelines(parts)  # large tensors: one writev on uvloop, no copy
    await writer.drain()


async def read_message(reader: asyncio.StreamReader, limits: WireLimits | None = None) -> Any:
    """Reads one frame; raises :class:`BadRequest` on a malformed one, EOFError on a closed stream."""
    limits = limits or WireLimits()
    try:
        (header_len,) = _HEADER_LEN.unpack(await reader.readexactly(_HEADER_LEN.size))
    except asyncio.IncompleteReadError as e:
        raise EOFError("the stream was closed") from e
    if header_len > MAX_HEADER_BYTES:
        raise BadRequest(f"message header is {header_len} bytes; the limit is {MAX_HEADER_BYTES}")
    try:
        header_bytes = await reader.readexactly(header_len)
    except asyncio.IncompleteReadError as e:
        raise EOFError("the stream was closed mid-message") from e
    try:
        header = msgpack.unpackb(header_bytes, raw=False, strict_map_key=False)
    except Exception as e:
        raise BadRequest(f"message header is not valid msgpack: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("fields"), dict):
        raise BadRequest("message header must be a map with 'type' and 'fields'")
    msg_type = header.get("type")
    cls = _MESSAGES.get(msg_type) if isinstance(msg_type, str) else None
    if cls is None:
        raise BadRequest(f"unknown message type {msg_type!r}; known: {sorted(_MESSAGES)}")
    sizes = header.get("sizes", [])
    if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
        raise BadRequest("message 'sizes' must be a list of non-negative ints")
    if sum(sizes) > limits.max_message_bytes:
        raise BadRequest(f"message carries {sum(sizes)} bytes of tensors; this peer accepts at most "
                         f"{limits.max_message_bytes}")
    fields = header["fields"]
    version = fields.get("protocol_version", PROTOCOL_VERSION)
    if "protocol_version" in getattr(cls, "__dataclass_fields__", {}) and version != PROTOCOL_VERSION:
        # checked before the fields: another version's message may not fit this version's classes
        raise ProtocolVersionError(f"peer speaks swarm protocol v{version}, this peer speaks "
                                   f"v{PROTOCOL_VERSION}; upgrade the older side (pip install -U swarm-llm)")
    tensor_metas: dict[str, Any] = {}  # field -> its tensor's meta, or a list of metas (tuple[Tensor, ...])
    for key, value in fields.items():
        if isinstance(value, dict) and "__tensor__" in value:
            tensor_metas[key] = value
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "__tensor__" in v for v in value):
            tensor_metas[key] = value
    for key, metas in tensor_metas.items():
        for meta in metas if isinstance(metas, list) else [metas]:
            index = meta["__tensor__"]
            if not isinstance(index, int) or not 0 <= index < len(sizes):
                raise BadRequest(f"field {key!r} refers to tensor buffer {index!r}, which the message lacks")
            if tensor_nbytes(meta) != sizes[index]:
                raise BadRequest(f"field {key!r}: dtype {meta['dtype']} and shape {meta['shape']} need "
                                 f"{tensor_nbytes(meta)} bytes, the message declares {sizes[index]}")
    buffers = []
    for size in sizes:
        try:
            buffers.append(bytearray(await reader.readexactly(size)) if size else bytearray())
        except asyncio.IncompleteReadError as e:
            raise EOFError("the stream was closed mid-message") from e
    for key, metas in tensor_metas.items():
        if isinstance(metas, list):
            fields[key] = [buffer_to_tensor(meta, buffers[meta["__tensor__"]]) for meta in metas]
        else:
            fields[key] = buffer_to_tensor(metas, buffers[metas["__tensor__"]])
    return build_dataclass(cls, fields)


async def write_error(writer: asyncio.StreamWriter, error: BaseException) -> None:
    code, text = to_wire(error)
    await write_message(writer, ErrorReply(code=code, message=text))


def expect(msg: Any, cls: type[Any]) -> Any:
    """Returns ``msg`` if it is a ``cls``; raises the peer's error if it is an :class:`ErrorReply`."""
    if isinstance(msg, ErrorReply):
        raise msg.to_exception()
    if not isinstance(msg, cls):
        raise BadRequest(f"expected {cls.__name__}, got {type(msg).__name__}")
    return msg


MESSAGE_TYPES = _MESSAGES
