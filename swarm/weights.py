"""Reading only the tensors a role needs from a checkpoint (local directory or hub id).

A server for blocks 20:40 downloads only the shards that hold those blocks and reads only their
tensors; a client reads only the embeddings, final norm and LM head. Hub downloads go through
``huggingface_hub`` (its cache, its progress bars, ``HF_HUB_OFFLINE``), so a directory laid out
like the hub cache works with no network.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from safetensors import safe_open
from transformers import PretrainedConfig

from swarm.errors import ModelError
from swarm.gguf import GGUFCheckpoint, gguf_location
from swarm.prequantized import Int4Format, int4_format

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class TensorSource(Protocol):
    """What loading reads tensors from: :class:`Checkpoint` (safetensors) or :class:`~swarm.gguf.GGUFCheckpoint`."""

    name_or_path: str
    quant: str  # what ServerRecord.quant says of the weights as read ("none": full precision)
    weight_map: dict[str, Any]  # the model's tensor names -> where each is stored
    int4: Int4Format | None  # set: blocks hold 4-bit layers (swarm.prequantized); the tensors come raw
    bytes_read: int  # bytes of tensors read so far, as stored

    def names_with_prefix(self, prefixes: Iterable[str]) -> list[str]: ...

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None,
             on_tensor: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]: ...


class Checkpoint:
    """A checkpoint's tensor index; fetches shard files only when their tensors are read."""

    quant = "none"  # what ServerRecord.quant says of weights served as read (full precision)
    int4: Int4Format | None = None  # a GPTQ/AWQ checkpoint's format: its blocks hold 4-bit layers

    def __init__(self, name_or_path: str, *, revision: str | None = None, cache_dir: str | None = None,
                 token: str | bool | None = None):
        self.name_or_path = name_or_path
        self._revision, self._cache_dir, self._token = revision, cache_dir, token
        self.is_local = os.path.isdir(name_or_path)
        self.weight_map = self._read_weight_map()  # tensor name -> shard file name
        self.bytes_read = 0  # bytes of the tensors read so far, as stored

    def _fetch(self, filename: str, *, required: bool = True) -> str | None:
        if self.is_local:
            path = os.path.join(self.name_or_path, filename)
            return path if os.path.isfile(path) else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return hf_hub_download(self.name_or_path, filename, revision=self._revision, cache_dir=self._cache_dir,
                                   token=self._token)
        except LocalEntryNotFoundError as e:  # first: it subclasses EntryNotFoundError
            if not required:
                return None
            raise ModelError(f"cannot download {filename} of {self.name_or_path!r} (offline, and not in the "
                             f"hub cache): {e}. On a node with network, fetch what this node serves first: "
                             f"swarm download {self.name_or_path} --blocks START:END (docs/hpc.md)") from None
        except EntryNotFoundError:
            return None
        except Exception as e:  # the hub raises many kinds; they all mean the same to the caller
            if not required and "404" in str(e):
                return None
            raise ModelError(f"cannot download {filename} of {self.name_or_path!r}: {e}") from None

    def fetch_file(self, filename: str, *, required: bool = True) -> str | None:
        """The local path of a file of the checkpoint (downloaded into the hub cache if needed);
        None if it does not exist and ``required`` is False."""
        return self._fetch(filename, required=required)

    def _read_weight_map(self) -> dict[str, str]:
        index_path = self._fetch(INDEX_FILE, required=False)
        if index_path is not None:
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelError(f"{INDEX_FILE} of {self.name_or_path!r} has no weight_map")
            return weight_map
        # required: not finding it in the cache with no hub to ask is "cannot download", not "no safetensors"
        single = self._fetch(SINGLE_FILE)
        if single is None:
            raise ModelError(
                f"{self.name_or_path!r} has no {SINGLE_FILE} or {INDEX_FILE}; Swarm reads safetensors checkpoints "
                "only (convert with `model.save_pretrained(path, safe_serialization=True)`)"
            )
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}

    def names_with_prefix(self, prefixes: Iterable[str]) -> list[str]:
        prefixes = tuple(prefixes)
        return [name for name in self.weight_map if name.startswith(prefixes)]

    def block_names(self, block_prefix: str, blocks: Iterable[int]) -> list[str]:
        """The tensors of ``blocks``, whose names start with ``block_prefix.format(i)`` (a server's span)."""
        return self.names_with_prefix(block_prefix.format(i) for i in blocks)

    def fetch(self, names: Iterable[str]) -> list[str]:
        """Downloads (or finds in the cache) the shard files that hold ``names``; returns their local paths."""
        paths = []
        for shard in self.shards_for(names):
            path = self._fetch(shard)
            if path is None:
                raise ModelError(f"shard {shard} of {self.name_or_path!r} is missing")
            paths.append(path)
        return paths

    def shards_for(self, names: Iterable[str]) -> list[str]:
        return sorted({self.weight_map[n] for n in names})

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None,
             on_tensor: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
        """Reads ``names`` (converting floating tensors to ``dtype``), fetching only their shards.

        The tensors are in memory of their own, never views of the memory-mapped shard file: served
        weights then count in RSS as the process's own memory (not as file pages that come and go), are
        64-byte aligned, and take no page faults when first used (docs/benchmarks.md, "Quantized blocks").
        """
        names = list(names)
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise ModelError(f"checkpoint {self.name_or_path!r} lacks tensors {missing[:5]}")
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for shard, shard_names in sorted(by_shard.items()):
            path = self._fetch(shard)
            if path is None:
                raise ModelError(f"shard {shard} of {self.name_or_path!r} is missing")
            with safe_open(path, framework="pt") as f:
                for name in shard_names:
                    mapped = f.get_tensor(name)  # a view of the memory-mapped file
                    self.bytes_read += mapped.numel() * mapped.element_size()
                    tensor = mapped.to(dtype) if dtype is not None and mapped.is_floating_point() else mapped
                    out[name] = tensor.clone() if tensor is mapped else tensor  # .to() copied it, or copy it now
                    if on_tensor is not None:
                        on_tensor(name)
        return out


def outside_blocks(names: Iterable[str], block_prefix: str) -> list[str]:
    """The tensors of ``names`` that belong to no block (``block_prefix.format(i)``): embeddings, final
    norm, LM head; what a client reads."""
    block = re.compile(re.escape(block_prefix).replace(r"\{\}", r"\d+"))
    return [name for name in names if not block.match(name)]


def open_checkpoint(name_or_path: str, config: PretrainedConfig, *, gguf_file: str | None = None,
                    revision: str | None = None, cache_dir: str | None = None,
                    token: str | bool | None = None) -> TensorSource:
    """The checkpoint ``name_or_path`` names: a GGUF file (``x.gguf``, or ``gguf_file`` in a directory or
    repository; :mod:`swarm.gguf`) or a safetensors checkpoint, maybe pre-quantized (GPTQ/AWQ:
    :mod:`swarm.prequantized`). Both read only the tensors asked for."""
    location = gguf_location(name_or_path, gguf_file)
    if location is not None:
        return GGUFCheckpoint(*location, config, revision=revision, cache_dir=cache_dir, token=token)
    checkpoint = Checkpoint(name_or_path, revision=revision, cache_dir=cache_dir, token=token)
    checkpoint.int4 = int4_format(config)
    if checkpoint.int4 is not None:
        checkpoint.quant = checkpoint.int4.label
    return checkpoint
