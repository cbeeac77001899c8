"""How fast this server computes: measured once per setup on its loaded blocks, then cached.

A server publishes four numbers in its :class:`~swarm.records.ServerRecord`:

- ``inference_rps``: 1-token inference steps per second through one block, with a KV cache
- ``forward_rps``: tokens per second through one block in a forward pass (a batch, no cache)
- ``network_rps``: tokens per second its network link carries, as ``--network-rps`` says
  (0.0: not given, i.e. not limiting; Swarm never runs an internet speed test)
- ``throughput``: tokens/s per block it offers the swarm, ``min(forward_rps, network_rps)``,
  or ``--throughput`` verbatim (then nothing is measured and the two rps fields are 0.0: unknown)

The measurement runs random inputs through the first block of the loaded span: a few warm-up
runs, then as many timed runs as fit a time budget (one run for a block too big to repeat), so it
takes about a second per number on a CPU. Results are cached in ``throughput.json`` under
``$SWARM_CACHE_DIR`` (default ``~/.cache/swarm``), keyed by device, block config, dtype, quant
(``--quant``: a quantized block computes at its own speed), torch version and thread count:
:func:`speed_key` says exactly what.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import platform
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import PretrainedConfig

from swarm.blocks import Span
from swarm.devices import device_name, synchronize

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "SWARM_CACHE_DIR"
CACHE_FILE = "throughput.json"
CACHE_SCHEMA_VERSION = 1
BUDGET_S = 1.0  # seconds of timed runs per number (warm-ups come on top)
WARMUPS = 2
MAX_STEPS = 128  # inference steps timed at most (the cache grows by one token each)
MAX_FORWARDS = 16
# config entries that do not change how fast one block computes
_NOT_SPEED = {"architectures", "transformers_version", "dtype", "torch_dtype", "vocab_size", "num_hidden_layers",
              "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
              "tie_word_embeddings", "id2label", "label2id", "use_cache", "output_attentions",
              "output_hidden_states", "return_dict", "problem_type", "initializer_range"}


@dataclasses.dataclass(frozen=True)
class ComputeSpeed:
    """What :func:`measure_speed` finds (and the cache keeps) for one setup."""

    inference_rps: float  # 1-token steps/s through one block
    forward_rps: float  # tokens/s through one block, forward pass


@dataclasses.dataclass(frozen=True)
class Throughput:
    """The numbers a server publishes; build with :func:`make_throughput`."""

    inference_rps: float
    forward_rps: float
    network_rps: float  # 0.0: not limiting (not given)
    throughput: float  # tokens/s per block offered to the swarm
    source: str  # "measured", "cached" or "--throughput"

    def describe(self) -> str:
        network = f"{self.network_rps:.0f} tokens/s (--network-rps)" if self.network_rps else "not limiting"
        if self.source == "--throughput":
            return f"{self.throughput:.1f} tokens/s per block (--throughput; not measured); network {network}"
        return (f"inference {self.inference_rps:.1f} steps/s, forward {self.forward_rps:.1f} tokens/s per block "
                f"({self.source}); network {network}; offering {self.throughput:.1f} tokens/s per block")


def make_throughput(speed: ComputeSpeed | None, *, network_rps: float | None, override: float | None,
                    source: str) -> Throughput:
    """Combines a measured (or cached) ``speed`` with the ``--network-rps`` and ``--throughput`` flags."""
    network = network_rps or 0.0
    if override is not None:
        return Throughput(0.0, 0.0, network, override, "--throughput")
    if speed is None:
        raise ValueError("make_throughput needs a ComputeSpeed unless --throughput is given")
    offered = min(speed.forward_rps, network) if network else speed.forward_rps
    return Throughput(speed.inference_rps, speed.forward_rps, network, offered, source)


# ---------------------------------------------------------------- cache


def cache_path() -> pathlib.Path:
    """``$SWARM_CACHE_DIR/throughput.json``, default ``~/.cache/swarm/throughput.json``."""
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "swarm")
    return pathlib.Path(root) / CACHE_FILE


def _device_name(device: torch.device) -> str:
    if device.type != "cpu":
        return device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def speed_key(config: PretrainedConfig, device: torch.device, dtype: torch.dtype, num_threads: int,
              quant: str = "none") -> str:
    """The cache key: device kind and name, block config (hashed), dtype and quant, torch version, CPU threads."""
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _NOT_SPEED}
    fields["attn_implementation"] = getattr(config, "_attn_implementation", None)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]
    precision = str(dtype).removeprefix("torch.") + ("" if quant == "none" else f" {quant}")
    return (f"{device.type}:{_device_name(device)} | {config.model_type}-{digest} | "
            f"{precision} | torch {torch.__version__} | {num_threads} threads")


def _read(path: pathlib.Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("Ignoring the unreadable throughput cache %s (%s); it will be rewritten", path, e)
        return {}
    if not isinstance(data, dict) or data.get("schema_version") != CACHE_SCHEMA_VERSION:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def load_cached(key: str, path: pathlib.Path | None = None) -> ComputeSpeed | None:
    """The cached speed for ``key``, or None if there is none (or it is malformed)."""
    entry = _read(path or cache_path()).get(key)
    if not isinstance(entry, dict):
        return None
    try:
        speed = ComputeSpeed(float(entry["inference_rps"]), float(entry["forward_rps"]))
    except (TypeError, KeyError, ValueError):
        return None
    return speed if speed.inference_rps > 0 and speed.forward_rps > 0 else None


def store_cached(key: str, speed: ComputeSpeed, path: pathlib.Path | None = None) -> None:
    """Adds ``key`` to the cache file (atomically replaced, so concurrent servers never see half a file)."""
    path = path or cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read(path)
        entries[key] = {**dataclasses.asdict(speed), "measured_at": time.time()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".throughput-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"schema_version": CACHE_SCHEMA_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop a server: it measures again next time
        logger.warning("Could not write the throughput cache %s (%s); set $%s to a writable directory",
                       path, e, CACHE_DIR_ENV)


# ---------------------------------------------------------------- measuring


def _rate(run: Callable[[], None], work: float, device: torch.device, budget_s: float, max_runs: int) -> float:
    """``work`` units per second of ``run()``: warm up, then time as many runs as fit ``budget_s``."""
    t0 = time.perf_counter()
    run()
    synchronize(device)
    first = time.perf_counter() - t0
    if first >= budget_s:  # a block too big to repeat: the first run is the measurement
        return work / first
    for _ in range(WARMUPS - 1):
        run()
    synchronize(device)
    runs = max(1, min(max_runs, int(budget_s / max(first, 1e-9))))
    t0 = time.perf_counter()
    for _ in range(runs):
        run()
    synchronize(device)
    return work * runs / (time.perf_counter() - t0)


@torch.inference_mode()
def measure_speed(span: Span, device: torch.device, dtype: torch.dtype, budget_s: float = BUDGET_S) -> ComputeSpeed:
    """Runs random inputs through the first block of ``span`` (loaded on ``device``) and times them.

    Inference: 1-token steps of batch 1 into a fresh KV cache. Forward: one batch with no cache,
    ``[1, 256]`` tokens on a CPU and ``[8, 128]`` on an accelerator (enough to keep it busy).
    Takes about ``2 * budget_s`` plus warm-ups; for a block slower than ``budget_s`` per run,
    a single run of each.
    """
    block = span.start
    hidden_size = span.config.hidden_size
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    step_input = randn(1, 1, hidden_size)  # [batch, seq, hidden]
    cache = span.new_cache()  # grows to at most WARMUPS + MAX_STEPS tokens
    position = 0

    def step() -> None:
        nonlocal position
        span(step_input, cache, position, block, block + 1)
        position += 1

    inference_rps = _rate(step, 1.0, device, budget_s, MAX_STEPS)
    del cache
    batch, seq = (1, 256) if device.type == "cpu" else (8, 128)
    forward_input = randn(batch, seq, hidden_size)  # [batch, seq, hidden]
    forward_rps = _rate(lambda: span(forward_input, None, 0, block, block + 1), float(batch * seq), device,
                        budget_s, MAX_FORWARDS)
    return ComputeSpeed(inference_rps=inference_rps, forward_rps=forward_rps)
