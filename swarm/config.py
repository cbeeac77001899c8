"""One frozen config dataclass per component (servers, DHT peers, clients; the other commands' are in
:mod:`swarm.command_config`); the CLI flags are derived from their fields.

Each field's ``metadata`` holds its help text (and optionally ``flag``/``nargs``), so every default
and help string exists once. Validation lives in ``__post_init__`` and names the flag to change.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TYPE_CHECKING, Any

from swarm.errors import ConfigError
from swarm.first_contact import check_maddrs, check_model_source, check_swarm_key

if TYPE_CHECKING:
    from swarm.retry import RetryPolicy

INITIAL_PEERS_ENV = "SWARM_INITIAL_PEERS"
QUANT_SCHEMES = ("none", "int8", "nf4")  # how a server stores its blocks' Linear weights (swarm.quant)
MAX_UPDATE_PERIOD = 300.0  # records live 2.5x this; peers refuse records living over 900 s (swarm.signed_records)


def doc(text: str, **extra) -> dict:
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


def swarm_key_flag() -> Any:
    return dataclasses.field(default=None, metadata=doc(
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
        metadata=doc(f"multiaddrs of peers to join (default: ${INITIAL_PEERS_ENV}); none starts a new swarm",
                       nargs="*"))
    host_maddrs: tuple[str, ...] = dataclasses.field(
        default=(), metadata=doc("multiaddrs to listen on (default: all interfaces, --port or a free port)",
                                   nargs="+"))
    announce_maddrs: tuple[str, ...] = dataclasses.field(
        default=(), metadata=doc("multiaddrs others should use to reach this peer (e.g. a public IP)", nargs="+"))
    port: int | None = dataclasses.field(default=None, metadata=doc("TCP port: shorthand for --host-maddrs "
                                                                      "/ip4/0.0.0.0/tcp/PORT"))
    identity_path: str | None = dataclasses.field(
        default=None, metadata=doc("file with this peer's private key (created if missing) for a stable peer id"))
    use_relay: bool = dataclasses.field(
        default=True, metadata=doc("reach peers behind NATs/firewalls through libp2p circuit relays"))
    use_auto_relay: bool = dataclasses.field(
        default=False, metadata=doc("behind a NAT/firewall yourself: find relays and become reachable through them"))
    swarm_key: str | None = swarm_key_flag()

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
        default="", metadata=doc("hub id or local directory of the model, or a GGUF file (x.gguf)", flag="--model",
                                   required=True))
    gguf_file: str | None = dataclasses.field(
        default=None, metadata=doc("a GGUF file in --model (a local directory or hub repository) to serve, "
                                     "e.g. --model ORG/REPO-GGUF --gguf-file model.Q4_K_M.gguf"))
    blocks: str | None = dataclasses.field(
        default=None, metadata=doc("span to serve as START:END, END exclusive (default: --num-blocks blocks "
                                     "placed where the swarm is weakest, moved when it becomes lopsided)"))
    num_blocks: int | None = dataclasses.field(
        default=None, metadata=doc("how many blocks to hold when --blocks is not given (default: as many as fit "
                                     "the device's memory with their KV cache, at most the model's)"))
    device: str = dataclasses.field(
        default="auto", metadata=doc("auto, cpu, cuda, cuda:1 (NVIDIA; AMD/Hygon on a ROCm build: rocm, dcu), npu "
                                       "(Ascend), xpu, mps; auto never falls back to the CPU while a GPU is present "
                                       "(`swarm doctor` says why)"))
    dtype: str = dataclasses.field(
        default="auto", metadata=doc("auto, float32, bfloat16 or float16 (auto: checkpoint dtype on "
                                       "accelerators, float32 on cpu)"))
    quant: str = dataclasses.field(
        default="none", metadata=doc("store the blocks' Linear weights quantized, each block as it loads: int8 "
                                       "(~0.5x of bfloat16) or nf4 (4-bit NormalFloat, ~0.28x); none keeps --dtype",
                                       choices=QUANT_SCHEMES))
    public_name: str = dataclasses.field(default="", metadata=doc("a name shown on the health page"))
    cache_tokens: int = dataclasses.field(
        default=16384, metadata=doc("KV cache budget: tokens (summed over sessions and their batch) this server "
                                      "keeps for every block of its span"))
    max_session_length: int = dataclasses.field(
        default=8192, metadata=doc("the most tokens one inference session may hold"))
    batching: bool = dataclasses.field(
        default=True, metadata=doc("run the inference steps of concurrent sessions as one batched forward "
                                     "(--no-batching: one session's step at a time)"))
    max_batch_tokens: int = dataclasses.field(
        default=512, metadata=doc("the most tokens (rows x new tokens) one inference forward runs; a longer step "
                                    "(a long prompt) runs in chunks of this size, so other sessions' steps wait at "
                                    "most for one chunk"))
    max_batch_size: int = dataclasses.field(default=64, metadata=doc("the largest batch one request may carry"))
    max_forward_tokens: int = dataclasses.field(
        default=65536, metadata=doc("the most tokens (batch x length) one forward request may carry"))
    dht_prefix: str | None = dataclasses.field(
        default=None, metadata=doc("DHT namespace of the model (default: the model's repository or dir name); "
                                     "clients and `swarm finetune` pass the same --dht-prefix / dht_prefix="))
    prefix: str | None = dataclasses.field(
        default=None, metadata=doc("deprecated spelling of --dht-prefix"))
    revision: str | None = dataclasses.field(default=None, metadata=doc("hub revision (branch, tag or commit)"))
    cache_dir: str | None = dataclasses.field(default=None, metadata=doc("hub cache directory"))
    token: str | None = dataclasses.field(default=None, metadata=doc("hub access token for gated models"))
    update_period: float = dataclasses.field(
        default=60.0, metadata=doc("seconds between re-announcements in the DHT (records live 2.5x this)"))
    session_timeout: float = dataclasses.field(
        default=300.0, metadata=doc("an inference session idle this many seconds is closed and its cache freed"))
    idle_timeout: float = dataclasses.field(
        default=60.0, metadata=doc("a stream that brings no request, or whose client reads no answer, for this "
                                     "many seconds is closed (server-to-server push streams too: keep it above the "
                                     "20 s for which senders reuse an idle push stream)"))
    forward_chunk_tokens: int = dataclasses.field(
        default=2048, metadata=doc("a forward request of more tokens runs in chunks of this many, block by block, "
                                     "so inference steps wait at most for one chunk"))
    max_streams_per_peer: int = dataclasses.field(
        default=128, metadata=doc("the most streams one peer may hold open to this server"))
    max_sessions_per_peer: int = dataclasses.field(
        default=64, metadata=doc("the most inference sessions one peer may hold open on this server"))
    max_jobs_per_peer: int = dataclasses.field(
        default=4, metadata=doc("the most forward/backward passes of one peer queued or running here"))
    peer_cache_share: float = dataclasses.field(
        default=0.5, metadata=doc("the share of the KV cache (--cache-tokens) one peer's sessions may hold"))
    num_threads: int | None = dataclasses.field(
        default=None, metadata=doc("torch CPU threads for compute (default: torch's choice)"))
    throughput: float | None = dataclasses.field(
        default=None, metadata=doc("tokens/s per block this server offers the swarm (default: measured once on "
                                     "the loaded blocks and cached in $SWARM_CACHE_DIR or ~/.cache/swarm)"))
    remeasure_throughput: bool = dataclasses.field(
        default=False, metadata=doc("measure the throughput again and replace the cached value (e.g. if it was "
                                      "measured while the machine was busy)"))
    network_rps: float | None = dataclasses.field(
        default=None, metadata=doc("tokens/s this server's network link carries; caps the offered throughput "
                                     "(default: not limiting; never measured)"))
    balance_quality: float = dataclasses.field(
        default=1.3, metadata=doc("without --blocks, move only if the swarm's slowest block would get this many "
                                    "times faster (or a block without servers would get one)"))
    rebalance_period: float = dataclasses.field(
        default=120.0, metadata=doc("without --blocks, mean seconds between checks whether to move (jittered)"))
    trust_remote_code: bool = dataclasses.field(
        default=False, metadata=doc("run the modeling code a model repository ships (only for repositories you "
                                      "trust); without it such models are refused"))
    adapters: tuple[str, ...] = dataclasses.field(
        default=(), metadata=doc("PEFT LoRA adapters to preload, as PATH or NAME=PATH; clients select one by "
                                   "name (from_pretrained(..., active_adapter=NAME))", nargs="+"))
    max_backward_tokens: int = dataclasses.field(
        default=8192, metadata=doc("the most tokens (batch x length) one backward (training) request may carry"))
    max_lora_rank: int = dataclasses.field(default=128, metadata=doc("the largest LoRA rank a request may send"))
    max_adapter_mb: float = dataclasses.field(
        default=256.0, metadata=doc("the most MiB of LoRA weights one request may send for its blocks"))
    leave_before: float = dataclasses.field(
        default=120.0, metadata=doc("in a Slurm job: seconds before its time limit at which the server announces "
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
