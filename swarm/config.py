"""One frozen config dataclass per component; the CLI flags are derived from their fields.

Each field's ``metadata`` holds its help text (and optionally ``flag``/``nargs``), so every default
and help string exists once. Validation lives in ``__post_init__`` and names the flag to change.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TYPE_CHECKING, Any

from swarm.errors import ConfigError
from swarm.first_contact import GGUF_SUFFIX, check_maddrs, check_model_source, check_swarm_key

if TYPE_CHECKING:
    from swarm.retry import RetryPolicy

INITIAL_PEERS_ENV = "SWARM_INITIAL_PEERS"
QUANT_SCHEMES = ("none", "int8", "nf4")  # how a server stores its blocks' Linear weights (swarm.quant)
MAX_UPDATE_PERIOD = 300.0  # records live 2.5x this; peers refuse records living over 900 s (swarm.signed_records)


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


def env_initial_peers() -> tuple[str, ...]:
    return tuple(p for p in re.split(r"[\s,]+", os.environ.get(INITIAL_PEERS_ENV, "")) if p)


def parse_span(text: str, num_blocks: int | None = None) -> tuple[int, int]:
    """``"START:END"`` -> (start, end), end exclusive; checks bounds against ``num_blocks`` if given."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not match:
        raise ConfigError(f"--blocks {text!r} is not START:END (e.g. 0:16; END is exclusive)")
    start, end = int(match[1]), int(match[2])
    if start >= end:
        raise ConfigError(f"--blocks {text!r}: START must be less than END")
    if num_blocks is not None and end > num_blocks:
        raise ConfigError(f"--blocks {text!r}: the model has {num_blocks} blocks (0:{num_blocks})")
    return start, end


_HUB_SNAPSHOT = re.compile(r"models--(?:[^/\\]+--)?([^/\\]+)[/\\]snapshots[/\\][^/\\]+[/\\]?$")


def _swarm_key_flag() -> Any:
    return dataclasses.field(default=None, metadata=_help(
        "key file of a private swarm (make one with `swarm keygen FILE`); peers without it can neither read nor "
        "write the swarm's DHT nor open streams to its servers (docs/security.md)"))


def default_prefix(model: str) -> str:
    """The DHT namespace of a model: its repository or directory name, e.g. ``Qwen2.5-7B-Instruct``, or
    its GGUF file name (``SmolLM2-135M-Instruct.Q4_1.gguf``), wherever that file lies (a snapshot in the
    hub cache, ``.../models--Qwen--Qwen2.5-7B-Instruct/snapshots/<rev>``, is its repository's)."""
    snapshot = _HUB_SNAPSHOT.search(model)
    name = snapshot[1] if snapshot else os.path.basename(os.path.normpath(model)) or model
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


@dataclasses.dataclass(frozen=True)
class NetworkFlags:
    initial_peers: tuple[str, ...] = dataclasses.field(
        default_factory=env_initial_peers,
        metadata=_help(f"multiaddrs of peers to join (default: ${INITIAL_PEERS_ENV}); none starts a new swarm",
                       nargs="*"))
    host_maddrs: tuple[str, ...] = dataclasses.field(
        default=(), metadata=_help("multiaddrs to listen on (default: all interfaces, --port or a free port)",
                                   nargs="+"))
    announce_maddrs: tuple[str, ...] = dataclasses.field(
        default=(), metadata=_help("multiaddrs others should use to reach this peer (e.g. a public IP)", nargs="+"))
    port: int | None = dataclasses.field(default=None, metadata=_help("TCP port: shorthand for --host-maddrs "
                                                                      "/ip4/0.0.0.0/tcp/PORT"))
    identity_path: str | None = dataclasses.field(
        default=None, metadata=_help("file with this peer's private key (created if missing) for a stable peer id"))
    use_relay: bool = dataclasses.field(
        default=True, metadata=_help("reach peers behind NATs/firewalls through libp2p circuit relays"))
    use_auto_relay: bool = dataclasses.field(
        default=False, metadata=_help("behind a NAT/firewall yourself: find relays and become reachable through them"))
    swarm_key: str | None = _swarm_key_flag()

    def listen_maddrs(self) -> tuple[str, ...]:
        if self.host_maddrs:
            return self.host_maddrs
        return (f"/ip4/0.0.0.0/tcp/{self.port or 0}",)

    def check_network(self) -> None:
        check_maddrs("--initial-peers", self.initial_peers)
        check_maddrs("--announce-maddrs", self.announce_maddrs, full=False)
        check_swarm_key(self.swarm_key)
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port (1..65535)")
        if self.port is not None and self.host_maddrs:
            raise ConfigError("give either --port or --host-maddrs, not both")


@dataclasses.dataclass(frozen=True)
class DHTConfig(NetworkFlags):
    """``swarm dht``: a bootstrap-only peer."""

    def __post_init__(self) -> None:
        self.check_network()


@dataclasses.dataclass(frozen=True)
class ServerConfig(NetworkFlags):
    """``swarm serve``: one server holding a span of blocks."""

    model: str = dataclasses.field(
        default="", metadata=_help("hub id or local directory of the model, or a GGUF file (x.gguf)", flag="--model",
                                   required=True))
    gguf_file: str | None = dataclasses.field(
        default=None, metadata=_help("a GGUF file in --model (a local directory or hub repository) to serve, "
                                     "e.g. --model ORG/REPO-GGUF --gguf-file model.Q4_K_M.gguf"))
    blocks: str | None = dataclasses.field(
        default=None, metadata=_help("span to serve as START:END, END exclusive (default: --num-blocks blocks "
                                     "placed where the swarm is weakest, moved when it becomes lopsided)"))
    num_blocks: int | None = dataclasses.field(
        default=None, metadata=_help("how many blocks to hold when --blocks is not given (default: as many as fit "
                                     "the device's memory with their KV cache, at most the model's)"))
    device: str = dataclasses.field(
        default="auto", metadata=_help("auto, cpu, cuda, cuda:1 (NVIDIA; AMD/Hygon on a ROCm build: rocm, dcu), npu "
                                       "(Ascend), xpu, mps; auto never falls back to the CPU while a GPU is present "
                                       "(`swarm doctor` says why)"))
    dtype: str = dataclasses.field(
        default="auto", metadata=_help("auto, float32, bfloat16 or float16 (auto: checkpoint dtype on "
                                       "accelerators, float32 on cpu)"))
    quant: str = dataclasses.field(
        default="none", metadata=_help("store the blocks' Linear weights quantized, each block as it loads: int8 "
                                       "(~0.5x of bfloat16) or nf4 (4-bit NormalFloat, ~0.28x); none keeps --dtype",
                                       choices=QUANT_SCHEMES))
    public_name: str = dataclasses.field(default="", metadata=_help("a name shown on the health page"))
    cache_tokens: int = dataclasses.field(
        default=16384, metadata=_help("KV cache budget: tokens (summed over sessions and their batch) this server "
                                      "keeps for every block of its span"))
    max_session_length: int = dataclasses.field(
        default=8192, metadata=_help("the most tokens one inference session may hold"))
    batching: bool = dataclasses.field(
        default=True, metadata=_help("run the inference steps of concurrent sessions as one batched forward "
                                     "(--no-batching: one session's step at a time)"))
    max_batch_tokens: int = dataclasses.field(
        default=512, metadata=_help("the most tokens (rows x new tokens) one inference forward runs; a longer step "
                                    "(a long prompt) runs in chunks of this size, so other sessions' steps wait at "
                                    "most for one chunk"))
    max_batch_size: int = dataclasses.field(default=64, metadata=_help("the largest batch one request may carry"))
    max_forward_tokens: int = dataclasses.field(
        default=65536, metadata=_help("the most tokens (batch x length) one forward request may carry"))
    dht_prefix: str | None = dataclasses.field(
        default=None, metadata=_help("DHT namespace of the model (default: the model's repository or dir name); "
                                     "clients and `swarm finetune` pass the same --dht-prefix / dht_prefix="))
    prefix: str | None = dataclasses.field(
        default=None, metadata=_help("deprecated spelling of --dht-prefix"))
    revision: str | None = dataclasses.field(default=None, metadata=_help("hub revision (branch, tag or commit)"))
    cache_dir: str | None = dataclasses.field(default=None, metadata=_help("hub cache directory"))
    token: str | None = dataclasses.field(default=None, metadata=_help("hub access token for gated models"))
    update_period: float = dataclasses.field(
        default=60.0, metadata=_help("seconds between re-announcements in the DHT (records live 2.5x this)"))
    session_timeout: float = dataclasses.field(
        default=300.0, metadata=_help("an inference session idle this many seconds is closed and its cache freed"))
    idle_timeout: float = dataclasses.field(
        default=60.0, metadata=_help("a stream that brings no request, or whose client reads no answer, for this "
                                     "many seconds is closed (server-to-server push streams too: keep it above the "
                                     "20 s for which senders reuse an idle push stream)"))
    forward_chunk_tokens: int = dataclasses.field(
        default=2048, metadata=_help("a forward request of more tokens runs in chunks of this many, block by block, "
                                     "so inference steps wait at most for one chunk"))
    max_streams_per_peer: int = dataclasses.field(
        default=128, metadata=_help("the most streams one peer may hold open to this server"))
    max_sessions_per_peer: int = dataclasses.field(
        default=64, metadata=_help("the most inference sessions one peer may hold open on this server"))
    max_jobs_per_peer: int = dataclasses.field(
        default=4, metadata=_help("the most forward/backward passes of one peer queued or running here"))
    peer_cache_share: float = dataclasses.field(
        default=0.5, metadata=_help("the share of the KV cache (--cache-tokens) one peer's sessions may hold"))
    num_threads: int | None = dataclasses.field(
        default=None, metadata=_help("torch CPU threads for compute (default: torch's choice)"))
    throughput: float | None = dataclasses.field(
        default=None, metadata=_help("tokens/s per block this server offers the swarm (default: measured once on "
                                     "the loaded blocks and cached in $SWARM_CACHE_DIR or ~/.cache/swarm)"))
    remeasure_throughput: bool = dataclasses.field(
        default=False, metadata=_help("measure the throughput again and replace the cached value (e.g. if it was "
                                      "measured while the machine was busy)"))
    network_rps: float | None = dataclasses.field(
        default=None, metadata=_help("tokens/s this server's network link carries; caps the offered throughput "
                                     "(default: not limiting; never measured)"))
    balance_quality: float = dataclasses.field(
        default=1.3, metadata=_help("without --blocks, move only if the swarm's slowest block would get this many "
                                    "times faster (or a block without servers would get one)"))
    rebalance_period: float = dataclasses.field(
        default=120.0, metadata=_help("without --blocks, mean seconds between checks whether to move (jittered)"))
    trust_remote_code: bool = dataclasses.field(
        default=False, metadata=_help("run the modeling code a model repository ships (only for repositories you "
                                      "trust); without it such models are refused"))
    adapters: tuple[str, ...] = dataclasses.field(
        default=(), metadata=_help("PEFT LoRA adapters to preload, as PATH or NAME=PATH; clients select one by "
                                   "name (from_pretrained(..., active_adapter=NAME))", nargs="+"))
    max_backward_tokens: int = dataclasses.field(
        default=8192, metadata=_help("the most tokens (batch x length) one backward (training) request may carry"))
    max_lora_rank: int = dataclasses.field(default=128, metadata=_help("the largest LoRA rank a request may send"))
    max_adapter_mb: float = dataclasses.field(
        default=256.0, metadata=_help("the most MiB of LoRA weights one request may send for its blocks"))
    leave_before: float = dataclasses.field(
        default=120.0, metadata=_help("in a Slurm job: seconds before its time limit at which the server announces "
                                      "OFFLINE and takes no new sessions; open sessions go on for half of this, then "
                                      "move to other servers, and the server exits"))

    def __post_init__(self) -> None:
        self.check_network()
        if not self.model:
            raise ConfigError("--model is required: a hub id (e.g. Qwen/Qwen2.5-7B-Instruct) or a local directory")
        check_model_source(self.model, gguf_file=self.gguf_file)
        if self.prefix is not None and self.dht_prefix is not None and self.prefix != self.dht_prefix:
            raise ConfigError(f"--prefix {self.prefix!r} and --dht-prefix {self.dht_prefix!r} disagree; give "
                              "--dht-prefix only (--prefix is its old spelling)")
        # one resolved namespace from here on: servers, clients and health all say dht_prefix
        object.__setattr__(self, "dht_prefix",
                           self.dht_prefix or self.prefix or default_prefix(self.gguf_file or self.model))
        if self.blocks is not None:
            parse_span(self.blocks)
        if self.quant not in QUANT_SCHEMES:
            raise ConfigError(f"--quant {self.quant!r} is not one of {', '.join(QUANT_SCHEMES)}")
        for name in ("cache_tokens", "max_session_length", "max_batch_size", "max_forward_tokens",
                     "max_backward_tokens", "max_lora_rank", "max_adapter_mb", "max_batch_tokens",
                     "forward_chunk_tokens", "max_streams_per_peer", "max_sessions_per_peer", "max_jobs_per_peer"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (self.update_period > 0 and self.session_timeout > 0 and self.idle_timeout > 0):
            raise ConfigError("--update-period, --session-timeout and --idle-timeout must be positive")
        if self.update_period > MAX_UPDATE_PERIOD:
            raise ConfigError(f"--update-period {self.update_period} is over {MAX_UPDATE_PERIOD:.0f}s: records would "
                              "live longer than other peers accept")
        if not 0 < self.peer_cache_share <= 1:
            raise ConfigError(f"--peer-cache-share must be in (0, 1], got {self.peer_cache_share}")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ConfigError(f"--num-threads must be positive, got {self.num_threads}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError(f"--num-blocks must be positive, got {self.num_blocks}")
        if self.num_blocks is not None and self.blocks is not None:
            raise ConfigError("give either --blocks (a fixed span) or --num-blocks (placed automatically), not both")
        for name in ("throughput", "network_rps"):
            value = getattr(self, name)
            if value is not None and not 0 < value < float("inf"):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive, finite tokens/s, got {value}")
        if not self.balance_quality >= 1.0:
            raise ConfigError(f"--balance-quality must be >= 1.0 (the improvement a move needs), "
                              f"got {self.balance_quality}")
        if not self.rebalance_period > 0:
            raise ConfigError(f"--rebalance-period must be positive seconds, got {self.rebalance_period}")
        if not 0 < self.leave_before < float("inf"):
            raise ConfigError(f"--leave-before must be positive seconds, got {self.leave_before}")
        if self.remeasure_throughput and self.throughput is not None:
            raise ConfigError("give either --throughput (published as given) or --remeasure-throughput, not both")

    @property
    def model_name(self) -> str:
        """What the model index and rpc_info call the model: --model, with --gguf-file if given."""
        return f"{self.model.rstrip('/')}/{self.gguf_file}" if self.gguf_file else self.model


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """How a client finds and talks to servers (``from_pretrained(..., **fields)`` sets them)."""

    initial_peers: tuple[str, ...] = dataclasses.field(default_factory=env_initial_peers)
    dht_prefix: str | None = None
    connect_timeout: float = 15.0  # seconds to wait for a server to open a stream
    request_timeout: float = 60.0  # seconds one forward or inference step may take
    missing_blocks_timeout: float = 10.0  # how long to wait for servers of missing blocks before failing
    # seconds one forward, backward or inference step may spend retrying elsewhere after servers fail
    # (retryable errors only; swarm.retry.RetryPolicy)
    retry_deadline: float = 300.0
    routing_refresh: float = 5.0  # seconds a DHT lookup of the model's servers is reused
    use_push: bool = True  # servers pass step outputs straight to the next server of the chain
    # concurrent plain steps of this client's sessions to one server go in one frame (client.step_frames)
    step_frames: bool = True
    # with push, servers also send each output back to the client (off: an acknowledgement; a server keeps its
    # outputs and the client fetches them only when the next server fails). None: echo only while verify_rate > 0
    # (a check needs what a span got and gave, as the client saw it)
    push_echo: bool | None = None
    # hidden states on slow links (swarm.compression): "auto" (16-bit where a step's states would take
    # >= 2 ms to cross, exact elsewhere), "none", "float16", "bfloat16", or "int8" (8-bit where 16-bit is still slow)
    compression: str = "auto"
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    # the quant schemes (ServerRecord.quant) the client's requests may run on, e.g. ("none",) for full
    # precision only or ("int8", "none"); None: any server
    allowed_quant: tuple[str, ...] | None = None
    # the share of span steps and forward passes re-run on another server and compared (client.verifier);
    # a server found computing wrong is never used again and is reported (docs/faults.md)
    verify_rate: float = 0.05
    swarm_key: str | None = None  # key file of a private swarm (docs/security.md)

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise ConfigError(f"the client needs initial_peers=[...] (or ${INITIAL_PEERS_ENV}): the multiaddrs that "
                              "`swarm serve` or `swarm dht` printed")
        check_maddrs("initial_peers", self.initial_peers)
        for name in ("connect_timeout", "request_timeout", "missing_blocks_timeout", "routing_refresh",
                     "retry_deadline"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.verify_rate <= 1.0:
            raise ConfigError(f"verify_rate must be within 0..1 (0: no checks), got {self.verify_rate}")
        if self.push_echo is False and self.use_push and self.verify_rate > 0:
            raise ConfigError("push_echo=False leaves the client no span inputs and outputs to verify: set "
                              "verify_rate=0 too (or leave push_echo=None, which echoes only while verifying)")
        if isinstance(self.allowed_quant, (str, list)):  # allowed_quant="none" or a list: a tuple
            allowed = (self.allowed_quant,) if isinstance(self.allowed_quant, str) else tuple(self.allowed_quant)
            object.__setattr__(self, "allowed_quant", allowed)
        if self.allowed_quant is not None and (not self.allowed_quant or not all(
                isinstance(q, str) and q for q in self.allowed_quant)):
            raise ConfigError(f"allowed_quant must be None (any server) or quant names such as ('none',) or "
                              f"('int8', 'nf4') (servers run {', '.join(QUANT_SCHEMES)}), got {self.allowed_quant!r}")
        check_swarm_key(self.swarm_key)
        from swarm.compression import POLICIES

        if self.compression not in POLICIES:
            raise ConfigError(f"compression must be one of {list(POLICIES)}, got {self.compression!r}")

    @property
    def retry_policy(self) -> RetryPolicy:
        from swarm.retry import RetryPolicy

        return RetryPolicy(deadline=self.retry_deadline)


def _swarm_peers(which: str) -> Any:
    """The ``--initial-peers`` field of a command that joins an existing swarm (it cannot start one)."""
    return dataclasses.field(default_factory=env_initial_peers, metadata=_help(
        f"multiaddrs of peers of the swarm {which} (default: ${INITIAL_PEERS_ENV})", nargs="+"))


def _check_swarm_peers(command: str, initial_peers: tuple[str, ...]) -> None:
    if not initial_peers:
        raise ConfigError(f"{command} needs --initial-peers (or ${INITIAL_PEERS_ENV}): the multiaddrs that "
                          "`swarm serve` or `swarm dht` printed")
    check_maddrs("--initial-peers", initial_peers)


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    """``swarm health``: a DHT client that crawls the swarm and serves its state over HTTP."""

    initial_peers: tuple[str, ...] = _swarm_peers("to watch")
    host: str = dataclasses.field(
        default="127.0.0.1", metadata=_help("address the web page listens on (0.0.0.0 to show it to your network)"))
    port: int = dataclasses.field(default=8000, metadata=_help("TCP port of the web page (0: any free port)"))
    host_maddrs: tuple[str, ...] = dataclasses.field(
        default=("/ip4/0.0.0.0/tcp/0",), metadata=_help("multiaddrs the DHT client listens on", nargs="+"))
    refresh_period: float = dataclasses.field(
        default=15.0, metadata=_help("seconds between crawls of the DHT (the page polls as often)"))
    probe_timeout: float = dataclasses.field(
        default=5.0, metadata=_help("seconds a server has to answer the info probe before it counts as unreachable"))
    probe_cache_ttl: float = dataclasses.field(
        default=30.0, metadata=_help("seconds /api/v1/is_reachable reuses a probe result (every crawl asks each "
                                     "server again)"))
    max_probes: int = dataclasses.field(default=32, metadata=_help("probes in flight at once"))
    show_ips: bool = dataclasses.field(
        default=False, metadata=_help("show the network addresses of servers on the page and in the JSON"))
    swarm_key: str | None = _swarm_key_flag()

    def __post_init__(self) -> None:
        _check_swarm_peers("swarm health", self.initial_peers)
        check_swarm_key(self.swarm_key)
        if not self.host:
            raise ConfigError("--host must be an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port (0..65535; 0 picks a free one)")
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
    model: str = dataclasses.field(default="", metadata=_help("hub id or local directory of the model whose "
                                                              "servers to check (its config is read)", required=True))
    dht_prefix: str | None = dataclasses.field(
        default=None, metadata=_help("DHT namespace of the model (default: the model's repository or dir name)"))
    rounds: int = dataclasses.field(
        default=1, metadata=_help("times to check every online server (0: until stopped, a round every --period)"))
    period: float = dataclasses.field(default=60.0, metadata=_help("seconds between the starts of rounds"))
    prompt_tokens: int = dataclasses.field(
        default=16, metadata=_help("random hidden states each session check starts with"))
    steps: int = dataclasses.field(default=8, metadata=_help("1-token inference steps each session check runs after"))
    request_timeout: float = dataclasses.field(
        default=60.0, metadata=_help("seconds a server has to answer one request"))
    host_maddrs: tuple[str, ...] = dataclasses.field(
        default=("/ip4/0.0.0.0/tcp/0",), metadata=_help("multiaddrs the checker's DHT client listens on", nargs="+"))

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
    model: str = dataclasses.field(default="", metadata=_help("hub id or local directory of the model (its "
                                                              "tokenizer and chat template are used)", required=True))
    data: str = dataclasses.field(
        default="", metadata=_help("JSON or JSONL file of alpaca (instruction/input/output), sharegpt "
                                   "(conversations: from/value) or messages (role/content) examples", required=True))
    output: str = dataclasses.field(
        default="", metadata=_help("directory for checkpoints and the final adapter; a run finds its latest "
                                   "checkpoint there and resumes", required=True))
    dht_prefix: str | None = dataclasses.field(
        default=None, metadata=_help("DHT namespace of the model (default: the model's repository or dir name)"))
    max_length: int = dataclasses.field(
        default=1024, metadata=_help("tokens per example; longer examples are cut at the end"))
    epochs: int = dataclasses.field(default=1, metadata=_help("passes over the data"))
    max_steps: int | None = dataclasses.field(
        default=None, metadata=_help("optimizer steps to run, overriding --epochs"))
    lr: float = dataclasses.field(default=2e-4, metadata=_help("AdamW learning rate (constant)"))
    weight_decay: float = dataclasses.field(default=0.0, metadata=_help("AdamW weight decay"))
    gradient_accumulation: int = dataclasses.field(
        default=1, metadata=_help("examples per optimizer step (each runs as a batch of one)"))
    max_grad_norm: float = dataclasses.field(
        default=1.0, metadata=_help("clip the adapter's gradient norm to this (0: no clipping)"))
    seed: int = dataclasses.field(default=0, metadata=_help("seed of the data order and of LoRA's init and dropout"))
    save_every: int = dataclasses.field(
        default=50, metadata=_help("steps between checkpoints; a killed run loses at most this many"))
    keep_checkpoints: int = dataclasses.field(default=3, metadata=_help("how many of the latest checkpoints to keep"))
    lora_r: int = dataclasses.field(default=8, metadata=_help("LoRA rank"))
    lora_alpha: int = dataclasses.field(default=16, metadata=_help("LoRA alpha (scale = alpha / r)"))
    lora_dropout: float = dataclasses.field(default=0.05, metadata=_help("dropout on LoRA's input"))
    lora_target_modules: tuple[str, ...] = dataclasses.field(
        default=(), metadata=_help("names of the blocks' Linear modules to adapt (default: the attention's "
                                   "query and value projections, found in the model's block)", nargs="+"))
    chat_template: str | None = dataclasses.field(
        default=None, metadata=_help("file with a Jinja chat template to use instead of the tokenizer's (default: "
                                     "the tokenizer's, or a plain '### User:' template if it has none)"))
    dtype: str = dataclasses.field(
        default="float32", metadata=_help("dtype of the local embeddings/head and of the activations sent "
                                          "(float32, bfloat16 or float16)"))
    swarm_key: str | None = _swarm_key_flag()

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
        default="127.0.0.1", metadata=_help("address the API listens on (0.0.0.0 to offer it to your network)"))
    port: int = dataclasses.field(default=8080, metadata=_help("TCP port of the API (0: any free port)"))
    api_key: str | None = dataclasses.field(
        default=None, metadata=_help("require 'Authorization: Bearer KEY' on every /v1 request (default: open)"))
    model: tuple[str, ...] = dataclasses.field(
        default=(), metadata=_help("serve only these models (ids as GET /v1/models lists them; default: every "
                                   "model the swarm serves)", nargs="+"))
    adapter: tuple[str, ...] = dataclasses.field(
        default=(), metadata=_help("client-side LoRA adapters (saved by `swarm finetune`) to serve as extra model "
                                   "ids, as NAME=PATH; the base model is the one the adapter was trained on",
                                   nargs="+"))
    max_concurrent: int = dataclasses.field(
        default=16, metadata=_help("generations running at once; later requests wait for a free slot"))
    default_max_tokens: int = dataclasses.field(
        default=512, metadata=_help("tokens to generate when a request gives no max_tokens (a session routes to "
                                    "servers with free cache for its prompt plus this)"))
    dtype: str = dataclasses.field(
        default="float32", metadata=_help("dtype of the local embeddings/head and of the activations sent "
                                          "(float32, bfloat16 or float16)"))
    host_maddrs: tuple[str, ...] = dataclasses.field(
        default=("/ip4/0.0.0.0/tcp/0",), metadata=_help("multiaddrs the API's DHT client listens on", nargs="+"))
    request_timeout: float = dataclasses.field(
        default=60.0, metadata=_help("seconds one inference step through the swarm may take before it is retried "
                                     "elsewhere"))
    swarm_key: str | None = _swarm_key_flag()

    def __post_init__(self) -> None:
        _check_swarm_peers("swarm api", self.initial_peers)
        check_swarm_key(self.swarm_key)
        if not self.host:
            raise ConfigError("--host must be an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port (0..65535; 0 picks a free one)")
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
        metadata=_help(f"multiaddrs of swarm peers to try to reach (default: ${INITIAL_PEERS_ENV})", nargs="*"))
    device: str = dataclasses.field(default="auto", metadata=_help("the --device that `swarm serve` would get"))
    json: bool = dataclasses.field(default=False, metadata=_help("print one JSON document instead of the report"))
    timeout: float = dataclasses.field(
        default=10.0, metadata=_help("seconds each check may take (p2pd start, each peer, each matmul)"))

    def __post_init__(self) -> None:
        check_maddrs("--initial-peers", self.initial_peers)
        if not 0 < self.timeout < float("inf"):
            raise ConfigError(f"--timeout must be positive seconds, got {self.timeout}")


@dataclasses.dataclass(frozen=True)
class DownloadConfig:
    """``swarm download MODEL``: fetch a span's weights on a node with network, for nodes without it."""

    model: str = dataclasses.field(default="", metadata=_help("hub id of the model (e.g. Qwen/Qwen2.5-7B-Instruct)"))
    blocks: str | None = dataclasses.field(
        default=None, metadata=_help("span to fetch as START:END, END exclusive, the --blocks the offline server "
                                     "will serve (default: every block)"))
    client: bool = dataclasses.field(
        default=False, metadata=_help("also fetch what a client reads: embeddings, final norm, LM head, tokenizer"))
    revision: str | None = dataclasses.field(default=None, metadata=_help("hub revision (branch, tag or commit)"))
    cache_dir: str | None = dataclasses.field(
        default=None, metadata=_help("hub cache directory (default: huggingface_hub's, $HF_HOME); pass the same "
                                     "--cache-dir to `swarm serve` on the offline node"))
    token: str | None = dataclasses.field(default=None, metadata=_help("hub access token for gated models"))
    trust_remote_code: bool = dataclasses.field(
        default=False, metadata=_help("allow models that ship their own modeling code (as `swarm serve` needs)"))

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
        default=1, metadata=_help("how many servers: a job array of this many tasks, each a server that places "
                                  "itself in the swarm"))
    time: str = dataclasses.field(default="04:00:00", metadata=_help("walltime of each job (sbatch --time)"))
    partition: str | None = dataclasses.field(default=None, metadata=_help("Slurm partition (sbatch --partition)"))
    gres: str | None = dataclasses.field(
        default=None, metadata=_help("devices per server, as your site names them: gpu:1, gpu:a100:1, dcu:1, npu:1"))
    cpus_per_task: int | None = dataclasses.field(default=None, metadata=_help("CPU cores per server"))
    mem: str | None = dataclasses.field(default=None, metadata=_help("RAM per server (sbatch --mem, e.g. 64G)"))
    job_name: str = dataclasses.field(default="swarm", metadata=_help("job name (squeue shows it)"))
    modules: tuple[str, ...] = dataclasses.field(
        default=(), metadata=_help("environment modules to load first, e.g. --modules cuda/12.4 pytorch/2.5",
                                   nargs="+"))
    env_file: str | None = dataclasses.field(
        default=None, metadata=_help("a shell file of VAR=value lines sourced before serving (e.g. HF_HUB_OFFLINE=1, "
                                     "SWARM_INITIAL_PEERS=...)"))
    output: str | None = dataclasses.field(
        default=None, metadata=_help("the job's log file (sbatch --output; default JOB_NAME-%%j.out, or "
                                     "JOB_NAME-%%A_%%a.out for arrays)"))
    swarm: str | None = dataclasses.field(
        default=None, metadata=_help("the command that runs swarm on the compute node (default: this Python: "
                                     "PYTHON -m swarm.cli)"))
    sbatch_args: tuple[str, ...] = dataclasses.field(
        default=(), metadata=_help("more sbatch options, one per value, e.g. --sbatch-args --account=proj42 "
                                   "--qos=low", nargs="+"))
    script: str = dataclasses.field(default="swarm-serve.sbatch", metadata=_help("where to write the sbatch script"))
    submit: bool = dataclasses.field(default=True, metadata=_help("submit the script with sbatch (--no-submit: "
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
