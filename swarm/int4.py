"""4-bit weights kept packed: the linear layer that serves them, and the readers of GPTQ and AWQ tensors.

GPTQ and AWQ checkpoints store each linear layer's weight ``W`` [out, in] as 4-bit integers ``q``
with one scale ``s`` and one zero point ``z`` per group of ``group_size`` input features:

    W[o, i] = (q[o, i] - z[o, g(i)]) * s[o, g(i)]        g(i) = i // group_size, or g_idx[i] (GPTQ act-order)

They differ only in how ``q`` and ``z`` are packed into int32 words (below). :class:`Int4Linear`
holds one canonical form, whatever the source: ``q`` two per byte ([out, in / 2] uint8, low
nibble first), ``z`` one per byte, ``s`` in the checkpoint's dtype (~4.2 bits per weight with
groups of 128). It is a :class:`~swarm.quant.QuantizedLinear`: a matmul dequantizes the weight in
float32 into reusable per-thread buffers, casts it to the input's dtype and calls ``F.linear`` (plain
torch on every device, no CUDA-only kernel); LoRA and gradients work as through int8/nf4 layers.

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

import math

import torch

from swarm.errors import ModelError
from swarm.quant import QuantizedLinear
from swarm.quantizers import scratch

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


class Int4Linear(QuantizedLinear):
    """A linear layer whose weight stays 4-bit (see the module docstring); frozen, plain torch.

    A :class:`~swarm.quant.QuantizedLinear` (an ``nn.Linear``): LoRA (Swarm's and peft's) targets it and
    gradients flow to its inputs, as through int8/nf4 layers. ``weight`` holds the packed integers
    ([out, in / 2] uint8, low nibble first), ``zeros`` [out, groups] uint8, ``scales`` [out, groups] in
    the checkpoint's dtype, ``g_idx`` [in] int32 or None (contiguous groups).
    """

    scheme = "int4"

    def __init__(self, q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g_idx: torch.Tensor | None,
                 bias: torch.Tensor | None):
        out_features, in_features = q.shape
        groups = s.shape[1]
        _check(in_features % 2 == 0, f"in_features {in_features} is odd")
        _check(z.shape == s.shape == (out_features, groups), f"zeros {list(z.shape)} / scales {list(s.shape)} vs "
                                                             f"[{out_features}, {groups}]")
        _check(g_idx is not None or in_features % groups == 0, f"{in_features} features in {groups} groups")
        _check(bool(q.max() <= 15) and bool(z.max() <= 16), "4-bit values out of range")
        super().__init__(in_features, out_features, bias)
        self.register_buffer("weight", pack_nibbles(q))  # [out, in / 2] uint8
        self.register_buffer("zeros", z.to(torch.uint8))  # [out, groups]
        self.register_buffer("scales", s)  # [out, groups], the checkpoint's dtype
        self.register_buffer("g_idx", g_idx)  # [in] or None: groups are contiguous

    def dequantized(self, dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
        """The weight [out, in] in ``dtype``: ``(q - z) * s`` in float32, then cast. ``reuse``: computed in
        this thread's scratch buffers (:func:`~swarm.quantizers.scratch`; sizes in :func:`int4_scratch_bytes`)."""
        out_features, in_features = self.out_features, self.in_features
        numel, device = out_features * in_features, self.weight.device

        def buffer(name: str, size: int, buffer_dtype: torch.dtype) -> torch.Tensor:
            if reuse:
                return scratch(name, size, buffer_dtype, device)
            return torch.empty(size, dtype=buffer_dtype, device=device)

        w = buffer("int4 float32", numel, torch.float32).view(out_features, in_features)
        nibbles = buffer("int4 nibbles", numel // 2, torch.uint8).view(self.weight.shape)
        pairs = w.view(out_features, in_features // 2, 2)  # value 2j in the low nibble of byte j
        pairs[..., 0].copy_(torch.bitwise_and(self.weight, 0xF, out=nibbles))
        pairs[..., 1].copy_(torch.bitwise_right_shift(self.weight, 4, out=nibbles))
        z, s = self.zeros.float(), self.scales.float()  # [out, groups]
        if self.g_idx is None:
            grouped = w.view(out_features, s.shape[1], -1)
            grouped.sub_(z.unsqueeze(-1)).mul_(s.unsqueeze(-1))
        else:  # act-order: feature i belongs to group g_idx[i]
            per_feature = buffer("int4 groups", numel, torch.float32).view(out_features, in_features)
            g = self.g_idx.long()
            w.sub_(torch.index_select(z, 1, g, out=per_feature))
            w.mul_(torch.index_select(s, 1, g, out=per_feature))
        if dtype == torch.float32:
            return w
        return buffer("weight", numel, dtype).view(out_features, in_features).copy_(w)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"groups={self.scales.shape[1]}, act_order={self.g_idx is not None}")


def int4_stored_bytes(in_features: int, out_features: int, group_size: int, *, act_order: bool = False,
                      scale_bytes: int = 2) -> int:
    """Bytes an :class:`Int4Linear` [out, in] stores (bias not included): the packed integers, a zero point
    and a scale (``scale_bytes``: float16 in GPTQ/AWQ files) per group, and ``g_idx`` with act-order."""
    groups = 1 if group_size <= 0 else math.ceil(in_features / group_size)
    return out_features * in_features // 2 + out_features * groups * (1 + scale_bytes) + 4 * in_features * act_order


def int4_scratch_bytes(in_features: int, out_features: int, dtype: torch.dtype, *, act_order: bool = False) -> int:
    """Bytes of the scratch buffers :meth:`Int4Linear.dequantized` fills for an [out, in] layer in ``dtype``:
    the float32 weight, the unpacked nibbles, a float32 per-feature zero/scale with act-order, and the
    weight in ``dtype`` unless that is float32."""
    numel = in_features * out_features
    cast = 0 if dtype == torch.float32 else numel * torch.empty((), dtype=dtype).element_size()
    return 4 * numel + numel // 2 + 4 * numel * act_order + cast
