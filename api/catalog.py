"""The models this API offers: the swarm's model index, server-held adapters, client-side adapters.

Ids: a base model's id is the name its servers announce (a hub id like ``Qwen/Qwen2.5-7B-Instruct``
or the directory they loaded); a server-held adapter is ``model:adapter``; a client-side adapter
(``--adapter NAME=PATH``) is ``NAME``. A model is *complete* when every block has an online server
(for an adapter: an online server that holds the adapter).

Models load lazily on their first request (weights of the embeddings and head, tokenizer, chat
template) on the executor thread; a base model and its adapters share one local model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from concurrent.futures import Executor
from typing import Any

from swarm.command_config import ApiConfig
from swarm.dht import Peer, fetch_models, fetch_servers
from swarm.errors import ConfigError, MissingBlocksError, SwarmError
from swarm.gguf import gguf_location
from swarm.records import ModelRecord, ServerState
from swarm.routing import format_blocks, missing_blocks
from swarm.swarm_state import likeliest_model

from client.remote_sequence import RemoteSequence

from api.errors import ApiError
from api.generation import LocalModel
from api.tools import ToolFormat, detect_format

logger = logging.getLogger(__name__)

LIST_TTL = 5.0  # seconds a listing of the swarm's models is reused


@dataclasses.dataclass(frozen=True)
class Entry:
    id: str
    base: str  # the base model's id (its announced name)
    prefix: str
    record: ModelRecord
    complete: bool
    adapter: str = ""  # a server-held adapter's name
    adapter_path: str = ""  # a client-side adapter's directory
    created: int = 0


@dataclasses.dataclass
class Served:
    """A loaded model id: the shared local model, its tokenizer, and its own remote sequence."""

    entry: Entry
    local: LocalModel
    sequence: RemoteSequence
    tokenizer: Any
    eos_ids: set[int]
    tool_format: ToolFormat | None
    max_positions: int | None  # the model's own context length, if its config says

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)


class Catalog:
    def __init__(self, config: ApiConfig, peer: Peer, executor: Executor):
        self.config, self.peer, self.executor = config, peer, executor
        self._entries: dict[str, Entry] = {}
        self._listed_at = -float("inf")
        self._list_lock = asyncio.Lock()
        self._refresher: asyncio.Future | None = None  # a background renewal of the listing
        self._served: dict[str, Served] = {}
        self._bases: dict[str, tuple[LocalModel, Any, set[int], RemoteSequence]] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._variants: list[Any] = []  # variant models whose remote sequences are in use
        self._client_adapters = {name: (path, _adapter_base(path)) for name, path in config.adapter_paths().items()}

    async def entries(self, fresh: bool = False) -> dict[str, Entry]:
        """Every id this API offers. A listing older than ``LIST_TTL`` seconds is renewed in the background
        while requests go on with it (``fresh``: wait for a new one); the first listing is waited for."""
        if fresh or self._listed_at == -float("inf"):
            await self._refresh()
        elif time.monotonic() - self._listed_at > LIST_TTL and (self._refresher is None or self._refresher.done()):
            self._refresher = asyncio.ensure_future(self._refresh_logged())
        return self._entries

    async def _refresh(self) -> None:
        asked = time.monotonic()
        async with self._list_lock:
            if self._listed_at >= asked:  # another request listed while this one waited
                return
            self._entries = await self._list()
            self._listed_at = time.monotonic()

    async def _refresh_logged(self) -> None:
        try:
            await self._refresh()
        except Exception as e:  # the old listing stays; the next request tries again
            logger.warning("Listing the swarm's models failed: %s", e)

    async def _list(self) -> dict[str, Entry]:
        # the claim most of a prefix's servers signed (swarm_state.likeliest_model; not confirmed over info)
        models = {prefix: record for prefix, claims in (await fetch_models(self.peer)).items()
                  if (record := likeliest_model(claims)) is not None}
        found = await asyncio.gather(*(fetch_servers(self.peer, prefix, list(range(record.num_blocks)))
                                       for prefix, record in models.items()))
        entries: dict[str, Entry] = {}
        now = int(time.time())
        for (prefix, record), servers in zip(models.items(), found):
            complete = not missing_blocks(servers, 0, record.num_blocks)
            base = Entry(record.name, record.name, prefix, record, complete, created=now)
            entries[base.id] = base
            adapters = {a for by_peer in servers.values() for r in by_peer.values()
                        if r.state == ServerState.ONLINE for a in r.adapters}
            for adapter in sorted(adapters):
                holders = {b: {p: r for p, r in by_peer.items() if adapter in r.adapters}
                           for b, by_peer in servers.items()}
                entries[f"{record.name}:{adapter}"] = Entry(f"{record.name}:{adapter}", record.name, prefix, record,
                                                            not missing_blocks(holders, 0, record.num_blocks),
                                                            adapter=adapter, created=now)
        if self.config.model:
            wanted = set(self.config.model)
            entries = {i: e for i, e in entries.items() if i in wanted or e.base in wanted}
        for name, (path, base_name) in self._client_adapters.items():
            base = next((e for e in entries.values() if not e.adapter and base_name in (e.id, e.prefix,
                                                                                         os.path.basename(e.id))),
                        None)
            if base is not None:
                entries[name] = dataclasses.replace(base, id=name, adapter_path=path)
        return entries

    async def entry(self, model_id: str) -> Entry:
        entries = await self.entries()
        if model_id not in entries and time.monotonic() - self._listed_at > 1.0:
            entries = await self.entries(fresh=True)  # it may have joined since the last listing
        if model_id not in entries:
            if model_id in self._client_adapters:
                raise ApiError(404, f"model {model_id!r} is an adapter of {self._client_adapters[model_id][1]!r}, "
                                    "which the swarm does not serve now", param="model", code="model_not_found")
            known = ", ".join(sorted(entries)[:20]) or "none"
            raise ApiError(404, f"model {model_id!r} is not served here; GET /v1/models lists the models "
                                f"(now: {known})", param="model", code="model_not_found")
        return entries[model_id]

    async def served(self, model_id: str) -> Served:
        """The loaded model for ``model_id`` (404 if the swarm does not serve it); loads it on first use."""
        entry = await self.entry(model_id)
        if model_id in self._served:
            return self._served[model_id]
        lock = self._load_locks.setdefault(model_id, asyncio.Lock())
        async with lock:
            if model_id not in self._served:
                loop = asyncio.get_running_loop()
                try:
                    self._served[model_id] = await loop.run_in_executor(self.executor, self._load, entry)
                except (OSError, ValueError, SwarmError) as e:  # no checkpoint or tokenizer here, or not a model
                    logger.error("Cannot load %s: %s", model_id, e)
                    raise ApiError(503, f"this API cannot load the embeddings, head and tokenizer of {entry.base!r} "
                                        f"({type(e).__name__}: {e}); the machine running `swarm api` needs the "
                                        "model's checkpoint (a hub id it can download, or the same local path)",
                                   code="model_unavailable") from None
        return self._served[model_id]

    def _load(self, entry: Entry) -> Served:
        """Loads a model id (on the executor thread): the base once, then the variant's sequence."""
        from transformers import AutoTokenizer, GenerationConfig

        from client.model import AutoDistributedModelForCausalLM

        kwargs = dict(initial_peers=self.config.initial_peers, dtype=self.config.dtype, dht_prefix=entry.prefix,
                      host_maddrs=self.config.host_maddrs, request_timeout=self.config.request_timeout,
                      swarm_key=self.config.swarm_key)
        if entry.base not in self._bases:
            logger.info("Loading the embeddings and head of %s", entry.base)
            model = AutoDistributedModelForCausalLM.from_pretrained(entry.base, **kwargs)
            gguf = gguf_location(entry.base, None)  # as the client found it: a GGUF is a directory or repo + file
            if gguf is not None:
                tokenizer = AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1])
            else:
                tokenizer = AutoTokenizer.from_pretrained(entry.base)
            eos = _ids(model.config.eos_token_id) | _ids(tokenizer.eos_token_id)
            try:  # a GGUF keeps its generation settings in its metadata, read into the config above
                eos |= _ids(GenerationConfig.from_pretrained(entry.base).eos_token_id) if gguf is None else set()
            except OSError:  # no generation_config.json
                pass
            self._bases[entry.base] = (LocalModel(model), tokenizer, eos, model.remote)
        local, tokenizer, eos, sequence = self._bases[entry.base]
        if entry.adapter or entry.adapter_path:
            logger.info("Loading adapter %s of %s", entry.adapter or entry.adapter_path, entry.base)
            extra = {"active_adapter": entry.adapter} if entry.adapter else {"adapter": entry.adapter_path}
            variant = AutoDistributedModelForCausalLM.from_pretrained(entry.base, **kwargs, **extra)
            sequence = variant.remote  # its tuning goes with every session; its local copy is not used
            self._variants.append(sequence)
        config = local.model.config
        max_positions = getattr(config, "max_position_embeddings", None)
        return Served(entry, local, sequence, tokenizer, eos, detect_format(getattr(tokenizer, "chat_template", None)),
                      max_positions if isinstance(max_positions, int) and max_positions > 0 else None)

    async def max_total_tokens(self, served: Served) -> tuple[int, str]:
        """The most tokens (prompt + completion) one session may hold now, and what sets that limit.

        Raises :class:`MissingBlocksError` (503) naming the blocks no online server holds.
        """
        servers = await served.sequence.servers()
        if served.entry.adapter:
            servers = {b: {p: r for p, r in by_peer.items() if served.entry.adapter in r.adapters}
                       for b, by_peer in servers.items()}
        num_blocks = served.entry.record.num_blocks
        missing = missing_blocks(servers, 0, num_blocks, served.sequence.bans.banned(time.monotonic()))
        if missing:
            servers = await served.sequence.servers(force=True)  # the cached view may be stale
            missing = missing_blocks(servers, 0, num_blocks)
        if missing:
            raise MissingBlocksError(f"blocks {format_blocks(missing)} of {served.entry.id!r} have no online server "
                                     f"now; start servers for them (`swarm serve --model {served.entry.base} "
                                     f"--blocks {format_blocks(missing).split(',')[0]}`) or retry later")
        limit = min(max((r.max_session_length for r in by_peer.values() if r.state == ServerState.ONLINE),
                        default=0) for by_peer in servers.values())
        reason = "the servers' --max-session-length"
        if served.max_positions is not None and served.max_positions < limit:
            limit, reason = served.max_positions, "the model's max_position_embeddings"
        return limit, reason

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        sequences = [s for _, _, _, s in self._bases.values()] + self._variants
        for sequence in sequences:
            try:
                await asyncio.wait_for(sequence.shutdown(), 10)
            except Exception as e:  # shutting down anyway; the peer's p2pd is stopped with its process group
                logger.warning("Stopping a model's DHT peer failed: %s", e)


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple)):
        return {v for v in value if isinstance(v, int)}
    return set()


def _adapter_base(path: str) -> str:
    """The base model a saved adapter was trained on (``base_model_name_or_path`` of its config)."""
    config_path = os.path.join(path, "adapter_config.json")
    try:
        with open(config_path) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ConfigError(f"--adapter {path!r}: cannot read {config_path} ({e}); pass a directory that "
                          "`swarm finetune` or model.save_adapter() wrote") from None
    if not isinstance(base, str) or not base:
        raise ConfigError(f"--adapter {path!r}: its adapter_config.json names no base_model_name_or_path")
    return base
