"""Quantized blocks: a transform that stores a block's ``Linear`` weights in 8 or 4 bits.

:func:`quantize_block` replaces every plain ``torch.nn.Linear`` of a loaded block by a frozen
:class:`QuantizedLinear` and frees the float weight; nothing else changes, so the block runtime
(:mod:`swarm.blocks`), LoRA hooks (:mod:`swarm.lora`) and the RPC handler run a quantized block
exactly like a float one. Schemes (:data:`SCHEMES`):

- ``int8``: symmetric per-output-channel int8 (``w ~= q * scale[out]``, ``q`` in -127..127);
  ~1 byte per weight.
- ``nf4``: QLoRA's 4-bit NormalFloat code (:data:`NF4_CODE`) with one absmax scale per
  :data:`NF4_GROUP` weights of the flattened matrix, two codes packed per byte; ~0.56 bytes per
  weight. Groups run over the flattened weight, so any shape works (``in_features`` need not divide
  by the group).

Both are pure torch: they run wherever torch runs (CPU, CUDA, ROCm, MPS, XPU, Ascend NPU) with no
extra package. A matmul dequantizes the weight to the input's dtype and calls ``F.linear``, except
int8 on a CPU, where torch's ``_weight_int8pack_mm`` kernel computes it from the int8 weight where
it proved faster (see :func:`_int8_kernel`). Activations, norms, biases and MoE expert tensors
(not ``Linear`` modules in transformers 5) stay in the block's float dtype. Gradients flow to the
inputs (QLoRA: LoRA weights and prompts train through a quantized span); the quantized weights are
frozen.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from swarm.errors import ConfigError, ModelError

SCHEMES = ("none", "int8", "nf4")
NF4_GROUP = 64
# QLoRA's NormalFloat4 (Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0
# (8 positive levels, 7 negative, and 0); ``nf4_code()`` rebuilds it from its definition
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
_CHUNK = 1 << 20  # weights quantized at a time: bounds the temporaries (int64 codes) to a few MiB
_INT8_KERNEL_MAX_ROWS = 16  # float32 rows above this: dequantize + F.linear beats the int8 kernel on a CPU


def nf4_code() -> torch.Tensor:
    """NF4's 16 levels from their definition: ``Phi^-1`` at evenly spaced probabilities from
    ``delta = (1/32 + 1/30) / 2`` to 1/2 (8 positive, 7 negative) and 0, normalized by the largest."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    delta = 0.5 * (1 / 32 + 1 / 30)
    positive = normal.icdf(torch.linspace(1 - delta, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(1 - delta, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return levels / levels.abs().max()


# ---------------------------------------------------------------- the quantizers (weights only)


def _finite_absmax(weight: torch.Tensor, dim: int, what: str) -> torch.Tensor:
    absmax = weight.abs().amax(dim=dim).float()
    if not torch.isfinite(absmax).all():
        raise ModelError(f"{what} has non-finite weights (inf or nan); the checkpoint is broken, cannot quantize it")
    return absmax


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


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


def quantize_nf4(weight: torch.Tensor, what: str = "weight",
                 group: int = NF4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (any shape) -> (``packed`` uint8 [groups * group / 2], ``absmax`` float32 [groups]).

    The flattened weight is zero-padded to whole groups; each weight becomes the index of the
    nearest NF4 level to ``w / absmax(its group)``, two indices per byte (high nibble first).
    """
    if group <= 0 or group % 2:
        raise ValueError(f"the NF4 group must be a positive even number, got {group}")
    flat = weight.reshape(-1)
    groups = max(1, math.ceil(flat.numel() / group))
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


def _nf4_pairs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 2]: the two NF4 levels each packed byte holds (high nibble, low nibble)."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).to(device, dtype)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...],
                   dtype: torch.dtype, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """The ``shape`` tensor :func:`quantize_nf4` encoded, in ``dtype``; ``pairs``: a cached :func:`_nf4_pairs`."""
    if pairs is None:
        pairs = _nf4_pairs(dtype, packed.device)
    levels = F.embedding(packed.int(), pairs).view(absmax.numel(), -1)  # [groups, group]
    values = levels * absmax.to(dtype)[:, None]
    return values.view(-1)[:math.prod(shape)].view(shape)


# ---------------------------------------------------------------- the modules


class _FrozenWeightMatmul(torch.autograd.Function):
    """``x @ W.T`` for a quantized ``W``: gradients for ``x`` only (the stored weights are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantized(grad.dtype), None  # [..., out] @ [out, in] -> [..., in]


class QuantizedLinear(torch.nn.Linear):
    """A frozen ``Linear`` whose weight is stored quantized. Subclasses set :attr:`scheme` and implement
    :meth:`quantize`, :meth:`dequantized`, :meth:`matmul` and :meth:`stored_bytes`.

    It stays an ``nn.Linear`` (``in_features``, ``out_features``, ``bias``, forward hooks), so LoRA
    targets it like any Linear; ``weight`` is not a float tensor anymore, but :meth:`dequantized` is.
    """

    scheme: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        torch.nn.Module.__init__(self)  # not Linear.__init__: it would allocate a float weight
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, what: str = "Linear") -> "QuantizedLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias)
        module.quantize(linear.weight.detach(), what)
        return module

    def quantize(self, weight: torch.Tensor, what: str) -> None:
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] as the float tensor the stored one stands for."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., in] -> ``x @ W.T`` [..., out] in ``x.dtype`` (no bias)."""
        return F.linear(x, self.dequantized(x.dtype))

    @staticmethod
    def stored_bytes(in_features: int, out_features: int) -> int:
        """Bytes of the stored weight (and its scales) of an ``[out, in]`` Linear, bias not included."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            out = _FrozenWeightMatmul.apply(x, self)
        else:
            out = self.matmul(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, scheme={self.scheme}"


class Int8Linear(QuantizedLinear):
    """``qweight`` int8 [out, in] and ``scale`` float32 [out]: ``W ~= qweight * scale[:, None]``."""

    scheme = "int8"

    def quantize(self, weight: torch.Tensor, what: str) -> None:
        q, scale = quantize_int8(weight, what)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [tokens, in]
        scale = self.scale.to(x.dtype)
        if _int8_kernel(rows):
            out = torch._weight_int8pack_mm(rows.contiguous(), self.qweight, scale)
        else:
            out = F.linear(rows, self.qweight.to(x.dtype)) * scale
        return out.view(*x.shape[:-1], self.out_features)

    @staticmethod
    def stored_bytes(in_features: int, out_features: int) -> int:
        return out_features * in_features + 4 * out_features


class NF4Linear(QuantizedLinear):
    """``qweight`` uint8 [groups * 32] (two NF4 codes per byte) and ``absmax`` float32 [groups] of the
    flattened weight (:func:`quantize_nf4`)."""

    scheme = "nf4"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__(in_features, out_features, bias)
        self._pairs: dict[torch.dtype, torch.Tensor] = {}  # the byte -> two levels table, per dtype

    def quantize(self, weight: torch.Tensor, what: str) -> None:
        packed, absmax = quantize_nf4(weight, what)
        self.register_buffer("qweight", packed)
        self.register_buffer("absmax", absmax)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        pairs = self._pairs.get(dtype)
        if pairs is None or pairs.device != self.qweight.device:
            pairs = self._pairs[dtype] = _nf4_pairs(dtype, self.qweight.device)
        return dequantize_nf4(self.qweight, self.absmax, (self.out_features, self.in_features), dtype, pairs)

    @staticmethod
    def stored_bytes(in_features: int, out_features: int) -> int:
        groups = max(1, math.ceil(in_features * out_features / NF4_GROUP))
        return groups * NF4_GROUP // 2 + 4 * groups


LINEAR_CLASSES: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "nf4": NF4Linear}

_INT8_KERNEL_OK: dict[tuple[str, torch.dtype], bool] = {}


def _int8_kernel(rows: torch.Tensor) -> bool:
    """Whether torch's int8 weight-only matmul kernel runs these ``rows`` [tokens, in]: on a CPU where it
    exists and agrees with the dequantizing path (checked once per dtype), for 16/bfloat16 inputs
    and for float32 inputs of at most :data:`_INT8_KERNEL_MAX_ROWS` rows (measured: its float32 path
    is slow for long inputs). Elsewhere it is unproven, so the portable path runs."""
    if rows.device.type != "cpu" or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    if rows.dtype == torch.float32 and rows.shape[0] > _INT8_KERNEL_MAX_ROWS:
        return False
    key = (rows.device.type, rows.dtype)
    if key not in _INT8_KERNEL_OK:
        _INT8_KERNEL_OK[key] = _int8_kernel_agrees(rows.dtype)
    return _INT8_KERNEL_OK[key]


def _int8_kernel_agrees(dtype: torch.dtype) -> bool:
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (24, 96), generator=generator, dtype=torch.int8)
    scale = torch.rand(24, generator=generator) / 100 + 1e-3
    x = torch.randn(3, 96, generator=generator).to(dtype)
    try:
        out = torch._weight_int8pack_mm(x, q, scale.to(dtype))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    expected = F.linear(x.float(), dequantize_int8(q, scale, torch.float32))
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    return out.shape == expected.shape and bool(torch.allclose(out.float(), expected, rtol=tolerance,
                                                               atol=tolerance * expected.abs().max().item()))


# ---------------------------------------------------------------- the transform


def _quantizable(module: torch.nn.Module) -> bool:
    return type(module) is torch.nn.Linear  # subclasses may compute something else; they stay as they are


def quantize_block(block: torch.nn.Module, scheme: str, device: torch.device | str | None = None) -> torch.nn.Module:
    """Replaces every plain ``nn.Linear`` of ``block`` (in place) by its ``scheme`` quantized version on
    ``device`` (default: where its weight is) and returns ``block``. ``"none"`` returns it unchanged.

    The float weights are dropped as each Linear is replaced (freed once nothing else holds them),
    so quantizing a span one block at a time never holds more than one block in float.
    Raises :class:`~swarm.errors.ModelError` for non-finite weights, ConfigError for an unknown scheme.
    """
    check_scheme_name(scheme)
    if scheme == "none":
        return block
    cls = LINEAR_CLASSES[scheme]
    targets = [(name, module) for name, module in block.named_modules() if name and _quantizable(module)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        if linear.weight.is_meta:
            raise ModelError(f"{name} has no weights yet (meta device); load the block before quantizing it")
        quantized = cls.from_linear(linear, what=name)
        setattr(parent, child, quantized.to(device) if device is not None else quantized)
    return block.requires_grad_(False)


def quantized_block_bytes(config: PretrainedConfig, dtype: torch.dtype, scheme: str) -> int:
    """Bytes one decoder block of ``config`` takes once loaded in ``dtype`` and quantized with ``scheme``
    (counted on the meta device: allocates nothing); equals the bytes of a real quantized block."""
    from swarm.models import decoder_layer_class

    check_scheme_name(scheme)
    with torch.device("meta"):
        block = decoder_layer_class(config)(config, layer_idx=0)
    block.to(dtype=dtype)
    total = 0
    linears = [m for m in block.modules() if _quantizable(m)] if scheme != "none" else []
    counted = set()
    for linear in linears:
        total += LINEAR_CLASSES[scheme].stored_bytes(linear.in_features, linear.out_features)
        counted.add(id(linear.weight))
    for tensor in [*block.parameters(), *block.buffers()]:
        if id(tensor) not in counted:
            total += tensor.numel() * tensor.element_size()
    return total


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as they are stored."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


# ---------------------------------------------------------------- where a scheme runs


def check_scheme_name(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(f"--quant {scheme!r} is not one of {', '.join(SCHEMES)}")


def _probe(scheme: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if ``scheme`` quantizes and multiplies correctly on ``device`` in ``dtype``, else why not."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 24, bias=True)  # 96 * 24 is not a whole number of NF4 groups per row
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 96, generator=generator))
    x = torch.randn(2, 96, generator=generator)
    try:
        linear = linear.to(device, dtype)
        block = quantize_block(torch.nn.Sequential(linear), scheme, device)
        out = block(x.to(device, dtype)).float().cpu()
        weight = block[0].dequantized(torch.float32).cpu() if scheme != "none" else linear.weight.float().cpu()
    except Exception as e:  # an op this device or dtype lacks: any error means "does not run here"
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    expected = F.linear(x.to(dtype).float(), weight, linear.bias.float().cpu())
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    if not torch.allclose(out, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item()):
        return f"wrong results (max error {(out - expected).abs().max().item():.3g})"
    return None


def runnable_schemes(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The schemes that run on ``device`` in ``dtype`` (each probed on a small layer)."""
    return [scheme for scheme in SCHEMES if _probe(scheme, device, dtype) is None]


def check_scheme(scheme: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raises ConfigError, naming the schemes that do run there, if ``scheme`` cannot run on ``device``."""
    check_scheme_name(scheme)
    problem = _probe(scheme, device, dtype)
    if problem is not None:
        others = [s for s in runnable_schemes(device, dtype) if s != scheme]
        dtype_name = str(dtype).removeprefix("torch.")
        raise ConfigError(f"--quant {scheme} cannot run on {device} in {dtype_name} ({problem}); what runs there: "
                          f"--quant {', '.join(others) if others else '(nothing: try another --dtype or --device)'}")
