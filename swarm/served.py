"""What a swarm serves, in words a user can act on: ``swarm models --initial-peers ...``, the client's
model lookup, its :class:`~swarm.errors.MissingBlocksError`, and the health page's fix command.

A model is found in the DHT under its *prefix* (``dht_prefix``; by default the repository or
directory name the servers were started with). Its :class:`~swarm.records.ModelRecord` in the model
index also carries the digest of its config.json (:func:`swarm.models.config_digest`), so a client
whose copy of the model sits in a folder with another name still finds it (:func:`find_prefix`).

Pure functions over records, except :func:`list_served` (which joins the swarm as a DHT client).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

from swarm.config import default_prefix
from swarm.first_contact import GGUF_SUFFIX
from swarm.records import ModelRecord, ServerRecord
from swarm.routing import format_blocks
from swarm.swarm_state import merge_servers, model_health



@dataclasses.dataclass(frozen=True)
class ServedModel:
    """One model of the model index and how well the swarm serves it."""

    prefix: str
    record: ModelRecord
    servers: int  # servers that announced blocks of it, in any state
    missing: tuple[int, ...]  # blocks without an online server

    @property
    def healthy(self) -> bool:
        return not self.missing

    def describe(self) -> str:
        state = "healthy" if self.healthy else f"broken: blocks {format_blocks(list(self.missing))} have no server"
        return (f"{self.prefix!r} ({self.record.name}, {self.record.family}, {self.record.num_blocks} blocks, "
                f"{self.servers} server(s)): {state}")


def summarize(index: Mapping[str, ModelRecord],
              servers: Mapping[str, Mapping[int, Mapping[str, ServerRecord]]]) -> list[ServedModel]:
    """The model index with each model's block records, as :class:`ServedModel` sorted by prefix."""
    out = []
    for prefix, record in sorted(index.items()):
        by_block = servers.get(prefix, {})
        health = model_health(by_block, record.num_blocks)
        out.append(ServedModel(prefix, record, len(merge_servers(by_block)), tuple(health.missing)))
    return out


async def list_served(initial_peers: Sequence[str]) -> list[ServedModel]:
    """Joins the swarm of ``initial_peers`` as a DHT client and reads what it serves."""
    from swarm.dht import NetworkConfig, Peer, fetch_index, fetch_servers

    peer = await Peer.start(NetworkConfig(initial_peers=tuple(initial_peers), host_maddrs=("/ip4/0.0.0.0/tcp/0",),
                                          client_mode=True))
    try:
        index = await fetch_index(peer)  # claims over swarm_state.MAX_MODEL_BLOCKS blocks are dropped
        servers = {p: await fetch_servers(peer, p, list(range(r.num_blocks))) for p, r in index.items()}
    finally:
        await peer.shutdown()
    return summarize(index, servers)


def describe_served(served: Sequence[ServedModel]) -> list[str]:
    """The lines ``swarm models --initial-peers ...`` prints."""
    if not served:
        return ["This swarm serves no model yet: no server has announced one (`swarm serve --model ... "
                "--initial-peers ...` does)."]
    lines = ["Models this swarm serves (DHT prefix, the name servers were started with, family, blocks, servers):"]
    lines += [f"  {model.describe()}" for model in served]
    lines.append("Clients find a model by its prefix: from_pretrained(name_or_path, dht_prefix=PREFIX), "
                 "`swarm finetune --dht-prefix PREFIX`, `swarm serve --dht-prefix PREFIX`.")
    return lines


def served_line(prefix: str, index: Mapping[str, ModelRecord]) -> str | None:
    """One sentence for a MissingBlocksError whose prefix no server announced: the prefix looked under and
    what the swarm serves instead; None if the swarm serves that prefix (the blocks are the news then)."""
    if prefix in index:
        return None
    others = [f"{p!r} ({r.name})" for p, r in sorted(index.items())][:8]
    where = f"Looked under DHT prefix {prefix!r}, which no server announced"
    if not others:
        return f"{where}; the swarm's model index is empty"
    return (f"{where}; the swarm serves {', '.join(others)}: pass dht_prefix= (or --dht-prefix) to use one "
            "(`swarm models --initial-peers ...` lists them)")


def find_prefix(index: Mapping[str, ModelRecord], prefix: str, digest: str, num_blocks: int) -> str | None:
    """The prefix under which the swarm serves a model whose default prefix is ``prefix`` and whose
    config.json has ``digest``: ``prefix`` itself if the index has it, else the only entry with the
    same digest and block count; None if there is none or more than one (see :func:`same_config`)."""
    if prefix in index:
        return prefix
    matches = same_config(index, digest, num_blocks)
    return matches[0] if len(matches) == 1 else None


def same_config(index: Mapping[str, ModelRecord], digest: str, num_blocks: int) -> list[str]:
    """Prefixes of the models whose config.json digest and block count are these."""
    if not digest:
        return []
    return sorted(p for p, r in index.items() if r.config_digest == digest and r.num_blocks == num_blocks)


def _is_hub_id(name: str) -> bool:
    return not name.startswith(("/", ".", "~")) and name.count("/") <= 1 and "\\" not in name


SWARM_ADDRESS = "SWARM_ADDRESS"  # stands for initial peers a page must not show (pasted as is, it is refused)


def serve_command(record: ModelRecord, prefix: str, missing: Sequence[int], initial_peers: Sequence[str]) -> str:
    """The ``swarm serve`` command that fills blocks ``missing`` of a model, to paste on another machine:
    a hub id as it is (a GGUF file of a hub repository, ``ORG/REPO/NAME.gguf``, as ``--model ORG/REPO
    --gguf-file NAME.gguf``; a local path of the machine that started it becomes ``/path/to/<name>``, and
    a copy in a folder of another name needs the prefix), the model's ``--dht-prefix`` unless it is the
    default of that model, and the swarm's ``--initial-peers`` (:data:`SWARM_ADDRESS` if none are given:
    never nothing, which would start a separate swarm)."""
    name = os.path.normpath(record.name) if record.name.startswith(("/", ".", "~")) else record.name
    repo, _, file = name.rpartition("/")
    if name.endswith(GGUF_SUFFIX) and repo.count("/") == 1 and _is_hub_id(repo):
        model, default = f"{repo} --gguf-file {file}", default_prefix(file)
    elif _is_hub_id(name) and not name.endswith(GGUF_SUFFIX):
        model, default = name, default_prefix(name)
    else:
        model = f"/path/to/{os.path.basename(name)}"
        default = None  # a folder of another name there: only the prefix finds the swarm's model
    command = f"swarm serve --model {model}"
    if missing:
        command += f" --blocks {missing[0]}:{missing[-1] + 1}"
    if default != prefix:
        command += f" --dht-prefix {prefix}"
    return command + f" --initial-peers {' '.join(initial_peers) or SWARM_ADDRESS}"
