"""Writing tiny GPTQ and AWQ checkpoints from a float model, packed as the formats' specifications say.

:func:`rtn_int4` quantizes a weight to 4 bits by rounding to the nearest level (per group of input
features, asymmetric or symmetric; optionally in GPTQ's act-order with a ``g_idx``). The packers
are written from the formats' descriptions, independently of ``swarm.int4``:

- GPTQ: ``qweight[r, o]`` = sum over k of ``q[o, 8r + k] << 4k``; ``qzeros[g, c]`` = sum over k of
  ``((z[8c + k, g] - 1) & 15) << 4k`` (``gptq``; ``gptq_v2`` drops the ``- 1``); ``scales`` [groups, out].
- AWQ (GEMM): ``qweight[i, c]`` = sum over k of ``q[8c + ORDER[k], i] << 4k`` with
  ``ORDER = 0, 2, 4, 6, 1, 3, 5, 7``; ``qzeros`` the same over ``z``; ``scales`` [groups, out].

:func:`write_int4_checkpoint` saves such a checkpoint (``config.json`` with ``quantization_config``
and ``model.safetensors``) and returns the float model whose weights are exactly ``(q - z) * s``:
the local reference "dequantized the same way".
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn_int4(weight: torch.Tensor, group_size: int, *, symmetric: bool = False, act_order: bool = False,
             min_zero: int = 0, seed: int = 0):
    """weight [out, in] -> (q [out, in] 0..15, z [out, groups], s [out, groups] float16, g_idx [in] int32)."""
    out_features, in_features = weight.shape
    groups = in_features // group_size
    if act_order:  # GPTQ's act-order: features are grouped in some permuted order
        perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[perm] = torch.arange(in_features, dtype=torch.int32) // group_size
    else:
        g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    w = weight.float()
    q = torch.empty(out_features, in_features, dtype=torch.int64)
    z = torch.empty(out_features, groups, dtype=torch.int64)
    s = torch.empty(out_features, groups, dtype=torch.float16)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        part = w[:, cols]
        if symmetric:
            top = part.abs().amax(dim=1).clamp(min=1e-8)
            scale = (2 * top / 15).half()
            zero = torch.full((out_features,), 8, dtype=torch.int64)
        else:
            low, high = part.amin(dim=1).clamp(max=0), part.amax(dim=1).clamp(min=0)
            scale = ((high - low).clamp(min=1e-8) / 15).half()
            zero = torch.round(-low / scale.float()).long().clamp(min_zero, 15)
        s[:, g] = scale
        z[:, g] = zero
        q[:, cols] = (torch.round(part / scale.float().unsqueeze(1)) + zero.unsqueeze(1)).long().clamp(0, 15)
    return q, z, s, g_idx


def dequantize(q, z, s, g_idx) -> torch.Tensor:
    """(q - z) * s, per input feature's group, in float32: [out, in]."""
    g = g_idx.long()
    return (q.float() - z[:, g].float()) * s[:, g].float()


def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., 8] values 0..15 -> [...] int32 words, value k at bits 4k .. 4k+3."""
    word = torch.zeros(nibbles.shape[:-1], dtype=torch.int64)
    for k in range(8):
        word |= (nibbles[..., k].long() & 15) << (4 * k)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def pack_gptq(q, z, s, g_idx, *, v2: bool = False) -> dict[str, torch.Tensor]:
    out_features, in_features = q.shape
    qweight = _words(q.T.reshape(in_features // 8, 8, out_features).transpose(1, 2))  # [in/8, out]
    stored = z if v2 else z - 1
    qzeros = _words(stored.T.reshape(z.shape[1], out_features // 8, 8))  # [groups, out/8]
    return {"qweight": qweight, "qzeros": qzeros, "scales": s.T.contiguous(), "g_idx": g_idx}


def pack_awq(q, z, s) -> dict[str, torch.Tensor]:
    def pack(values: torch.Tensor) -> torch.Tensor:  # [rows, out] -> [rows, out/8]
        rows, out = values.shape
        grouped = values.reshape(rows, out // 8, 8)
        return _words(grouped[..., list(ORDER)])

    return {"qweight": pack(q.T), "qzeros": pack(z.T), "scales": s.T.contiguous()}


def write_int4_checkpoint(model: torch.nn.Module, path: str, method: str, group_size: int = 32, *,
                          symmetric: bool = False, act_order: bool = False, v2: bool = False,
                          extra_config: dict | None = None) -> torch.nn.Module:
    """Quantizes every block Linear of ``model`` (a transformers ``*ForCausalLM``) and saves a ``method``
    ("gptq" or "awq") checkpoint at ``path``; ``model``'s weights become the dequantized ones (its reference)."""
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            base = name.rsplit(".", 1)[0]
            if not (name.endswith(".weight") and base.rsplit(".", 1)[-1] in LINEARS):
                tensors[name] = tensor.contiguous()
                continue
            q, z, s, g_idx = rtn_int4(tensor, group_size, symmetric=symmetric, act_order=act_order,
                                      min_zero=0 if v2 or method == "awq" else 1, seed=len(tensors))
            packed = pack_gptq(q, z, s, g_idx, v2=v2) if method == "gptq" else pack_awq(q, z, s)
            tensors.update({f"{base}.{key}": value.contiguous() for key, value in packed.items()})
            tensor.copy_(dequantize(q, z, s, g_idx).to(tensor.dtype))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    if method == "gptq":
        quant = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": symmetric,
                 "desc_act": act_order, "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    else:
        quant = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    config["quantization_config"] = {**quant, **(extra_config or {})}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return model
