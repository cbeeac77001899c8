"""GGUF files (llama.cpp's format) as checkpoints: the config, and only the tensors a role needs.

A GGUF is one file: metadata (the config and the tokenizer), a tensor index (name, ggml type,
shape, offset) and the tensor data. Swarm reads it with transformers' own GGUF code, so a span
served from a GGUF equals ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)``:

- the config comes from ``AutoConfig.from_pretrained(dir, gguf_file=name)`` (metadata only);
- the tensor index from transformers' GGUF header reader (no tensor data is touched);
- llama.cpp names map to the model's own names with transformers' map
  (``get_gguf_hf_weights_map``), values are undone with its per-architecture tensor processors
  (Llama's q/k row permutation, norms stored as ``w + 1``, stacked experts);
- each tensor is read with one ``pread`` of exactly its bytes and dequantized with the ``gguf``
  package's dequantizers (what transformers uses), then cast to the server's dtype.

A server for blocks 20:40 reads the header and those blocks' bytes, nothing else
(:attr:`GGUFCheckpoint.bytes_read` counts them). Weights are served dequantized in the
server's dtype; :attr:`GGUFCheckpoint.quant` names what the file held (``gguf-q4_k_m``).
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig

from swarm.errors import ModelError
from swarm.first_contact import GGUF_SUFFIX

INSTALL_HINT = "pip install 'swarm-llm[gguf]'  (or: pip install gguf)"
_FLOAT_TYPES = {0: "f32", 1: "f16", 30: "bf16"}  # ggml type ids of plain float tensors
_FLOAT_FILE_TYPES = {"ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"}


def gguf_location(model: str, gguf_file: str | None) -> tuple[str, str] | None:
    """``(directory or hub repository, file name)`` when ``model``/``gguf_file`` name a GGUF, else None.

    ``--model x/y.gguf`` is the file itself; ``--model DIR_OR_REPO --gguf-file NAME`` a file in it. A
    model's announced name (``ServerConfig.model_name``: ``ORG/REPO/NAME.gguf`` for a file in a hub
    repository) names the same file, so a client or ``swarm api`` opens a model by its listed name.
    """
    if gguf_file:
        return model, gguf_file
    if model.endswith(GGUF_SUFFIX):
        if os.path.isfile(model):
            return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
        parts = model.split("/")
        if len(parts) >= 3 and not model.startswith(("/", ".", "~")) and not os.path.isdir(parts[0]):
            return "/".join(parts[:2]), "/".join(parts[2:])  # a hub id is ORG/REPO; the rest is the file
        raise ModelError(f"GGUF file {model!r} does not exist; for a file in a hub repository pass "
                         "--model ORG/REPO --gguf-file NAME.gguf (or name it ORG/REPO/NAME.gguf)")
    return None


def require_gguf() -> None:
    """Raises a ModelError naming the install command if the ``gguf`` package is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError(f"reading GGUF files needs the gguf package: {INSTALL_HINT}") from None


def resolve_file(repo_or_dir: str, filename: str, *, revision: str | None = None, cache_dir: str | None = None,
                 token: str | bool | None = None) -> str:
    """The local path of ``filename`` in a directory, or downloaded from a hub repository (the whole file)."""
    if os.path.isdir(repo_or_dir):
        path = os.path.join(repo_or_dir, filename)
        if not os.path.isfile(path):
            raise ModelError(f"{repo_or_dir!r} has no GGUF file {filename!r}")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_or_dir, filename, revision=revision, cache_dir=cache_dir, token=token)
    except Exception as e:  # the hub raises many kinds; they all mean the same to the caller
        raise ModelError(f"cannot download {filename} of {repo_or_dir!r}: {e}") from None


def load_config(repo_or_dir: str, filename: str, hub: dict[str, Any]) -> PretrainedConfig:
    """The transformers config that transformers builds from the GGUF's metadata (no tensor data read)."""
    from transformers import AutoConfig

    require_gguf()
    path = resolve_file(repo_or_dir, filename, **hub)
    _check_header(path)
    try:
        return AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot read the config of GGUF file {path!r}: {e}") from None


def _read_header(path: str) -> tuple[dict[str, Any], Any]:
    """(metadata, transformers' ``GgufHeader``) of ``path``; a ModelError if it is not a readable GGUF."""
    import struct

    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    try:
        metadata, _ = read_gguf_metadata(path)
        header = GgufHeader.from_file(path)
    except (ValueError, struct.error, UnicodeDecodeError, KeyError, IndexError, OverflowError) as e:
        raise ModelError(f"{path!r} is not a GGUF file Swarm can read: {e}") from None
    return metadata, header


def _check_header(path: str) -> tuple[dict[str, Any], Any]:
    """Refuses what cannot be served: split files, and files shorter than their tensor index says."""
    metadata, header = _read_header(path)
    splits = metadata.get("split.count", 1)
    if isinstance(splits, int) and splits > 1:
        raise ModelError(f"{path!r} is part {metadata.get('split.no', 0) + 1} of a GGUF split into {splits} files; "
                         "merge them first (llama.cpp: `llama-gguf-split --merge FIRST.gguf OUT.gguf`)")
    size = os.path.getsize(path)
    needed = max((header.data_start + t.offset + t.nbytes for t in header.tensors), default=header.data_start)
    if needed > size:
        raise ModelError(f"GGUF file {path!r} is truncated: its tensor index needs {needed} bytes and the file has "
                         f"{size}; download it again")
    return metadata, header


def quant_label(metadata: dict[str, Any], ggml_types: Iterable[int]) -> str:
    """What the file holds, for ``ServerRecord.quant``: ``gguf-q4_k_m`` (llama.cpp's file type), or "none"
    for a float file. Without a file type, the most common ggml type of its tensors names it."""
    from gguf import LlamaFileType
    from transformers.integrations.gguf.dequant import GGML_NAME

    file_type = metadata.get("general.file_type")
    try:
        name = LlamaFileType(file_type).name if isinstance(file_type, int) else None
    except ValueError:
        name = None
    if name in _FLOAT_FILE_TYPES:
        return "none"
    if name is not None and name.startswith("MOSTLY_"):
        return "gguf-" + name.removeprefix("MOSTLY_").lower()
    counts = collections.Counter(t for t in ggml_types if t not in _FLOAT_TYPES)
    if not counts:
        return "none"
    return "gguf-" + GGML_NAME.get(counts.most_common(1)[0][0], str(counts.most_common(1)[0][0])).lower()


def requantizing_warning(scheme: str, held: str) -> str | None:
    """A warning when ``--quant scheme`` rounds a file that is already 4-bit or less (``held``:
    :func:`quant_label`) a second time, onto another 4-bit grid (measured on SmolLM2-135M Q4_1: perplexity
    10.4 -> 35.0 with nf4, 10.5 with int8; docs/benchmarks.md)."""
    bits = re.match(r"gguf-i?q([1-4])_", held + "_")
    if scheme != "nf4" or bits is None:
        return None
    return (f"--quant nf4 re-quantizes {held.removeprefix('gguf-').upper()} weights that are already {bits[1]}-bit: "
            "their rounding errors add up (SmolLM2-135M Q4_1: perplexity 10.4 -> 35.0). Serving the file without "
            "--quant, or with --quant int8, keeps its quality")


class GGUFCheckpoint:
    """A GGUF file's tensor index under the model's own tensor names; reads only the tensors asked for.

    Same interface as :class:`swarm.weights.Checkpoint` (``weight_map``, ``names_with_prefix``,
    ``load``); the tensors it returns already have the model's names and layouts.
    """

    def __init__(self, repo_or_dir: str, filename: str, config: PretrainedConfig, *, revision: str | None = None,
                 cache_dir: str | None = None, token: str | bool | None = None):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        require_gguf()
        self.name_or_path = filename if os.path.isdir(repo_or_dir) else f"{repo_or_dir}/{filename}"
        self.path = resolve_file(repo_or_dir, filename, revision=revision, cache_dir=cache_dir, token=token)
        metadata, header = _check_header(self.path)
        self.architecture: str = header.architecture
        self.data_start: int = header.data_start
        self.file_size = os.path.getsize(self.path)
        self.tensors = {t.name: t for t in header.tensors}  # gguf name -> TensorInfo
        self.quant = quant_label(metadata, (t.ggml_type for t in header.tensors))
        self._processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=config.to_dict())
        self._to_hf = _name_map(config, self._processor)  # gguf name -> the model's name
        self.weight_map: dict[str, list[str]] = {}  # the model's name -> the gguf tensors it is built from
        for name in self.tensors:
            if name in self._to_hf:
                self.weight_map.setdefault(self._to_hf[name], []).append(name)
        if not self.weight_map:
            raise ModelError(f"none of the {len(self.tensors)} tensors of {self.path!r} map to a "
                             f"{config.model_type} model (GGUF architecture {self.architecture!r})")
        self.bytes_read = 0  # tensor bytes read so far (the header is read through a memory map)
        self.int4 = None  # blocks are served dequantized

    def names_with_prefix(self, prefixes: Iterable[str]) -> list[str]:
        prefixes = tuple(prefixes)
        return [name for name in self.weight_map if name.startswith(prefixes)]

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None,
             on_tensor: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
        """Reads and dequantizes the GGUF tensors that ``names`` are built from, and nothing else."""
        names = list(names)
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise ModelError(f"GGUF file {self.path!r} lacks tensors {missing[:5]}")
        gguf_names = [g for name in names for g in self.weight_map[name]]
        parsed: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
        out: dict[str, torch.Tensor] = {}
        with open(self.path, "rb") as f:
            for gguf_name in sorted(gguf_names, key=lambda g: self.tensors[g].offset):  # in file order
                result = self._processor.process(weights=self._dequantized(f.fileno(), gguf_name), name=gguf_name,
                                                 tensor_key_mapping=self._to_hf, parsed_parameters=parsed)
                if result.name is not None:  # else the processor stored it itself (stacked experts)
                    out[self._to_hf[result.name]] = torch.from_numpy(np.copy(result.weights))
        out.update(parsed["tensors"])
        for name in names:
            if name not in out:
                raise ModelError(f"GGUF file {self.path!r}: no tensor for {name!r} after conversion")
            tensor = out[name]
            out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            if on_tensor is not None:
                on_tensor(name)
        return {name: out[name] for name in names}

    def _dequantized(self, fd: int, gguf_name: str) -> np.ndarray:
        """One tensor as float32 values in its torch shape: exactly its bytes, read with one pread."""
        from gguf import GGMLQuantizationType, dequantize, quant_shape_to_byte_shape

        info = self.tensors[gguf_name]
        raw = os.pread(fd, info.nbytes, self.data_start + info.offset)
        if len(raw) != info.nbytes:
            raise ModelError(f"GGUF file {self.path!r} ended inside tensor {gguf_name!r}; download it again")
        self.bytes_read += len(raw)
        qtype = GGMLQuantizationType(info.ggml_type)
        if qtype == GGMLQuantizationType.F32:
            data = np.frombuffer(raw, dtype=np.float32).reshape(info.shape)
        elif qtype == GGMLQuantizationType.F16:
            data = np.frombuffer(raw, dtype=np.float16).reshape(info.shape)
        else:  # blocks of bytes, as gguf's reader hands them to its dequantizers
            data = np.frombuffer(raw, dtype=np.uint8).reshape(quant_shape_to_byte_shape(info.shape, qtype))
        try:
            return dequantize(data, qtype)
        except NotImplementedError:
            raise ModelError(f"GGUF tensor {gguf_name!r} has ggml type {qtype.name}, which the installed gguf package "
                             "cannot dequantize; upgrade it (pip install -U gguf)") from None


class _TensorNames(torch.nn.Module):
    """Only a model's tensor names, as transformers' GGUF name map reads them (``state_dict`` keys and
    ``named_children``): without children it maps them with one gguf name table instead of one per
    submodule (which takes minutes for an 80-block model)."""

    def __init__(self, names: Iterable[str]):
        super().__init__()
        self._tensor_names = list(names)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, None]:  # type: ignore[override]
        return dict.fromkeys(self._tensor_names)

    def named_children(self):  # type: ignore[override]
        return iter(())


def _name_map(config: PretrainedConfig, processor: Any) -> dict[str, str]:
    """{gguf tensor name: the model's tensor name}, from transformers' own map over the model's names.

    The names are those of the model built on the meta device (no memory), every block included, so
    each block's names are exactly those of its class. Like transformers, names the table lacks are
    tried again relative to the base model (``transformer.h.0...`` as ``h.0...``: Bloom, Falcon).
    """
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    from swarm.models import causal_lm_class, family_of

    with torch.device("meta"):
        names = list(causal_lm_class(config)(config).state_dict())
    base = family_of(config).base_model_attr + "."
    kwargs = dict(model_type=config.model_type, num_layers=config.num_hidden_layers)
    try:
        mapping = get_gguf_hf_weights_map(_TensorNames(names), processor, **kwargs)
        inner = get_gguf_hf_weights_map(_TensorNames(n[len(base):] for n in names if n.startswith(base)), processor,
                                        qual_name=base, **kwargs)
    except NotImplementedError as e:
        raise ModelError(f"the gguf package has no tensor names for {config.model_type!r}: {e}") from None
    return {**inner, **mapping}
