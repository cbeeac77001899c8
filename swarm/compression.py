"""Activation compression on slow links: which scheme a link uses, and the 8-bit codec.

Hidden states cross the wire as float32 by default (exact). On a slow link a step's states take
``bytes / bandwidth`` seconds to cross, per token, at every hop; halving or quartering the bytes
cuts that, at a stated cost in precision:

========== ======= ===========================================================================
scheme     bytes   error it adds, per element
========== ======= ===========================================================================
none       4       none (float32 as computed)
float16    2       relative error <= 2**-11 (4.9e-4) for |x| in [6.1e-5, 65504]; |x| > 65504 is
                   sent as bfloat16 instead (the whole tensor), smaller |x| lose relative precision
bfloat16   2       relative error <= 2**-8 (3.9e-3), any range
int8       1 + 4/h absolute error <= max|row| / 254 for each row of h values (per-row absmax scale)
========== ======= ===========================================================================

Who chooses: the client, per link of its chain, by :func:`choose`: a link whose measured bandwidth
would take at least :data:`SLOW_LINK_S` to carry one step's float32 states gets the lightest scheme
the client's ``compression`` setting allows (``auto``: 16-bit at most; ``int8``: 8-bit at most;
``none``: never). Fast links, loopback included, stay exact. The schemes travel with each step
(``InferenceStep.compression``), one per link, so every server compresses its own output for the
next link as the client chose.
"""

from __future__ import annotations

import torch

from swarm.errors import BadRequest

SCHEMES = ("none", "float16", "bfloat16", "int8")
POLICIES = ("none", "auto", "float16", "bfloat16", "int8")  # ClientConfig.compression
SLOW_LINK_S = 0.002  # seconds one step's float32 states may take on a link before it is compressed
FLOAT16_MAX = 65504.0
_BYTES = {"none": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.0}


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise BadRequest(f"compression scheme {scheme[:40]!r} is not one of {list(SCHEMES)}")
    return scheme


def choose(policy: str, nbytes: int, bandwidth: float | None) -> str:
    """The scheme for one link: ``nbytes`` of states per step over ``bandwidth`` bytes/s (None: not
    measured, or too fast to measure, which counts as fast).

    ``policy``: ``none`` never compresses; ``auto`` uses float16 on a slow link; ``float16``/``bfloat16``
    use that scheme on a slow link; ``int8`` uses float16 on a slow link and int8 where even float16's
    bytes would still be slow.
    """
    if policy not in POLICIES:
        raise BadRequest(f"compression {policy!r} is not one of {list(POLICIES)}")
    if policy == "none" or not bandwidth or nbytes / bandwidth < SLOW_LINK_S:
        return "none"
    if policy == "auto":
        return "float16"
    if policy == "int8" and nbytes / 2 / bandwidth < SLOW_LINK_S:
        return "float16"
    return policy


def wire_bytes(scheme: str, numel: int, row: int) -> int:
    """Bytes ``numel`` float32 values in rows of ``row`` take on the wire under ``scheme``."""
    if scheme == "int8":
        return numel + 4 * (numel // max(row, 1))
    return int(_BYTES[scheme] * numel)


def cast(tensor: torch.Tensor, scheme: str) -> torch.Tensor:
    """``tensor`` in the dtype ``scheme`` sends it in (``int8`` is encoded by :func:`quantize`)."""
    if scheme in ("none", "int8") or not tensor.is_floating_point():
        return tensor
    if scheme == "float16" and tensor.numel() and float(tensor.abs().max()) > FLOAT16_MAX:
        scheme = "bfloat16"  # float16 would overflow to inf
    dtype = torch.float16 if scheme == "float16" else torch.bfloat16
    return tensor if tensor.dtype.itemsize <= 2 else tensor.to(dtype)


def quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., h]`` float -> (int8 values ``[..., h]``, float32 scales ``[...]``): each row by its absmax."""
    values = tensor.float()
    scales = values.abs().amax(dim=-1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(values / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scales.unsqueeze(-1)).to(dtype)


def roundtrip(tensor: torch.Tensor, scheme: str) -> torch.Tensor:
    """What the receiver of ``tensor`` sent under ``scheme`` gets (in ``tensor``'s dtype)."""
    if scheme == "int8" and tensor.is_floating_point() and tensor.ndim > 0:
        return dequantize(*quantize(tensor), tensor.dtype)
    return cast(tensor, scheme).to(tensor.dtype)
