"""Choosing the device and loading a span's blocks onto it."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from swarm.blocks import Span
from swarm.errors import ConfigError, ModelError
from swarm.models import family_of
from swarm.weights import Checkpoint

logger = logging.getLogger(__name__)


def pick_device(requested: str) -> torch.device:
    """``auto`` picks an accelerator torch can use, else the CPU, and says loudly which one and why."""
    if requested != "auto":
        try:
            device = torch.device(requested)
        except RuntimeError as e:
            raise ConfigError(f"--device {requested!r} is not a torch device: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {requested} was asked for, but this torch build sees no CUDA/ROCm device "
                              f"(torch {torch.__version__}); install a GPU build of torch or use --device cpu")
        return device
    if torch.cuda.is_available():
        kind = "ROCm" if getattr(torch.version, "hip", None) else "CUDA"
        logger.warning("Using %s device cuda:0 (%s)", kind, torch.cuda.get_device_name(0))
        return torch.device("cuda:0")
    for name in ("xpu", "npu"):
        backend = getattr(torch, name, None)
        if backend is not None and backend.is_available():
            logger.warning("Using %s:0", name)
            return torch.device(f"{name}:0")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        logger.warning("Using Apple MPS device")
        return torch.device("mps")
    hint = ""
    if shutil.which("nvidia-smi") or shutil.which("rocm-smi"):
        hint = (" A GPU driver is installed but this torch build cannot use it "
                f"(torch {torch.__version__}, cuda={torch.version.cuda}, hip={getattr(torch.version, 'hip', None)}): "
                "install the torch build for your GPU.")
    logger.warning("No accelerator is visible to torch: serving on the CPU.%s Pass --device to choose.", hint)
    return torch.device("cpu")


def load_span(checkpoint: Checkpoint, config: PretrainedConfig, start: int, end: int, dtype: torch.dtype,
              device: torch.device, should_stop: Callable[[], bool] = lambda: False) -> Span:
    """Reads blocks ``start:end`` (and nothing else) from ``checkpoint`` onto ``device``."""
    family = family_of(config)
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
            tensors = checkpoint.load(names, dtype)
            state = {name[len(prefix):]: tensor.to(device) for name, tensor in tensors.items()}
            block = span.blocks[i - start]
            result = block.load_state_dict(state, strict=False, assign=True)
            if result.unexpected_keys:
                raise ModelError(f"block {i} of the checkpoint has tensors the model class does not expect: "
                                 f"{result.unexpected_keys[:5]}")
            still_meta = [n for n, p in block.named_parameters() if p.is_meta]
            if still_meta:
                raise ModelError(f"block {i} of the checkpoint lacks tensors: {still_meta[:5]}")
            progress.update(1)
    finally:
        progress.close()
    span.to(device)
    return span.eval().requires_grad_(False)
