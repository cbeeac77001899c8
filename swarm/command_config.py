"""The configs of the commands around serving: ``swarm health``, ``verify``, ``finetune``, ``api``,
``doctor``, ``download`` and ``slurm`` (the servers', DHT peers' and clients' are in :mod:`swarm.config`).

Like those, one frozen dataclass per command; the CLI flags are derived from their fields.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from swarm.config import INITIAL_PEERS_ENV, doc, env_initial_peers, parse_span, swarm_key_flag
from swarm.errors import ConfigError
from swarm.first_contact import GGUF_SUFFIX, check_maddrs, check_model_source, check_swarm_key


def _swarm_peers(which: str) -> Any:
    """The ``--initial-peers`` field of a command that joins an existing swarm (it cannot start one)."""
    return dataclasses.field(default_factory=env_initial_peers, metadata=doc(
        f"multiaddrs of peers of the swarm {which} (default: ${INITIAL_PEERS_ENV})", nargs="+"))


def _check_swarm_peers(command: str, initial_peers: tuple[str, ...]) -> None:
    if not initial_peers:
        raise ConfigError(f"{command} needs --initial-peers (or ${INITIAL_PEERS_ENV}): the multiaddrs that "
                          "`swarm serve` or `swarm dht` printed")
    check_maddrs("--initial-peers", initial_peers)


def _check_listen(host: str, port: int) -> None:
    """The address an HTTP role (health page, API) listens on."""
    if not host:
        raise ConfigError("--host must be an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    if not 0 <= port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port (0..65535; 0 picks a free one)")


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    """``swarm health``: a DHT client that crawls the swarm and serves its state over HTTP."""

    initial_peers: tuple[str, ...] = _swarm_peers("to watch")
    host: str = dataclasses.field(
        default="127.0.0.1", metadata=doc("address the web page listens on (0.0.0.0 to show it to your network)"))
    port: int = dataclasses.field(default=8000, metadata=doc("TCP port of the web page (0: any free port)"))
    host_maddrs: tuple[str, ...] = dataclasses.field(
        default=("/ip4/0.0.0.0/tcp/0",), metadata=doc("multiaddrs the DHT client listens on", nargs="+"))
    refresh_period: float = dataclasses.field(
        default=15.0, metadata=doc("seconds between crawls of the DHT (the page polls as often)"))
    probe_timeout: float = dataclasses.field(
        default=5.0, metadata=doc("seconds a server has to answer the info probe before it counts as unreachable"))
    probe_cache_ttl: float = dataclasses.field(
        default=30.0, metadata=doc("seconds /api/v1/is_reachable reuses a probe result (every crawl asks each "
                                     "server again)"))
    max_probes: int = dataclasses.field(default=32, metadata=doc("probes in flight at once"))
    show_ips: bool = dataclasses.field(
        default=False, metadata=doc("show the network addresses of servers on the page and in the JSON"))
    swarm_key: str | None = swarm_key_flag()

    def __post_init__(self) -> None:
        _check_swarm_peers("swarm health", self.initial_peers)
        check_swarm_key(self.swarm_key)
        _check_listen(self.host, self.port)
        for name in ("refresh_period", "probe_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.probe_cache_ttl >= 0:
            raise ConfigError(f"--probe-cache-ttl must be >= 0 (0: probe on every request), got "
                              f"{self.probe_cache_ttl}")
        if self.max_probes < 1:
            raise ConfigError(f"--max-probes must be at least 1, got {self.max_probes}")
        if not self.host_maddrs:
            raise ConfigError("--host-maddrs needs at least one multiaddr, e.g. /ip4/0.0.0.0/tcp/0")


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
    """``swarm verify``: a volunteer checker that re-runs every server's work on another server (docs/faults.md)."""

    initial_peers: tuple[str, ...] = _swarm_peers("to check")
    model: str = dataclasses.field(default="", metadata=doc("hub id or local directory of the model whose "
                                                              "servers to check (its config is read)", required=True))
    dht_prefix: str | None = dataclasses.field(
        default=None, metadata=doc("DHT namespace of the model (default: the model's repository or dir name)"))
    rounds: int = dataclasses.field(
        default=1, metadata=doc("times to check every online server (0: until stopped, a round every --period)"))
    period: float = dataclasses.field(default=60.0, metadata=doc("seconds between the starts of rounds"))
    prompt_tokens: int = dataclasses.field(
        default=16, metadata=doc("random hidden states each session check starts with"))
    steps: int = dataclasses.field(default=8, metadata=doc("1-token inference steps each session check runs after"))
    request_timeout: float = dataclasses.field(
        default=60.0, metadata=doc("seconds a server has to answer one request"))
    host_maddrs: tuple[str, ...] = dataclasses.field(
        default=("/ip4/0.0.0.0/tcp/0",), metadata=doc("multiaddrs the checker's DHT client listens on", nargs="+"))

    def __post_init__(self) -> None:
        _check_swarm_peers("swarm verify", self.initial_peers)
        if not self.model:
            raise ConfigError("--model is required: the hub id or directory the servers were started with")
        for name in ("prompt_tokens", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.rounds < 0:
            raise ConfigError(f"--rounds must be >= 0 (0: until stopped), got {self.rounds}")
        for name in ("period", "request_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive seconds, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """``swarm finetune``: train a LoRA adapter for a swarm model on instruction data (docs/finetune.md)."""

    initial_peers: tuple[str, ...] = _swarm_peers("that serves --model")
    model: str = dataclasses.field(default="", metadata=doc("hub id or local directory of the model (its "
                                                              "tokenizer and chat template are used)", required=True))
    data: str = dataclasses.field(
        default="", metadata=doc("JSON or JSONL file of alpaca (instruction/input/output), sharegpt "
                                   "(conversations: from/value) or messages (role/content) examples", required=True))
    output: str = dataclasses.field(
        default="", metadata=doc("directory for checkpoints and the final adapter; a run finds its latest "
                                   "checkpoint there and resumes", required=True))
    dht_prefix: str | None = dataclasses.field(
        default=None, metadata=doc("DHT namespace of the model (default: the model's repository or dir name)"))
    max_length: int = dataclasses.field(
        default=1024, metadata=doc("tokens per example; longer examples are cut at the end"))
    epochs: int = dataclasses.field(default=1, metadata=doc("passes over the data"))
    max_steps: int | None = dataclasses.field(
        default=None, metadata=doc("optimizer steps to run, overriding --epochs"))
    lr: float = dataclasses.field(default=2e-4, metadata=doc("AdamW learning rate (constant)"))
    weight_decay: float = dataclasses.field(default=0.0, metadata=doc("AdamW weight decay"))
    gradient_accumulation: int = dataclasses.field(
        default=1, metadata=doc("examples per optimizer step (each runs as a batch of one)"))
    max_grad_norm: float = dataclasses.field(
        default=1.0, metadata=doc("clip the adapter's gradient norm to this (0: no clipping)"))
    seed: int = dataclasses.field(default=0, metadata=doc("seed of the data order and of LoRA's init and dropout"))
    save_every: int = dataclasses.field(
        default=50, metadata=doc("steps between checkpoints; a killed run loses at most this many"))
    keep_checkpoints: int = dataclasses.field(default=3, metadata=doc("how many of the latest checkpoints to keep"))
    lora_r: int = dataclasses.field(default=8, metadata=doc("LoRA rank"))
    lora_alpha: int = dataclasses.field(default=16, metadata=doc("LoRA alpha (scale = alpha / r)"))
    lora_dropout: float = dataclasses.field(default=0.05, metadata=doc("dropout on LoRA's input"))
    lora_target_modules: tuple[str, ...] = dataclasses.field(
        default=(), metadata=doc("names of the blocks' Linear modules to adapt (default: the attention's "
                                   "query and value projections, found in the model's block)", nargs="+"))
    chat_template: str | None = dataclasses.field(
        default=None, metadata=doc("file with a Jinja chat template to use instead of the tokenizer's (default: "
                                     "the tokenizer's, or a plain '### User:' template if it has none)"))
    dtype: str = dataclasses.field(
        default="float32", metadata=doc("dtype of the local embeddings/head and of the activations sent "
                                          "(float32, bfloat16 or float16)"))
    swarm_key: str | None = swarm_key_flag()

    def __post_init__(self) -> None:
        _check_swarm_peers("swarm finetune", self.initial_peers)
        check_swarm_key(self.swarm_key)
        for name, example in (("model", "Qwen/Qwen2.5-7B-Instruct"), ("data", "train.json"), ("output", "my-adapter")):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required, e.g. --{name} {example}")
        check_model_source(self.model)
        if self.model.endswith(GGUF_SUFFIX):  # its tokenizer and LoRA targets are read from config.json files
            raise ConfigError(f"--model {self.model!r}: swarm finetune does not read GGUF files; pass the model's "
                              "hub id or directory, and --dht-prefix with the prefix the servers of the GGUF "
                              "announce (`swarm models --initial-peers ...` lists it)")
        for name in ("max_length", "epochs", "gradient_accumulation", "save_every", "keep_checkpoints", "lora_r",
                     "lora_alpha"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be at least 1, got {self.max_steps}")
        if not 0 < self.lr < float("inf"):
            raise ConfigError(f"--lr must be a positive learning rate, e.g. 2e-4; got {self.lr}")
        if not 0 <= self.weight_decay < float("inf") or not 0 <= self.max_grad_norm < float("inf"):
            raise ConfigError("--weight-decay and --max-grad-norm must be >= 0")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype {self.dtype!r}: use float32, bfloat16 or float16")


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    """``swarm api``: an OpenAI-compatible HTTP API and a chat page over the models a swarm serves (docs/api.md)."""

    initial_peers: tuple[str, ...] = _swarm_peers("to serve")
    host: str = dataclasses.field(
        default="127.0.0.1", metadata=doc("address the API listens on (0.0.0.0 to offer it to your network)"))
    port: int = dataclasses.field(default=8080, metadata=doc("TCP port of the API (0: any free port)"))
    api_key: str | None = dataclasses.field(
        default=None, metadata=doc("require 'Authorization: Bearer KEY' on every /v1 request (default: open)"))
    model: tuple[str, ...] = dataclasses.field(
        default=(), metadata=doc("serve only these models (ids as GET /v1/models lists them; default: every "
                                   "model the swarm serves)", nargs="+"))
    adapter: tuple[str, ...] = dataclasses.field(
        default=(), metadata=doc("client-side LoRA adapters (saved by `swarm finetune`) to serve as extra model "
                                   "ids, as NAME=PATH; the base model is the one the adapter was trained on",
                                   nargs="+"))
    max_concurrent: int = dataclasses.field(
        default=16, metadata=doc("generations running at once; later requests wait for a free slot"))
    default_max_tokens: int = dataclasses.field(
        default=512, metadata=doc("tokens to generate when a request gives no max_tokens (a session routes to "
                                    "servers with free cache for its prompt plus this)"))
    dtype: str = dataclasses.field(
        default="float32", metadata=doc("dtype of the local embeddings/head and of the activations sent "
                                          "(float32, bfloat16 or float16)"))
    host_maddrs: tuple[str, ...] = dataclasses.field(
        default=("/ip4/0.0.0.0/tcp/0",), metadata=doc("multiaddrs the API's DHT client listens on", nargs="+"))
    request_timeout: float = dataclasses.field(
        default=60.0, metadata=doc("seconds one inference step through the swarm may take before it is retried "
                                     "elsewhere"))
    swarm_key: str | None = swarm_key_flag()

    def __post_init__(self) -> None:
        _check_swarm_peers("swarm api", self.initial_peers)
        check_swarm_key(self.swarm_key)
        _check_listen(self.host, self.port)
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key must not be empty; leave it out to serve without a key")
        for name in ("max_concurrent", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype {self.dtype!r}: use float32, bfloat16 or float16")
        if not self.request_timeout > 0:
            raise ConfigError(f"--request-timeout must be positive seconds, got {self.request_timeout}")
        if not self.host_maddrs:
            raise ConfigError("--host-maddrs needs at least one multiaddr, e.g. /ip4/0.0.0.0/tcp/0")
        self.adapter_paths()

    def adapter_paths(self) -> dict[str, str]:
        """``--adapter NAME=PATH ...`` as ``{name: path}``."""
        adapters: dict[str, str] = {}
        for item in self.adapter:
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ConfigError(f"--adapter {item!r} is not NAME=PATH, e.g. --adapter my-bot=./my-adapter")
            if name in adapters:
                raise ConfigError(f"--adapter names {name!r} twice")
            adapters[name.strip()] = path.strip()
        return adapters


@dataclasses.dataclass(frozen=True)
class DoctorConfig:
    """``swarm doctor``: what this machine can serve with, and the fix for every mismatch."""

    initial_peers: tuple[str, ...] = dataclasses.field(
        default_factory=env_initial_peers,
        metadata=doc(f"multiaddrs of swarm peers to try to reach (default: ${INITIAL_PEERS_ENV})", nargs="*"))
    device: str = dataclasses.field(default="auto", metadata=doc("the --device that `swarm serve` would get"))
    json: bool = dataclasses.field(default=False, metadata=doc("print one JSON document instead of the report"))
    timeout: float = dataclasses.field(
        default=10.0, metadata=doc("seconds each check may take (p2pd start, each peer, each matmul)"))

    def __post_init__(self) -> None:
        check_maddrs("--initial-peers", self.initial_peers)
        if not 0 < self.timeout < float("inf"):
            raise ConfigError(f"--timeout must be positive seconds, got {self.timeout}")


@dataclasses.dataclass(frozen=True)
class DownloadConfig:
    """``swarm download MODEL``: fetch a span's weights on a node with network, for nodes without it."""

    model: str = dataclasses.field(default="", metadata=doc("hub id of the model (e.g. Qwen/Qwen2.5-7B-Instruct)"))
    blocks: str | None = dataclasses.field(
        default=None, metadata=doc("span to fetch as START:END, END exclusive, the --blocks the offline server "
                                     "will serve (default: every block)"))
    client: bool = dataclasses.field(
        default=False, metadata=doc("also fetch what a client reads: embeddings, final norm, LM head, tokenizer"))
    revision: str | None = dataclasses.field(default=None, metadata=doc("hub revision (branch, tag or commit)"))
    cache_dir: str | None = dataclasses.field(
        default=None, metadata=doc("hub cache directory (default: huggingface_hub's, $HF_HOME); pass the same "
                                     "--cache-dir to `swarm serve` on the offline node"))
    token: str | None = dataclasses.field(default=None, metadata=doc("hub access token for gated models"))
    trust_remote_code: bool = dataclasses.field(
        default=False, metadata=doc("allow models that ship their own modeling code (as `swarm serve` needs)"))

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("swarm download needs a model: a hub id, e.g. swarm download Qwen/Qwen2.5-7B-Instruct "
                              "--blocks 0:14")
        if self.blocks is not None:
            parse_span(self.blocks)


@dataclasses.dataclass(frozen=True)
class SlurmConfig:
    """``swarm slurm [flags] -- [swarm serve flags]``: servers as Slurm batch jobs (docs/hpc.md)."""

    array: int = dataclasses.field(
        default=1, metadata=doc("how many servers: a job array of this many tasks, each a server that places "
                                  "itself in the swarm"))
    time: str = dataclasses.field(default="04:00:00", metadata=doc("walltime of each job (sbatch --time)"))
    partition: str | None = dataclasses.field(default=None, metadata=doc("Slurm partition (sbatch --partition)"))
    gres: str | None = dataclasses.field(
        default=None, metadata=doc("devices per server, as your site names them: gpu:1, gpu:a100:1, dcu:1, npu:1"))
    cpus_per_task: int | None = dataclasses.field(default=None, metadata=doc("CPU cores per server"))
    mem: str | None = dataclasses.field(default=None, metadata=doc("RAM per server (sbatch --mem, e.g. 64G)"))
    job_name: str = dataclasses.field(default="swarm", metadata=doc("job name (squeue shows it)"))
    modules: tuple[str, ...] = dataclasses.field(
        default=(), metadata=doc("environment modules to load first, e.g. --modules cuda/12.4 pytorch/2.5",
                                   nargs="+"))
    env_file: str | None = dataclasses.field(
        default=None, metadata=doc("a shell file of VAR=value lines sourced before serving (e.g. HF_HUB_OFFLINE=1, "
                                     "SWARM_INITIAL_PEERS=...)"))
    output: str | None = dataclasses.field(
        default=None, metadata=doc("the job's log file (sbatch --output; default JOB_NAME-%%j.out, or "
                                     "JOB_NAME-%%A_%%a.out for arrays)"))
    swarm: str | None = dataclasses.field(
        default=None, metadata=doc("the command that runs swarm on the compute node (default: this Python: "
                                     "PYTHON -m swarm.cli)"))
    sbatch_args: tuple[str, ...] = dataclasses.field(
        default=(), metadata=doc("more sbatch options, one per value, e.g. --sbatch-args --account=proj42 "
                                   "--qos=low", nargs="+"))
    script: str = dataclasses.field(default="swarm-serve.sbatch", metadata=doc("where to write the sbatch script"))
    submit: bool = dataclasses.field(default=True, metadata=doc("submit the script with sbatch (--no-submit: "
                                                                  "only write it)"))

    def __post_init__(self) -> None:
        if self.array < 1:
            raise ConfigError(f"--array must be at least 1 server, got {self.array}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ConfigError(f"--cpus-per-task must be at least 1, got {self.cpus_per_task}")
        for name in ("time", "partition", "gres", "mem", "job_name", "output"):  # each becomes one #SBATCH line
            value = getattr(self, name)
            if value is not None and (not value or re.search(r"\s", value)):
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} must be one word without spaces")
        for name in ("modules", "sbatch_args", "swarm", "env_file", "script"):
            value = getattr(self, name)
            if value is not None and any("\n" in v or "\r" in v for v in ((value,) if isinstance(value, str) else value)):
                raise ConfigError(f"--{name.replace('_', '-')} must not contain line breaks")
        for arg in self.sbatch_args:
            if not arg.startswith("-"):
                raise ConfigError(f"--sbatch-args {arg!r}: give sbatch options, e.g. --account=proj42")
