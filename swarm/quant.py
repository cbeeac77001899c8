"""Quantized blocks: a transform that stores a block's ``Linear`` weights in 8 or 4 bits.

:func:`quantize_block` replaces every plain ``torch.nn.Linear`` of a loaded block by a frozen
:class:`QuantizedLinear` and frees the float weight; nothing else changes, so the block runtime
(:mod:`swarm.blocks`), LoRA hooks (:mod:`swarm.lora`) and the RPC handler run a quantized block
exactly like a float one. Schemes (:data:`SCHEMES`; formats in :mod:`swarm.quantizers`):

- ``int8``: per-output-channel int8, ~1 byte per weight (~0.5x of bfloat16);
- ``nf4``: QLoRA's 4-bit NormalFloat with an absmax per 64 weights, ~0.56 bytes per weight (~0.28x).

Both are pure torch: they run wherever torch runs (CPU, CUDA, ROCm, MPS, XPU, Ascend NPU) with no
extra package (:func:`check_scheme` probes the device at start). A matmul dequantizes the weight into
a reusable per-thread buffer in the input's dtype and calls ``F.linear``, except for int8 inputs of at
most 16 rows on a CPU, where torch's ``_weight_int8pack_mm`` kernel computes it from the int8 weight
(measured faster there; unproven elsewhere, so not used). Activations, norms, biases and MoE expert
tensors (not ``Linear`` modules in transformers 5) stay in the block's float dtype. Gradients flow to
the inputs (QLoRA: LoRA weights and prompts train through a quantized span); the quantized weights
are frozen. docs/benchmarks.md has the measurements behind these choices.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from swarm.config import QUANT_SCHEMES
from swarm.errors import ConfigError, ModelError
from swarm.models import decoder_layer_class
from swarm.quantizers import (
    NF4_GROUP,
    dequantize_int8,
    dequantize_nf4,
    nf4_padded,
    quantize_int8,
    quantize_nf4,
    scratch,
)

SCHEMES = QUANT_SCHEMES
_INT8_KERNEL_MAX_ROWS = 16  # above this many rows, dequantizing + F.linear beat the int8 kernel on a CPU


# ---------------------------------------------------------------- the modules


class _FrozenWeightMatmul(torch.autograd.Function):
    """``x @ W.T`` for a quantized ``W``: gradients for ``x`` only (the stored weights are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = ctx.layer.dequantized(grad.dtype, reuse=True)
        return grad @ weight, None  # [..., out] @ [out, in] -> [..., in]


class QuantizedLinear(torch.nn.Linear):
    """A frozen ``Linear`` whose weight is stored quantized. Subclasses set :attr:`scheme` and implement
    :meth:`dequantized` (and :meth:`quantize` if they are made from float weights; the ``--quant``
    schemes also count their bytes for memory planning: :class:`LinearStorage`).

    It stays an ``nn.Linear`` (``in_features``, ``out_features``, ``bias``, forward hooks), so LoRA
    (Swarm's and peft's) targets it like any Linear. Its ``weight`` buffer holds the stored integers
    (not a float tensor, and for nf4 not of shape [out, in]); :meth:`dequantized` is the float weight.
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

    def dequantized(self, dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
        """The weight [out, in] as the float tensor the stored one stands for. ``reuse``: in this thread's
        scratch buffer (no allocation; overwritten by the next dequantization: use it at once)."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., in] -> ``x @ W.T`` [..., out] in ``x.dtype`` (no bias)."""
        return F.linear(x, self.dequantized(x.dtype, reuse=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            out = _FrozenWeightMatmul.apply(x, self)
        else:
            out = self.matmul(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, scheme={self.scheme}"


class LinearStorage(Protocol):
    """How a kind of quantized Linear stores an ``[out, in]`` weight, for memory planning: the ``--quant``
    classes below, or a pre-quantized checkpoint's format (:class:`swarm.prequantized.Int4Format`)."""

    def stored_bytes(self, in_features: int, out_features: int) -> int:
        """Bytes of the stored weight (and its scales) of an ``[out, in]`` Linear, bias not included."""
        ...

    def scratch_bytes(self, in_features: int, out_features: int, dtype: torch.dtype) -> int:
        """Bytes of the scratch buffers a matmul of an ``[out, in]`` Linear in ``dtype`` uses."""
        ...


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Int8Linear(QuantizedLinear):
    """``weight`` int8 [out, in] and ``scale`` float32 [out]: ``W ~= weight * scale[:, None]``."""

    scheme = "int8"

    def quantize(self, weight: torch.Tensor, what: str) -> None:
        q, scale = quantize_int8(weight, what)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)

    def dequantized(self, dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
        out = scratch("weight", self.weight.numel(), dtype, self.weight.device) if reuse else None
        return dequantize_int8(self.weight, self.scale, dtype, out)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [tokens, in]
        scale = self.scale.to(x.dtype)
        if _int8_kernel(rows):
            out = torch._weight_int8pack_mm(rows.contiguous(), self.weight, scale)
        else:  # the scale applies to the output rows: [tokens, out] multiplications instead of [out, in]
            weight = scratch("weight", self.weight.numel(), x.dtype, x.device).view(self.weight.shape)
            out = F.linear(rows, weight.copy_(self.weight)).mul_(scale)
        return out.view(*x.shape[:-1], self.out_features)

    @staticmethod
    def stored_bytes(in_features: int, out_features: int) -> int:
        return out_features * in_features + 4 * out_features

    @staticmethod
    def scratch_bytes(in_features: int, out_features: int, dtype: torch.dtype) -> int:
        return out_features * in_features * _element_size(dtype)


class NF4Linear(QuantizedLinear):
    """``weight`` uint8 [padded / 2] (two NF4 codes per byte) and ``absmax`` float32 [padded / 64] of the
    flattened weight (:func:`~swarm.quantizers.quantize_nf4`)."""

    scheme = "nf4"

    def quantize(self, weight: torch.Tensor, what: str) -> None:
        packed, absmax = quantize_nf4(weight, what)
        self.register_buffer("weight", packed)
        self.register_buffer("absmax", absmax)

    def dequantized(self, dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        if not reuse:
            return dequantize_nf4(self.weight, self.absmax, shape, dtype)
        device = self.weight.device
        return dequantize_nf4(self.weight, self.absmax, shape, dtype,
                              out=scratch("weight", 2 * self.weight.numel(), dtype, device),
                              index=scratch("nf4 index", self.weight.numel(), torch.int32, device))

    @staticmethod
    def stored_bytes(in_features: int, out_features: int) -> int:
        padded = nf4_padded(in_features * out_features)
        return padded // 2 + 4 * (padded // NF4_GROUP)

    @staticmethod
    def scratch_bytes(in_features: int, out_features: int, dtype: torch.dtype) -> int:
        padded = nf4_padded(in_features * out_features)
        return padded * _element_size(dtype) + 4 * (padded // 2)


LINEAR_CLASSES: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "nf4": NF4Linear}

_INT8_KERNEL_OK: dict[tuple[str, torch.dtype], bool] = {}


def _int8_kernel(rows: torch.Tensor) -> bool:
    """Whether torch's int8 weight-only matmul kernel runs these ``rows`` [tokens, in]: on a CPU where it
    exists and agrees with the dequantizing path (checked once per dtype), for at most
    :data:`_INT8_KERNEL_MAX_ROWS` rows (measured: faster there for decoding steps, slower for prefills).
    Elsewhere it is unproven, so the portable path runs."""
    if rows.device.type != "cpu" or rows.shape[0] > _INT8_KERNEL_MAX_ROWS or not hasattr(torch, "_weight_int8pack_mm"):
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


def _meta_block(config: PretrainedConfig, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        block = decoder_layer_class(config)(config, layer_idx=0)
    return block.to(dtype=dtype)


def storage_of(scheme: str | LinearStorage) -> LinearStorage | None:
    """The storage of a ``--quant`` scheme (None for ``none``), or ``scheme`` itself if it is one."""
    if not isinstance(scheme, str):
        return scheme
    check_scheme_name(scheme)
    return None if scheme == "none" else LINEAR_CLASSES[scheme]


def quantized_block_bytes(config: PretrainedConfig, dtype: torch.dtype, scheme: str | LinearStorage) -> int:
    """Bytes one decoder block of ``config`` takes once loaded in ``dtype`` with its Linear weights stored by
    ``scheme`` (a ``--quant`` name or a checkpoint's :class:`LinearStorage`; counted on the meta device:
    allocates nothing); equals the bytes of a real quantized block."""
    storage = storage_of(scheme)
    block = _meta_block(config, dtype)
    total = 0
    replaced = set()
    for linear in [m for m in block.modules() if _quantizable(m)] if storage is not None else []:
        total += storage.stored_bytes(linear.in_features, linear.out_features)
        replaced.add(id(linear.weight))
    return total + sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()]
                       if id(t) not in replaced)


def quant_scratch_bytes(config: PretrainedConfig, dtype: torch.dtype, scheme: str | LinearStorage) -> int:
    """Bytes of the scratch buffers a server computing ``scheme`` blocks of ``config`` in ``dtype`` keeps
    (one dequantized weight of the largest Linear, on its compute thread); 0 for ``none``."""
    storage = storage_of(scheme)
    if storage is None:
        return 0
    return max((storage.scratch_bytes(m.in_features, m.out_features, dtype)
                for m in _meta_block(config, dtype).modules() if _quantizable(m)), default=0)


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
        runs = f"--quant {', '.join(others)}" if others else "nothing (try another --dtype or --device)"
        raise ConfigError(f"--quant {scheme} cannot run on {device} in {dtype_name} ({problem}); what runs there: "
                          f"{runs}")
