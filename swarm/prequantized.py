"""Pre-quantized safetensors checkpoints (GPTQ, AWQ): which format a config names, and a block's 4-bit layers.

A checkpoint quantized by GPTQModel/AutoGPTQ or AutoAWQ says so in ``config.json``
(``quantization_config``) and stores each quantized ``Linear`` as ``qweight``/``qzeros``/``scales``
(``g_idx`` for GPTQ) instead of ``weight``. :func:`int4_format` reads and checks that config;
:meth:`Int4Format.modules` turns one block's tensors into :class:`~swarm.int4.Int4Linear` layers
that keep the weights at ~4 bits, dequantized by plain torch in each forward (no CUDA-only kernel).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import PretrainedConfig

from swarm.errors import ModelError
from swarm.int4 import Int4Linear, awq_tensors, gptq_tensors, int4_scratch_bytes, int4_stored_bytes

INT4_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_SERVED = "Swarm serves 4-bit GPTQ (checkpoint_format gptq or gptq_v2) and 4-bit AWQ (version gemm) checkpoints"


@dataclasses.dataclass(frozen=True)
class Int4Format:
    """What a checkpoint's ``quantization_config`` says, once checked."""

    method: str  # "gptq" or "awq"
    group_size: int  # input features per scale (-1: one group per row)
    zero_offset: int = 0  # GPTQ v1 stores zero points minus one
    act_order: bool = False  # GPTQ desc_act: groups follow g_idx, which each layer keeps

    @property
    def label(self) -> str:
        """``ServerRecord.quant`` of a span served from this checkpoint."""
        return f"{self.method}-int4"

    # memory planning (swarm.quant.LinearStorage): what one Int4Linear of this checkpoint stores and uses

    def stored_bytes(self, in_features: int, out_features: int) -> int:
        """Bytes of one [out, in] layer's 4-bit weight, zero points, float16 scales (as GPTQ/AWQ files store
        them) and act-order ``g_idx``."""
        return int4_stored_bytes(in_features, out_features, self.group_size, act_order=self.act_order)

    def scratch_bytes(self, in_features: int, out_features: int, dtype: torch.dtype) -> int:
        return int4_scratch_bytes(in_features, out_features, dtype, act_order=self.act_order)

    def modules(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                block: str) -> tuple[dict[str, Int4Linear], dict[str, torch.Tensor]]:
        """One block's tensors (names relative to the block) -> ({module path: Int4Linear}, the other tensors
        converted to ``dtype``). ``block`` names the block in errors."""
        paths = sorted({name.rsplit(".", 1)[0] for name in tensors if name.endswith(".qweight")})
        modules: dict[str, Int4Linear] = {}
        for path in paths:
            parts = {suffix: tensors.get(f"{path}.{suffix}") for suffix in INT4_SUFFIXES}
            missing = [s for s in ("qzeros", "scales") if parts[s] is None]
            if missing:
                raise ModelError(f"{block}: {path}.qweight has no {path}.{missing[0]}")
            bias = tensors.get(f"{path}.bias")
            bias = None if bias is None else bias.to(dtype)
            try:
                if self.method == "gptq":
                    q, z, s, g_idx = gptq_tensors(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"],
                                                  zero_offset=self.zero_offset)
                else:
                    (q, z, s), g_idx = awq_tensors(parts["qweight"], parts["qzeros"], parts["scales"]), None
                if self.group_size > 0 and g_idx is None and q.shape[1] != s.shape[1] * self.group_size:
                    raise ModelError(f"{q.shape[1]} input features in {s.shape[1]} groups, but group_size is "
                                     f"{self.group_size}")
                modules[path] = Int4Linear(q, z, s, g_idx, bias)
            except ModelError as e:
                raise ModelError(f"{block}, {path}: {e}") from None
        taken = {f"{path}.{suffix}" for path in paths for suffix in (*INT4_SUFFIXES, "bias")}
        rest = {name: (t.to(dtype) if t.is_floating_point() else t) for name, t in tensors.items() if name not in taken}
        return modules, rest


def int4_format(config: PretrainedConfig) -> Int4Format | None:
    """The checked format of a pre-quantized checkpoint, or None if its config has no ``quantization_config``.

    Raises ModelError, naming what is served, for a format or setting Swarm cannot serve.
    """
    raw: Any = getattr(config, "quantization_config", None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else vars(raw)
    method = str(raw.get("quant_method", "")).lower()
    bits = raw.get("bits", raw.get("w_bit"))
    group_size = raw.get("group_size", raw.get("q_group_size", 128))
    if method not in ("gptq", "awq"):
        raise ModelError(f"the checkpoint's quantization_config has quant_method {method!r}; {_SERVED} (and GGUF "
                         "files). Serve an unquantized checkpoint with --quant to quantize it while it loads")
    if bits != 4:
        raise ModelError(f"the checkpoint is {bits}-bit {method.upper()}; {_SERVED}")
    if not isinstance(group_size, int) or (group_size != -1 and group_size < 2):
        raise ModelError(f"the checkpoint's {method.upper()} group_size {group_size!r} is not a group size")
    if method == "gptq":
        layout = str(raw.get("checkpoint_format", "gptq")).lower()
        if layout not in ("gptq", "gptq_v2"):
            raise ModelError(f"GPTQ checkpoint_format {layout!r} is a kernel-specific repacking; {_SERVED}")
        return Int4Format("gptq", group_size, zero_offset=1 if layout == "gptq" else 0,
                          act_order=bool(raw.get("desc_act", False)))
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise ModelError(f"AWQ version {version!r} packs weights for one kernel; {_SERVED}")
    if raw.get("zero_point", True) is not True:
        raise ModelError(f"AWQ without zero points is not supported; {_SERVED}")
    return Int4Format("awq", group_size)
