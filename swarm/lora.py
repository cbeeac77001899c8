"""LoRA adapters for remote blocks: which modules they target, their PEFT names, applying them.

An adapter is one ``(A, B)`` pair per target ``Linear`` of every block: ``A`` is
``[rank, in_features]``, ``B`` is ``[out_features, rank]``, and the module computes
``base(x) + dropout(x) @ A.T @ B.T * scaling`` -- PEFT's LoRA, with ``scaling = alpha / rank``
(``alpha / sqrt(rank)`` with rsLoRA). Clients own and train the weights; servers keep their
own weights frozen and apply the pairs a request carries for the length of that request.

On the wire a module is named ``"<block>.<path in the block>"`` (e.g. ``"3.self_attn.q_proj"``);
in PEFT files it is ``base_model.model.<block prefix><path>.lora_A.weight``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from swarm.errors import BadRequest, ConfigError

PEFT_PREFIX = "base_model.model."
_UNSUPPORTED = {  # LoraConfig fields Swarm does not implement, and the value that means "off"
    "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
    "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "fan_in_fan_out": False,
}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The parts of a ``peft.LoraConfig`` that define the computation."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ()  # PEFT semantics: names (suffix match) or one regex
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @classmethod
    def from_peft(cls, config: Any) -> "LoraSpec":
        """From a ``peft.LoraConfig``; refuses the LoRA variants Swarm does not run."""
        for name, off in _UNSUPPORTED.items():
            value = getattr(config, name, off)
            if value not in (off, None, {}, [], "none"):
                raise ConfigError(f"LoraConfig.{name}={value!r} is not supported for remote blocks; leave it unset")
        targets = config.target_modules
        if not targets:
            raise ConfigError("LoraConfig.target_modules is empty: name the Linear modules of a block to adapt, "
                              "e.g. target_modules=['q_proj', 'v_proj']")
        if config.r <= 0:
            raise ConfigError(f"LoraConfig.r must be positive, got {config.r}")
        return cls(rank=int(config.r), alpha=float(config.lora_alpha), dropout=float(config.lora_dropout or 0.0),
                   target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
                   use_rslora=bool(getattr(config, "use_rslora", False)))

    def to_peft(self, base_model: str = "") -> Any:
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          use_rslora=self.use_rslora, task_type="CAUSAL_LM", base_model_name_or_path=base_model or None)

    def matches(self, full_name: str) -> bool:
        """PEFT's rule: a regex string must match the whole name; a list entry must match its end."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, full_name) is not None
        return any(full_name == t or full_name.endswith("." + t) for t in self.target_modules)


@dataclasses.dataclass(frozen=True)
class TargetModule:
    block: int
    path: str  # inside the block, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int

    @property
    def wire_name(self) -> str:
        return f"{self.block}.{self.path}"


def target_modules(block: torch.nn.Module, block_index: int, block_prefix: str,
                   spec: LoraSpec) -> list[TargetModule]:
    """The ``Linear`` modules of ``block`` that ``spec`` adapts (``block_prefix``: e.g. ``"model.layers.{}."``)."""
    found = []
    prefix = block_prefix.format(block_index)
    for path, module in block.named_modules():
        if path and spec.matches(prefix + path):
            if not isinstance(module, torch.nn.Linear):
                raise ConfigError(f"LoRA target {prefix + path} is a {type(module).__name__}, not a Linear; "
                                  "Swarm adapts Linear modules only")
            found.append(TargetModule(block_index, path, module.in_features, module.out_features))
    return found


def peft_key(block_prefix: str, target: TargetModule, which: str) -> str:
    """``which``: ``"A"`` or ``"B"``."""
    return f"{PEFT_PREFIX}{block_prefix.format(target.block)}{target.path}.lora_{which}.weight"


def parse_wire_name(name: str) -> tuple[int, str]:
    block, _, path = name.partition(".")
    if not block.isdigit() or not path:
        raise BadRequest(f"LoRA module name {name[:100]!r} must look like '<block>.<module path>', "
                         "e.g. '3.self_attn.q_proj'")
    return int(block), path


@dataclasses.dataclass
class AppliedLora:
    """Resolved, validated LoRA weights for one request: ``(module, A, B)`` triples and how to scale them."""

    modules: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]
    scaling: float
    dropout: float = 0.0
    seed: int = 0
    names: list[str] = dataclasses.field(default_factory=list)  # wire names: they seed each module's dropout

    def tensors(self) -> list[torch.Tensor]:
        return [t for _, a, b in self.modules for t in (a, b)]


@contextlib.contextmanager
def applied(lora: AppliedLora | None) -> Iterator[None]:
    """Adds the LoRA paths to their modules for the duration of one synchronous call.

    Forward hooks, removed on exit. The server runs one compute job at a time (see
    :mod:`server.compute`), so hooks installed for one request never see another's inputs.
    """
    if lora is None or not lora.modules:
        yield
        return
    handles = []
    try:
        for index, (module, a, b) in enumerate(lora.modules):
            # a module's mask depends on the seed and its name only, so a backward recomputed on other
            # servers (split differently) draws the masks the forward drew
            key = zlib.crc32(lora.names[index].encode()) if lora.names else index
            seed = (lora.seed * 1_000_003 + key) % (1 << 62)
            handles.append(module.register_forward_hook(_lora_hook(a, b, lora.scaling, lora.dropout, seed)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def applied_to_rows(loras: Sequence[tuple[slice, AppliedLora]]) -> Iterator[None]:
    """Adds each slice of rows' own adapter to its modules for one synchronous batched call (inference: no
    dropout). Rows of different sessions share the base layers' matmul; each adapter adds its product
    to its rows only, and adjacent slices with the same weights (a preloaded adapter) take one product."""
    by_module: dict[torch.nn.Module, list[list[Any]]] = {}
    for rows, lora in loras:
        for module, a, b in lora.modules:
            entries = by_module.setdefault(module, [])
            last = entries[-1] if entries else None
            if last is not None and last[1] is a and last[2] is b and last[3] == lora.scaling \
                    and last[0].stop == rows.start:
                last[0] = slice(last[0].start, rows.stop)
            else:
                entries.append([rows, a, b, lora.scaling])
    handles = [module.register_forward_hook(_rows_hook(entries)) for module, entries in by_module.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _rows_hook(entries: list[list[Any]]):
    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]  # [rows, tokens, in]
        for rows, a, b, scaling in entries:
            output[rows] += (x[rows] @ a.to(x.dtype).t() @ b.to(x.dtype).t()) * scaling
        return output

    return hook


def _lora_hook(a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float, seed: int):
    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if dropout > 0:  # seeded: the forward of a backward request draws the same mask as its forward
            generator = torch.Generator(device=x.device).manual_seed(seed)
            keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32) >= dropout
            x = x * keep.to(x.dtype) / (1 - dropout)
        return output + (x @ a.to(x.dtype).t() @ b.to(x.dtype).t()) * scaling

    return hook


def check_lora(names: Sequence[str], a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], start: int, end: int,
               modules: dict[int, dict[str, torch.nn.Module]], max_rank: int, max_bytes: int) -> None:
    """Validates a request's LoRA fields against the blocks ``start:end`` it runs; raises BadRequest."""
    if not len(names) == len(a) == len(b):
        raise BadRequest(f"lora_modules, lora_a and lora_b must have equal lengths, got {len(names)}, "
                         f"{len(a)}, {len(b)}")
    if len(set(names)) != len(names):
        raise BadRequest("lora_modules names a module twice")
    total = sum(t.numel() * t.element_size() for t in (*a, *b))
    if total > max_bytes:
        raise BadRequest(f"the request's LoRA weights take {total / 2**20:.1f} MiB; this server accepts at most "
                         f"{max_bytes / 2**20:.1f} MiB per request (--max-adapter-mb); use a smaller rank or fewer "
                         "target modules, or servers with larger spans")
    for name, ta, tb in zip(names, a, b):
        block, path = parse_wire_name(name)
        if not start <= block < end:
            raise BadRequest(f"LoRA module {name!r} is outside the requested blocks {start}:{end}")
        module = modules[block].get(path)
        if not isinstance(module, torch.nn.Linear):
            raise BadRequest(f"LoRA module {name!r}: block {block} has no Linear module {path!r}")
        if not (ta.is_floating_point() and tb.is_floating_point()):
            raise BadRequest(f"LoRA weights of {name!r} must be floating point, got {ta.dtype} and {tb.dtype}")
        rank = ta.shape[0] if ta.ndim == 2 else -1
        if ta.shape != (rank, module.in_features) or tb.shape != (module.out_features, rank) or rank < 1:
            raise BadRequest(f"LoRA weights of {name!r} have shapes {list(ta.shape)} and {list(tb.shape)}; "
                             f"expected [rank, {module.in_features}] and [{module.out_features}, rank]")
        if rank > max_rank:
            raise BadRequest(f"LoRA rank {rank} of {name!r} exceeds this server's --max-lora-rank {max_rank}")


def module_prefix(family: Any) -> str:
    """Where block ``{}`` sits in the native ``*ForCausalLM`` (PEFT names modules by it)."""
    return f"{family.base_model_attr}.{family.layers_attr}.{{}}."


def read_peft_adapter(path: str, family: Any) -> tuple[LoraSpec, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """Reads a PEFT LoRA adapter directory: its spec and ``{(block, module path): (A, B)}``.

    Raises :class:`ConfigError` saying what is wrong with the directory.
    """
    import json
    import os

    from safetensors.torch import load_file

    config_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
        raise ConfigError(f"{path!r} is not a PEFT adapter directory: it needs adapter_config.json and "
                          "adapter_model.safetensors (model.save_adapter() and peft's save_pretrained write both)")
    with open(config_path) as f:
        raw = json.load(f)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"adapter {path!r} is a {raw.get('peft_type')} adapter; Swarm runs LoRA adapters only")
    from peft import LoraConfig

    known = {k: v for k, v in raw.items() if k in LoraConfig.__dataclass_fields__}
    spec = LoraSpec.from_peft(LoraConfig(**known))
    pattern = re.compile(re.escape(PEFT_PREFIX + module_prefix(family)).replace(r"\{\}", r"(\d+)")
                         + r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(weights_path).items():
        match = pattern.match(key)
        if match is None:
            raise ConfigError(f"adapter {path!r} has tensor {key!r}, which is not a LoRA weight of a block of this "
                              "model (Swarm adapts the blocks' Linear modules only)")
        pairs.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    weights = {}
    for where, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ConfigError(f"adapter {path!r} has lora_{''.join(pair)} but not both A and B for block "
                              f"{where[0]} module {where[1]!r}")
        weights[where] = (pair["A"], pair["B"])
    return spec, weights
