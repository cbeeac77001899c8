"""4-bit weights kept packed: the linear layer that serves them, and the readers of GPTQ and AWQ tensors.

GPTQ and AWQ checkpoints store each linear layer's weight ``W`` [out, in] as 4-bit integers ``q``
with one scale ``s`` and one zero point ``z`` per group of ``group_size`` input features:

    W[o, i] = (q[o, i] - z[o, g(i)]) * s[o, g(i)]        g(i) = i // group_size, or g_idx[i] (GPTQ act-order)

They differ only in how ``q`` and ``z`` are packed into int32 words (below). :class:`Int4Linear`
holds one canonical form, whatever the source: ``q`` two per byte ([out, in / 2] uint8, low
nibble first), ``z`` one per byte, ``s`` in the checkpoint's dtype (~4.2 bits per weight with
groups of 128). Its forward dequantizes the weight in float32, casts it to the input's dtype and
calls ``F.linear``: plain torch on every device, no CUDA-only kernel.

Packing, as the formats define it (a word's value ``k`` sits at bits ``4k .. 4k+3``):

- GPTQ (AutoGPTQ/GPTQModel ``checkpoint_format: gptq``): ``qweight`` int32 [in / 8, out], word
  ``[r, o]`` holds ``q[o, 8r + k]``; ``qzeros`` int32 [groups, out / 8], word ``[g, c]`` holds
  ``z[8c + k, g] - 1`` (the format's historical offset; ``gptq_v2`` stores ``z`` itself);
  ``scales`` [groups, out]; ``g_idx`` int32 [in].
- AWQ (AutoAWQ ``version: gemm``): ``qweight`` int32 [in, out / 8], word ``[i, c]`` holds
  ``q[8c + ORDER[k], i]`` with ``ORDER = 0, 2, 4, 6, 1, 3, 5, 7``; ``qzeros`` int32 [groups, out / 8]
  packed the same way; ``scales`` [groups, out].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swarm.errors import ModelError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output column each nibble of an AWQ word holds, per nibble


def unpack_int32(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words holding eight 4-bit values each -> those values (uint8), eight times longer along ``dim``;
    value ``k`` of a word (bits ``4k .. 4k+3``) lands at position ``8 * word + k``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    values = (words.unsqueeze(-1) >> shifts) & 0xF  # [..., 8]: nibbles of each word along the last axis
    values = values.to(torch.uint8)
    if dim in (-1, words.ndim - 1):
        return values.reshape(*words.shape[:-1], words.shape[-1] * 8)
    moved = values.movedim(-1, dim + 1)  # [..., words along dim, 8, ...]
    shape = list(words.shape)
    shape[dim] *= 8
    return moved.reshape(shape)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 -> [out, in / 2] uint8, value ``2j`` in the low nibble of byte ``j``."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: [out, in / 2] uint8 -> [out, in] uint8."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise ModelError(f"malformed 4-bit layer: {what}")


def gptq_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                 *, zero_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ's tensors -> (q [out, in], z [out, groups], s [out, groups], g_idx or None if groups are contiguous).

    ``zero_offset`` is 1 for ``checkpoint_format: gptq`` (stored zeros are ``z - 1``), 0 for ``gptq_v2``.
    """
    _check(qweight.dtype == torch.int32 and qzeros.dtype == torch.int32, "qweight/qzeros must be int32")
    groups, out = scales.shape
    _check(qweight.ndim == 2 and qweight.shape[1] == out, f"qweight {list(qweight.shape)} vs scales {[groups, out]}")
    _check(list(qzeros.shape) == [groups, out // 8], f"qzeros {list(qzeros.shape)}, expected {[groups, out // 8]}")
    q = unpack_int32(qweight, dim=0).T.contiguous()  # [out, in]
    z = (unpack_int32(qzeros, dim=1).to(torch.int16) + zero_offset).T.contiguous()  # [out, groups], 0..16
    in_features = q.shape[1]
    if g_idx is not None:
        _check(g_idx.shape == (in_features,), f"g_idx has shape {list(g_idx.shape)}, expected [{in_features}]")
        g_idx = g_idx.to(torch.int32)
        _check(bool((g_idx >= 0).all() and (g_idx < groups).all()), "g_idx names groups that do not exist")
        if torch.equal(g_idx, contiguous_groups(in_features, groups)):
            g_idx = None
    return q, z.to(torch.uint8), scales.T.contiguous(), g_idx


def awq_tensors(qweight: torch.Tensor, qzeros: torch.Tensor,
                scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ (GEMM) tensors -> (q [out, in], z [out, groups], s [out, groups])."""
    _check(qweight.dtype == torch.int32 and qzeros.dtype == torch.int32, "qweight/qzeros must be int32")
    groups, out = scales.shape
    _check(qweight.ndim == 2 and qweight.shape[1] * 8 == out, f"qweight {list(qweight.shape)} vs scales "
                                                             f"{[groups, out]}")
    _check(list(qzeros.shape) == [groups, out // 8], f"qzeros {list(qzeros.shape)}, expected {[groups, out // 8]}")
    # nibble k of word c holds column 8c + ORDER[k]: put each nibble back at its column
    inverse = torch.tensor([AWQ_ORDER.index(c) for c in range(8)])
    columns = (torch.arange(out) // 8) * 8 + inverse.repeat(out // 8)  # source position of each column

    def unpack(words: torch.Tensor) -> torch.Tensor:
        return unpack_int32(words, dim=1)[:, columns]

    return unpack(qweight).T.contiguous(), unpack(qzeros).T.contiguous(), scales.T.contiguous()


def contiguous_groups(in_features: int, groups: int) -> torch.Tensor:
    """``g(i) = i // group_size`` for every input feature."""
    return torch.arange(in_features, dtype=torch.int32) // (in_features // groups)


class Int4Linear(torch.nn.Module):
    """A linear layer whose weight stays 4-bit (see the module docstring); frozen, plain torch."""

    def __init__(self, q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g_idx: torch.Tensor | None,
                 bias: torch.Tensor | None):
        super().__init__()
        out_features, in_features = q.shape
        groups = s.shape[1]
        _check(in_features % 2 == 0, f"in_features {in_features} is odd")
        _check(z.shape == s.shape == (out_features, groups), f"zeros {list(z.shape)} / scales {list(s.shape)} vs "
                                                             f"[{out_features}, {groups}]")
        _check(g_idx is not None or in_features % groups == 0, f"{in_features} features in {groups} groups")
        _check(bool(q.max() <= 15) and bool(z.max() <= 16), "4-bit values out of range")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", pack_nibbles(q))  # [out, in / 2] uint8
        self.register_buffer("zeros", z.to(torch.uint8))  # [out, groups]
        self.register_buffer("scales", s)  # [out, groups], the checkpoint's dtype
        self.register_buffer("g_idx", g_idx)  # [in] or None: groups are contiguous
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in ``dtype``: ``(q - z) * s`` in float32, then cast."""
        q = unpack_nibbles(self.qweight).float()
        z, s = self.zeros.float(), self.scales.float()
        if self.g_idx is None:
            groups = s.shape[1]
            q = q.view(self.out_features, groups, -1)
            w = (q - z.unsqueeze(-1)) * s.unsqueeze(-1)
        else:
            g = self.g_idx.long()
            w = (q - z[:, g]) * s[:, g]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"groups={self.scales.shape[1]}, act_order={self.g_idx is not None}")
