"""``swarm download MODEL --blocks A:B``: fetch on a node with network what a server (or a client) needs,
so that nodes without it (HPC compute nodes) serve from the hub cache with ``HF_HUB_OFFLINE=1``.

It downloads the config, the checkpoint index, and only the shard files that hold the span's blocks
(``--client``: also the embeddings, final norm and LM head, and the tokenizer files), through
``huggingface_hub`` into its cache (``--cache-dir`` or ``$HF_HOME``), the same cache ``swarm serve``
reads. A shard holding blocks of both spans is fetched once.
"""

from __future__ import annotations

import dataclasses
import os

from swarm.command_config import DownloadConfig
from swarm.config import parse_span
from swarm.errors import ModelError
from swarm.models import family_of, load_config
from swarm.weights import Checkpoint, outside_blocks

# files a client's tokenizer and generation config come from (each is optional in a repository)
CLIENT_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


@dataclasses.dataclass(frozen=True)
class Downloaded:
    start: int
    end: int
    num_blocks: int
    shards: tuple[str, ...]  # local paths of the shard files this node will read
    total_shards: int  # shard files of the whole checkpoint
    extra_files: tuple[str, ...] = ()  # the client's tokenizer/generation files found

    @property
    def shard_bytes(self) -> int:
        return sum(os.path.getsize(path) for path in self.shards)


def download(config: DownloadConfig) -> Downloaded:
    """Fetches what serving ``config.blocks`` (and, with ``client``, using the model) needs; returns what it has."""
    hub = dict(revision=config.revision, cache_dir=config.cache_dir, token=config.token)
    model_config = load_config(config.model, trust_remote_code=config.trust_remote_code, **hub)
    num_blocks = model_config.num_hidden_layers
    start, end = parse_span(config.blocks, num_blocks) if config.blocks else (0, num_blocks)
    prefix = family_of(model_config).block_prefix
    checkpoint = Checkpoint(config.model, **hub)
    names = checkpoint.block_names(prefix, range(start, end))
    if len(checkpoint.block_names(prefix, [start])) == 0:
        raise ModelError(f"checkpoint {config.model!r} has no tensors for block {start} (expected names starting "
                         f"with {prefix.format(start)!r})")
    if config.client:
        names += outside_blocks(checkpoint.weight_map, prefix)
    shards = checkpoint.fetch(names)
    extra: list[str] = []
    if config.client and not checkpoint.is_local:
        extra = [path for name in CLIENT_FILES if (path := checkpoint.fetch_file(name, required=False))]
    return Downloaded(start, end, num_blocks, tuple(shards), len(set(checkpoint.weight_map.values())), tuple(extra))


def offline_command(config: DownloadConfig, result: Downloaded) -> str:
    """The ``swarm serve`` line that serves what was downloaded on a node without network."""
    parts = ["HF_HUB_OFFLINE=1 swarm serve --model", config.model, "--blocks", f"{result.start}:{result.end}"]
    if config.cache_dir:
        parts += ["--cache-dir", config.cache_dir]
    if config.revision:
        parts += ["--revision", config.revision]
    return " ".join(parts)


def run_download(config: DownloadConfig) -> int:
    result = download(config)
    where = config.cache_dir or "the huggingface_hub cache ($HF_HOME)"
    what = f"blocks {result.start}:{result.end} of {result.num_blocks}" + (" and the client's parts" if config.client
                                                                          else "")
    print(f"Have {what} of {config.model}: {len(result.shards)} of {result.total_shards} shard file(s), "
          f"{result.shard_bytes / 2**20:.1f} MiB, in {where}", flush=True)
    if result.extra_files:
        print(f"  and {len(result.extra_files)} tokenizer/generation file(s)", flush=True)
    print("On a node without network, serve them with:", flush=True)
    print(f"  {offline_command(config, result)}", flush=True)
    return 0
