"""Weight formats of quantized blocks: int8 and NF4 tensors, to and from float, in pure torch.

- int8: symmetric per-output-channel; ``w ~= q * scale[out]``, ``q`` in -127..127, scale float32.
- NF4: QLoRA's 4-bit NormalFloat levels (:data:`NF4_CODE`); the flattened weight is cut into groups
  of :data:`NF4_GROUP` weights (zero-padded at the end, so any shape works), each group scaled by its
  absmax (float32), each weight stored as the index of the nearest level, two per byte (high nibble
  first).

Dequantizing can fill caller-given buffers (:func:`scratch`): a matmul dequantizes a whole weight,
and on a CPU a fresh buffer that large costs more in page faults than the dequantization itself
(measured: an NF4 4096x11008 weight took 5-7x longer with fresh buffers).
"""

from __future__ import annotations

import functools
import math
import threading

import torch
import torch.nn.functional as F

from swarm.errors import ModelError

NF4_GROUP = 64
# QLoRA's NormalFloat4 (Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0
# (8 positive levels, 7 negative, and 0); ``nf4_code()`` rebuilds it from its definition
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
_CHUNK = 1 << 20  # weights quantized at a time: bounds the temporaries (int64 codes) to a few MiB
_WIDE = {2: torch.int32, 4: torch.int64}  # a pair of levels of this element size, read as one integer


def nf4_code() -> torch.Tensor:
    """NF4's 16 levels from their definition: ``Phi^-1`` at evenly spaced probabilities from
    ``delta = (1/32 + 1/30) / 2`` to 1/2 (8 positive, 7 negative) and 0, normalized by the largest."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    delta = 0.5 * (1 / 32 + 1 / 30)
    positive = normal.icdf(torch.linspace(1 - delta, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(1 - delta, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return levels / levels.abs().max()


_SCRATCH = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable 1-D buffer of ``numel`` elements, one per (thread, name, dtype, device), grown as needed.

    Its contents are overwritten by the next call with the same name on this thread: use it at once.
    """
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(key, None)  # free the smaller one before allocating
        with torch.inference_mode(False):  # a normal tensor: backward passes (outside inference mode) write it too
            buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def _finite_absmax(weight: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    absmax = weight.abs().amax(dim=dim).float()
    if not torch.isfinite(absmax).all():
        raise ModelError(f"{what} has non-finite weights (inf or nan); the checkpoint is broken, cannot quantize it")
    return absmax


# ---------------------------------------------------------------- int8


def quantize_int8(weight: torch.Tensor, what: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] -> (``q`` int8 [out, in], ``scale`` float32 [out]) with ``weight ~= q * scale``;
    the error per weight is at most ``scale / 2`` (half a step of its row)."""
    rows = max(1, _CHUNK // max(weight.shape[1], 1))
    absmax = torch.cat([_finite_absmax(weight[r:r + rows], 1, what) for r in range(0, weight.shape[0], rows)])
    scale = (absmax / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for r in range(0, weight.shape[0], rows):
        chunk = weight[r:r + rows].float() / scale[r:r + rows, None]
        q[r:r + rows] = chunk.round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``q * scale[:, None]`` in ``dtype`` [out, in], written into ``out`` (1-D, >= q.numel()) if given."""
    weight = torch.empty(q.shape, dtype=dtype, device=q.device) if out is None else out[:q.numel()].view(q.shape)
    return weight.copy_(q).mul_(scale.to(dtype)[:, None])


# ---------------------------------------------------------------- NF4


def nf4_padded(numel: int, group: int = NF4_GROUP) -> int:
    """How many weights an NF4 tensor of ``numel`` weights stores: whole groups."""
    return max(1, math.ceil(numel / group)) * group


def quantize_nf4(weight: torch.Tensor, what: str = "weight",
                 group: int = NF4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (any shape) -> (``packed`` uint8 [padded / 2], ``absmax`` float32 [padded / group])."""
    if group <= 0 or group % 2:
        raise ValueError(f"the NF4 group must be a positive even number, got {group}")
    flat = weight.reshape(-1)
    groups = nf4_padded(flat.numel(), group) // group
    absmax = torch.empty(groups, dtype=torch.float32, device=weight.device)
    packed = torch.empty(groups * group // 2, dtype=torch.uint8, device=weight.device)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=weight.device)
    midpoints = (code[1:] + code[:-1]) / 2
    per_chunk = max(1, _CHUNK // group)
    for g in range(0, groups, per_chunk):
        g_end = min(groups, g + per_chunk)
        chunk = flat[g * group:g_end * group].float()
        if chunk.numel() < (g_end - g) * group:  # the last group: pad with zeros
            chunk = F.pad(chunk, (0, (g_end - g) * group - chunk.numel()))
        chunk = chunk.view(g_end - g, group)
        absmax[g:g_end] = _finite_absmax(chunk, 1, what)
        normalized = chunk / absmax[g:g_end, None].clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.bucketize(normalized, midpoints).to(torch.uint8).view(-1)
        packed[g * group // 2:g_end * group // 2] = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


@functools.lru_cache(maxsize=32)
def _nf4_pairs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 2]: the two NF4 levels each packed byte holds (high nibble, low nibble)."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).to(device, dtype).contiguous()


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...],
                   dtype: torch.dtype, out: torch.Tensor | None = None,
                   index: torch.Tensor | None = None) -> torch.Tensor:
    """The ``shape`` tensor :func:`quantize_nf4` encoded, in ``dtype``. ``out`` (1-D, >= 2 * packed.numel()
    elements of ``dtype``) and ``index`` (1-D int32, >= packed.numel()) are buffers to use instead of
    allocating; the result is a view of ``out``."""
    padded = 2 * packed.numel()
    values = torch.empty(padded, dtype=dtype, device=packed.device) if out is None else out[:padded]
    indices = torch.empty(packed.numel(), dtype=torch.int32, device=packed.device) if index is None \
        else index[:packed.numel()]
    indices.copy_(packed)
    pairs = _nf4_pairs(dtype, packed.device)
    wide = _WIDE.get(pairs.element_size())
    if wide is not None:  # one gather of a (high, low) pair per byte
        torch.index_select(pairs.view(wide).view(256), 0, indices, out=values.view(wide))
    else:
        torch.index_select(pairs, 0, indices, out=values.view(-1, 2))
    values.view(absmax.numel(), -1).mul_(absmax.to(dtype)[:, None])
    return values[:math.prod(shape)].view(shape)
