"""How many blocks fit the device, and loading a span's blocks onto it (the device itself is chosen
by :func:`swarm.devices.pick_device`).

- :func:`load_span` — reads blocks ``start:end`` of a checkpoint (and nothing else)
- :func:`shared_blocks` / :func:`respan` — another span that keeps the blocks two spans share, loading only the new ones
- :func:`default_num_blocks` — ``--num-blocks`` when it is not given: what fits the device's memory
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from swarm.blocks import Span
from swarm.devices import available_ram
from swarm.errors import ConfigError, ModelError
from swarm.models import causal_lm_class, family_of, kv_bytes_per_token
from swarm.quant import LinearStorage, quant_scratch_bytes, quantize_block, quantized_block_bytes
from swarm.translate import to_native
from swarm.weights import TensorSource

logger = logging.getLogger(__name__)


def load_span(checkpoint: TensorSource, config: PretrainedConfig, start: int, end: int, dtype: torch.dtype,
              device: torch.device, should_stop: Callable[[], bool] = lambda: False, quant: str = "none") -> Span:
    """Reads blocks ``start:end`` (and nothing else) from ``checkpoint`` onto ``device``.

    With ``quant`` (:mod:`swarm.quant`) each block is quantized as soon as it is loaded and its float
    weights are freed before the next block loads: the span is never whole in ``dtype``.
    """
    family = family_of(config)
    lm_class = causal_lm_class(config)
    span = Span.empty(config, start, end, dtype)
    progress = tqdm(total=end - start, desc=f"Loading blocks {start}:{end}", unit="block")
    try:
        for i in range(start, end):
            if should_stop():
                raise InterruptedError("stopped while loading")
            prefix = family.block_prefix.format(i)
            names = checkpoint.names_with_prefix([prefix])
            if not names:
                raise ModelError(f"checkpoint {checkpoint.name_or_path!r} has no tensors for block {i} "
                                 f"(expected names starting with {prefix!r})")
            block = span.blocks[i - start]
            if checkpoint.int4 is not None:  # GPTQ/AWQ: its 4-bit layers replace the block's Linear modules
                raw = {name[len(prefix):]: t for name, t in checkpoint.load(names).items()}
                int4_layers, state = checkpoint.int4.modules(raw, dtype, f"block {i}")
                for path, layer in int4_layers.items():
                    block.set_submodule(path, layer.to(device))
                del raw
            else:
                tensors = to_native(lm_class, config, checkpoint.load(names, dtype))
                state = {name[len(prefix):]: tensor for name, tensor in tensors.items()}
                del tensors
            if family.translation is not None:  # a renamed checkpoint: its names/layout -> the native block's
                state = family.translation.block(state, config)
            state = {name: tensor.to(device) for name, tensor in state.items()}
            result = block.load_state_dict(state, strict=False, assign=True)
            if result.unexpected_keys:
                raise ModelError(f"block {i} of the checkpoint has tensors the model class does not expect: "
                                 f"{result.unexpected_keys[:5]}")
            still_meta = [n for n, p in block.named_parameters() if p.is_meta]
            if still_meta:
                raise ModelError(f"block {i} of the checkpoint lacks tensors: {still_meta[:5]}")
            del state, result  # the block holds the only references to its float weights now
            quantize_block(block, quant, device)
            progress.update(1)
    finally:
        progress.close()
    span.to(device)
    return span.eval().requires_grad_(False)


def shared_blocks(old: Span, start: int, end: int) -> dict[int, torch.nn.Module]:
    """The blocks of ``old`` that span ``start:end`` also holds, by global index."""
    return {i: old.blocks[i - old.start] for i in range(max(start, old.start), min(end, old.end))}


def respan(config: PretrainedConfig, kept: dict[int, torch.nn.Module], checkpoint: TensorSource, start: int, end: int,
           dtype: torch.dtype, device: torch.device, should_stop: Callable[[], bool] = lambda: False,
           quant: str = "none") -> Span:
    """Blocks ``start:end`` from the ``kept`` blocks (reused as they are, never reloaded: see
    :func:`shared_blocks`) plus the others read from ``checkpoint`` (quantized with ``quant`` as they load)."""
    missing = [i for i in range(start, end) if i not in kept]
    runs: list[tuple[int, int]] = []  # contiguous runs of missing blocks
    for i in missing:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    blocks = {i: block for i, block in kept.items() if start <= i < end}
    for run_start, run_end in runs:
        loaded = load_span(checkpoint, config, run_start, run_end, dtype, device, should_stop, quant)
        blocks.update({run_start + k: block for k, block in enumerate(loaded.blocks)})
    span = Span(config, start, end, [blocks[i] for i in range(start, end)])
    span.to(device)
    return span.eval().requires_grad_(False)


# ---------------------------------------------------------------- how many blocks fit

HEADROOM_BYTES = 2**30  # activations, allocator slack, the runtime itself
USABLE_FRACTION = {"cpu": 0.8, "mps": 0.8}  # RAM is shared with everything else on the machine
ACCELERATOR_FRACTION = 0.9


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def device_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free for this server, where they are): accelerator memory from ``mem_get_info``, else RAM."""
    backend = getattr(torch, device.type, None)
    mem_get_info = getattr(backend, "mem_get_info", None)
    if device.type not in ("cpu", "mps") and callable(mem_get_info):
        free, _total = mem_get_info(device)
        return int(free), f"free memory on {device}"
    return available_ram(), "available RAM"


def block_bytes(config: PretrainedConfig, dtype: torch.dtype, quant: str | LinearStorage = "none") -> int:
    """Bytes one block's parameters and buffers take in ``dtype``, quantized with ``quant`` (a ``--quant``
    scheme, or a pre-quantized checkpoint's format; counted on the meta device, no memory used)."""
    return quantized_block_bytes(config, dtype, quant)


def blocks_that_fit(free_bytes: int, fraction: float, bytes_per_block: int, model_blocks: int,
                    reserved: int = 0) -> int:
    """How many blocks (each ``bytes_per_block`` with its KV cache) fit ``fraction`` of ``free_bytes``
    minus :data:`HEADROOM_BYTES` and ``reserved``; never more than ``model_blocks``, maybe 0."""
    usable = int(free_bytes * fraction) - HEADROOM_BYTES - reserved
    return max(0, min(model_blocks, usable // max(bytes_per_block, 1)))


def default_num_blocks(config: PretrainedConfig, device: torch.device, dtype: torch.dtype, cache_tokens: int,
                       quant: str | LinearStorage = "none") -> int:
    """As many blocks as fit this device's free memory after each block's KV cache budget; prints the budget.

    With ``quant`` (a ``--quant`` scheme, or a GPTQ/AWQ checkpoint's :class:`~swarm.prequantized.Int4Format`),
    a block's weights count as they are stored, and the scratch buffers a quantized matmul dequantizes into
    are reserved once. Raises ConfigError if not even one block fits.
    """
    free, where = device_memory(device)
    fraction = USABLE_FRACTION.get(device.type, ACCELERATOR_FRACTION)
    weights = block_bytes(config, dtype, quant)
    cache = cache_tokens * kv_bytes_per_token(config, dtype)
    scratch = quant_scratch_bytes(config, dtype, quant)
    fit = blocks_that_fit(free, fraction, weights + cache, config.num_hidden_layers, reserved=scratch)
    name = quant if isinstance(quant, str) else getattr(quant, "label", type(quant).__name__)
    stored = "" if name == "none" else f", quantized to {name}"
    reserved = f" and {human_bytes(scratch)} of {name} dequantization scratch" if scratch else ""
    print(f"Memory budget: {human_bytes(max(0, free * fraction - HEADROOM_BYTES - scratch))} for blocks "
          f"({fraction:.0%} of {human_bytes(free)} {where}, less {human_bytes(HEADROOM_BYTES)} headroom{reserved}); "
          f"a block takes {human_bytes(weights)} of weights ({weights} bytes{stored}) + {human_bytes(cache)} of KV "
          f"cache (--cache-tokens {cache_tokens}): {fit} of the model's {config.num_hidden_layers} blocks fit "
          "(--num-blocks overrides)", flush=True)
    if fit == 0:
        raise ConfigError(f"not one block fits: a block needs {human_bytes(weights + cache)} and "
                          f"{human_bytes(free)} is free ({where}); lower --cache-tokens, pick a smaller --dtype or "
                          "--quant, free memory, or pass --num-blocks to decide yourself")
    return fit
