"""Adapters a server preloads (``swarm serve --adapters PATH...``); clients select one by name."""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from swarm.blocks import Span
from swarm.errors import ConfigError
from swarm.lora import LoraSpec, read_peft_adapter

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Adapter:
    name: str
    spec: LoraSpec
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # only the span's blocks


def parse_adapter_arg(arg: str) -> tuple[str, str]:
    """``PATH`` or ``NAME=PATH``; the name defaults to the directory's name."""
    name, sep, path = arg.partition("=")
    if not sep:
        name, path = os.path.basename(os.path.normpath(arg)), arg
    if not name or not path:
        raise ConfigError(f"--adapters {arg!r}: give PATH or NAME=PATH")
    return name, path


def load_adapters(args: tuple[str, ...], span: Span, device: torch.device, dtype: torch.dtype) -> dict[str, Adapter]:
    """Reads each adapter's weights for the span's blocks and checks they fit its modules."""
    adapters: dict[str, Adapter] = {}
    for arg in args:
        name, path = parse_adapter_arg(arg)
        if name in adapters:
            raise ConfigError(f"two adapters are named {name!r}; name them with NAME=PATH")
        spec, weights = read_peft_adapter(path, span.family)
        kept = {}
        for (block, module_path), (a, b) in weights.items():
            if not span.start <= block < span.end:
                continue
            module = dict(span.blocks[block - span.start].named_modules()).get(module_path)
            if not isinstance(module, torch.nn.Linear) or a.shape != (a.shape[0], module.in_features) or \
                    b.shape != (module.out_features, a.shape[0]):
                raise ConfigError(f"adapter {path!r} does not fit this model: block {block} module {module_path!r} "
                                  f"(weights {list(a.shape)} and {list(b.shape)})")
            kept[(block, module_path)] = (a.to(device, dtype), b.to(device, dtype))
        adapters[name] = Adapter(name, spec, kept)
        logger.info("Loaded adapter %r from %s (%d modules in blocks %d:%d)", name, path, len(kept), span.start,
                    span.end)
    return adapters
