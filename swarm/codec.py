"""Typed dataclasses <-> plain msgpack-able maps, and tensors <-> raw buffers.

Used by :mod:`swarm.records` (DHT values) and :mod:`swarm.wire` (RPC messages), so that every
record and message is checked the same way: required fields must be present, every field must
have its declared type, unknown fields are ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, TypeVar

import torch

from swarm.compression import cast, dequantize, quantize, wire_bytes
from swarm.errors import BadRequest

T = TypeVar("T")

# dtypes allowed on the wire; anything else is rejected before it reaches a model
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in WIRE_DTYPES.items()}

_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def dataclass_to_map(obj: Any) -> dict[str, Any]:
    """Shallow conversion: enums to values, tuples to lists; tensors are left for the caller."""
    out = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def build_dataclass(cls: type[T], raw: dict) -> T:
    """Builds ``cls`` from a decoded map; raises :class:`BadRequest` naming the bad field."""
    hints = _HINTS_CACHE.get(cls)
    if hints is None:
        hints = _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in raw:
            no_default = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            if no_default:
                raise BadRequest(f"{cls.__name__} lacks the required field {field.name!r}")
            continue
        kwargs[field.name] = _coerce(cls.__name__, field.name, hints[field.name], raw[field.name])
    try:
        return cls(**kwargs)
    except BadRequest:
        raise
    except (TypeError, ValueError) as e:
        raise BadRequest(f"{cls.__name__} is invalid: {e}") from None


def _coerce(owner: str, name: str, hint: Any, value: Any) -> Any:
    """Checks ``value`` against a simple type hint and converts msgpack lists back to tuples."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise BadRequest(f"{owner}.{name} = {value!r} is not one of {[m.value for m in hint]}") from None
    if hint is torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint in (int, str, bool, bytes):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
    elif origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(owner, name, args[0], item) for item in value)
            if len(args) == len(value):
                return tuple(_coerce(owner, name, a, item) for a, item in zip(args, value))
    elif origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if isinstance(value, dict):
            return {
                _coerce(owner, name, key_hint, k): _coerce(owner, name, value_hint, v) for k, v in value.items()
            }
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(owner, name, option, value)
            except BadRequest:
                continue
    shown = f"{type(value).__name__} {value!r}"[:100]
    raise BadRequest(f"{owner}.{name} must be {getattr(hint, '__name__', hint)}, got {shown}")


def tensor_to_buffer(tensor: torch.Tensor, compression: str = "none") -> tuple[dict[str, Any], memoryview]:
    """Returns ``(meta, raw bytes)`` for a CPU or accelerator tensor, as it is or (a floating tensor) under
    a :mod:`swarm.compression` scheme: 16-bit schemes send a 16-bit tensor, ``int8`` sends per-row
    float32 scales then int8 values, and the meta says ``"codec": "int8"``."""
    if tensor.dtype not in DTYPE_NAMES:
        raise BadRequest(f"dtype {tensor.dtype} cannot cross the wire; use one of {sorted(WIRE_DTYPES)}")
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if compression != "none" and tensor.is_floating_point():
        if compression == "int8" and tensor.ndim > 0:
            q, scales = quantize(tensor)
            meta = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "codec": "int8"}
            data = torch.cat([scales.reshape(-1).view(torch.uint8), q.reshape(-1).view(torch.uint8)])
            return meta, memoryview(data.numpy()).cast("B")
        tensor = cast(tensor, compression)
    tensor = tensor.contiguous()
    meta = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)}
    flat = tensor.reshape(-1).view(torch.uint8)
    return meta, memoryview(flat.numpy()).cast("B")


def tensor_nbytes(meta: dict[str, Any]) -> int:
    """Validates tensor metadata from a peer and returns the number of bytes its data must have."""
    name = meta.get("dtype") if isinstance(meta, dict) else None
    dtype = WIRE_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise BadRequest(f"tensor dtype {meta.get('dtype') if isinstance(meta, dict) else meta!r} is not one of "
                         f"{sorted(WIRE_DTYPES)}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**31 for d in shape):
        raise BadRequest(f"tensor shape must be a list of non-negative ints, got {shape!r}")
    if len(shape) > 8:
        raise BadRequest(f"tensor has {len(shape)} dimensions; at most 8 are accepted")
    numel = 1
    for d in shape:
        numel *= d
    codec = meta.get("codec")
    if codec is None:
        return numel * dtype.itemsize
    if codec != "int8" or not dtype.is_floating_point or not shape:
        raise BadRequest(f"tensor codec {str(codec)[:20]!r} is not 'int8' of a floating tensor of >= 1 dimensions")
    rows = numel // shape[-1] if shape[-1] else numel
    return wire_bytes("int8", numel, shape[-1]) if shape[-1] else 4 * rows


def buffer_to_tensor(meta: dict[str, Any], data: bytearray) -> torch.Tensor:
    """Inverse of :func:`tensor_to_buffer`; ``data`` must be writable and already size-checked."""
    dtype = WIRE_DTYPES[meta["dtype"]]
    if len(data) == 0 or (meta.get("codec") == "int8" and 0 in meta["shape"]):
        return torch.empty(meta["shape"], dtype=dtype)
    if meta.get("codec") == "int8":
        shape = meta["shape"]
        raw = torch.frombuffer(data, dtype=torch.uint8)
        rows = math.prod(shape[:-1])
        scales = raw[:4 * rows].view(torch.float32).reshape(shape[:-1])
        return dequantize(raw[4 * rows:].view(torch.int8).reshape(shape), scales, dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(meta["shape"])
