"""Swarm: run and fine-tune large language models over a swarm of mismatched machines.

Map of the shared package (``server/``, ``client/`` and ``health/`` import from here, never the
other way; the CLI imports them lazily):

- ``errors``   the exception tree, retryable vs fatal, and its wire form
- ``retry``    the one retry policy of client calls (budget, backoff, bans)
- ``verification`` pure comparison of two servers' outputs: tolerances by dtype, who is wrong
- ``records``  DHT records (ServerRecord, ModelRecord, ReportRecord) and key names
- ``codec``    typed dataclasses <-> msgpack maps, tensors <-> raw buffers
- ``wire``     RPC messages and stream framing
- ``compression`` activation compression on slow links: schemes, their errors, the choice per link
- ``dht``      starting a peer, announcing and fetching records
- ``identity`` the libp2p key a peer id is derived from: made, read and handed to p2pd by Swarm
- ``signed_records`` the DHT validator: only entries signed by the peer their subkey names
- ``swarm_key`` private swarms: the key file, DHT request authentication, stream proofs
- ``transport`` one stream to a server: send/receive messages with timeouts (and the key proof)
- ``push_tokens`` which pushes a session accepts: the hop its client named, with that hop's token
- ``routing``  pure span/chain computation over records
- ``placement`` pure block placement: where a server is most useful, and whether to move
- ``swarm_state`` pure server/block/model state: replicas, healthy or broken (health, servers, clients)
- ``served``   what a swarm serves, in words: ``swarm models --initial-peers``, finding a model by config.json, fix commands
- ``config``   one frozen config dataclass per component: servers, DHT peers, clients
- ``command_config``  the same for health, verify, finetune, api, doctor, download and slurm
- ``first_contact`` checks of what a user gives first (model sources, multiaddrs, key files): one line naming the fix
- ``models``   family adapters (the only family-specific code)
- ``blocks``   the generic block runtime (a span of a model's own decoder layers)
- ``quant``    quantized blocks (int8, nf4): a transform on a loaded block, its size, where it runs
- ``quantizers`` the int8 and NF4 weight formats (quantize, dequantize) in pure torch
- ``weights``  reading only the needed tensors/shards of a checkpoint
- ``gguf``     GGUF files as checkpoints: config, tensor index, a span's tensors dequantized
- ``prequantized`` GPTQ/AWQ checkpoints: their quantization_config, a block's 4-bit layers
- ``int4``     the 4-bit linear layer (packed weights, plain-torch dequantization) and GPTQ/AWQ unpacking
- ``accelerators`` the GPUs/DCUs/NPUs the OS shows (vendor tools, device nodes)
- ``devices``  what torch can use, the --device verdict and its fixes, dtype/attention per backend, RAM
- ``doctor``   ``swarm doctor``: what this machine can serve with
- ``slurm``    the Slurm job a process runs in and when its time runs out
- ``sbatch``   ``swarm slurm``: the sbatch script for servers as batch jobs, and submitting it
- ``download`` ``swarm download``: only a span's shards, for nodes without network
- ``aio``      event loops (uvloop where available)
- ``tiny``, ``local_swarm``, ``wan``  tiny models, a swarm of processes on 127.0.0.1 and emulated WAN
  links (delaying proxies): for the demo, tests and benchmarks, never used by a server or client
- ``cli``      the ``swarm`` command
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "AutoDistributedModelForCausalLM",
    "ClientConfig",
    "ModelRecord",
    "ServerConfig",
    "ServerRecord",
    "ServerState",
    "SwarmError",
    "__version__",
]

_LAZY = {
    "AutoDistributedModelForCausalLM": ("client.model", "AutoDistributedModelForCausalLM"),
    "ClientConfig": ("swarm.config", "ClientConfig"),
    "ServerConfig": ("swarm.config", "ServerConfig"),
    "ModelRecord": ("swarm.records", "ModelRecord"),
    "ServerRecord": ("swarm.records", "ServerRecord"),
    "ServerState": ("swarm.records", "ServerState"),
    "SwarmError": ("swarm.errors", "SwarmError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
