"""The ``swarm`` command: ``dht``, ``serve``, ``health``, ``api``, ``finetune``, ``verify``, ``doctor``, ``download``,
``slurm``, ``demo``, ``models``, ``keygen``.

The flags of every command but ``demo``, ``models`` and ``keygen`` are derived from its config dataclass in
:mod:`swarm.config` (``ServerConfig`` for ``serve``...); the roles are imported only when their command runs.
Parsing and checking the flags imports neither torch nor hivemind, so a mistyped flag is refused at
once, and every :class:`~swarm.errors.SwarmError` (or Ctrl-C) ends the command with a line, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any

from swarm import __version__, aio
from swarm.command_config import (ApiConfig, DoctorConfig, DownloadConfig, FinetuneConfig, HealthConfig, SlurmConfig,
                                  VerifyConfig)
from swarm.config import DHTConfig, ServerConfig
from swarm.errors import SwarmError
from swarm.first_contact import check_maddrs


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in positional:
            parser.add_argument(field.name, help=field.metadata.get("help", ""))
            continue
        hint = hints[field.name]
        flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
        kwargs: dict[str, Any] = {"dest": field.name, "help": field.metadata.get("help", "")}
        base = hint
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            base = next(a for a in typing.get_args(hint) if a is not type(None))
        if typing.get_origin(base) is tuple:
            kwargs["nargs"] = field.metadata.get("nargs", "*")
            kwargs["type"] = str
        elif base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if field.default is not dataclasses.MISSING and field.default not in ((), None, ""):
            kwargs["help"] += f" (default: {field.default})"
        kwargs["default"] = argparse.SUPPRESS  # unset flags keep the dataclass default
        if field.metadata.get("required"):
            kwargs["required"] = True
        parser.add_argument(flag, **kwargs)


def _build_config(cls: type, args: argparse.Namespace) -> Any:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    return cls(**values)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    if not verbose:
        for noisy in ("hivemind", "httpx", "urllib3", "filelock", "torch"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _route_hivemind_logs() -> None:
    """hivemind's records through the root logger; called once a command is about to join a swarm (importing
    hivemind imports torch, which a mistyped flag must not wait for)."""
    try:
        from hivemind.utils.logging import use_hivemind_log_handler

        use_hivemind_log_handler("in_root_logger")
    except Exception:  # older hivemind: its own handler stays
        pass


@contextlib.contextmanager
def _ctrl_c_exits_at_once() -> Iterator[None]:
    """While a command imports its role (torch, transformers, hivemind: seconds), Ctrl-C ends the process at
    once: nothing has started that needs undoing, and an import cut short must not be finished by exit hooks
    (they would fail with a traceback)."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description="Run and fine-tune LLMs over a swarm of machines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"swarm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dht", help="run a bootstrap-only peer that others join")
    _add_dataclass_flags(p, DHTConfig)

    p = sub.add_parser("serve", help="serve a span of a model's blocks",
                       description="Serve blocks of a model (`swarm models` lists the supported families).")
    _add_dataclass_flags(p, ServerConfig)

    p = sub.add_parser("health", help="serve a web page, JSON API and metrics showing where every block lives",
                       description="Crawl the swarm's DHT and serve its state: / (page), /api/v1/state (JSON, "
                                   "docs/health.md), /metrics (Prometheus), /api/v1/is_reachable/PEER_ID")
    _add_dataclass_flags(p, HealthConfig)

    p = sub.add_parser("api", help="serve an OpenAI-compatible HTTP API and a chat page over the swarm's models",
                       description="Join the swarm as a client and serve /v1/models, /v1/chat/completions, "
                                   "/v1/completions, /health, /metrics and a chat page at / (docs/api.md)")
    _add_dataclass_flags(p, ApiConfig)

    p = sub.add_parser("finetune", help="train a LoRA adapter on instruction data through the swarm",
                       description="Train a LoRA adapter for --model on alpaca, sharegpt or messages JSON/JSONL "
                                   "data; checkpoints every --save-every steps and resumes from the latest one in "
                                   "--output (docs/finetune.md)")
    _add_dataclass_flags(p, FinetuneConfig)

    p = sub.add_parser("verify", help="check that the servers of a model compute what other servers compute",
                       description="Re-run every online server's work (an inference session and a forward pass on "
                                   "random hidden states) on other servers of the same blocks and compare; servers "
                                   "found wrong are reported to the swarm (the health page shows them) and printed. "
                                   "Exits 1 if any was found wrong (docs/faults.md)")
    _add_dataclass_flags(p, VerifyConfig)

    p = sub.add_parser("doctor", help="say what this machine can serve with: torch build vs accelerators, memory, "
                                      "a matmul per device, p2pd, peers; and the fix for every mismatch",
                       description="Checks Python, the torch build, the GPUs/DCUs/NPUs the OS shows against what "
                                   "torch can use, free memory, a small matmul per device, p2pd and the given "
                                   "initial peers. Exit code 0 when nothing is wrong, 1 otherwise (docs/hpc.md)")
    _add_dataclass_flags(p, DoctorConfig)

    p = sub.add_parser("download", help="fetch only the shards a span needs, for nodes without network",
                       description="Downloads the config and only the checkpoint shards that hold --blocks (with "
                                   "--client also the embeddings/head and tokenizer) into the hub cache, so that "
                                   "`HF_HUB_OFFLINE=1 swarm serve --blocks ...` runs on a node with no network "
                                   "(docs/hpc.md)")
    _add_dataclass_flags(p, DownloadConfig, positional=("model",))

    p = sub.add_parser("slurm", help="run servers as Slurm batch jobs: write an sbatch script and submit it",
                       description="Writes an sbatch script that runs `swarm serve` with the flags after -- (one "
                                   "server per job; --array N for N servers that place themselves), with the "
                                   "partition, --gres, walltime, modules and env file, and submits it. Servers leave "
                                   "the swarm before the walltime without losing a generation (docs/hpc.md)")
    _add_dataclass_flags(p, SlurmConfig)
    from swarm.sbatch import add_serve_args

    add_serve_args(p)

    p = sub.add_parser("demo", help="run a whole swarm on 127.0.0.1 and stream a generation through it")
    p.add_argument("--model", default=None,
                   help="hub id or local directory (default: a small random-weight Llama built on the fly)")
    p.add_argument("--servers", type=int, default=2, help="number of servers to split the blocks between")
    p.add_argument("--prompt", default="A swarm of small machines", help="prompt (real models only)")
    p.add_argument("--max-new-tokens", type=int, default=24)

    p = sub.add_parser("models", help="list the supported model families, or with --initial-peers the models a "
                                      "swarm serves")
    p.add_argument("--initial-peers", nargs="+", default=(),
                   help="multiaddrs of peers of a swarm: list the models it serves (their DHT prefix, name, "
                        "health) instead of the supported families")

    p = sub.add_parser("keygen", help="write a new swarm key file: a private swarm's peers all pass it with "
                                      "--swarm-key (docs/security.md)")
    p.add_argument("file", help="where to write the key (never overwritten; readable by its owner only)")
    return parser


def run_dht(config: DHTConfig) -> int:
    from swarm.dht import NetworkConfig, Peer

    async def main() -> None:
        peer = await Peer.start(NetworkConfig(host_maddrs=config.listen_maddrs(),
                                              announce_maddrs=config.announce_maddrs,
                                              identity_path=config.identity_path,
                                              initial_peers=config.initial_peers, use_relay=config.use_relay,
                                              use_auto_relay=config.use_auto_relay, swarm_key=config.swarm_key))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            print("DHT peer running. Others join with:", flush=True)
            for maddr in await peer.visible_maddrs():
                print(f"  {maddr}", flush=True)
            await stop.wait()
        finally:
            try:
                await asyncio.wait_for(peer.shutdown(), 5)
            except Exception:  # p2pd may already be gone (Ctrl+C signals the whole process group)
                pass

    aio.run(main())
    return 0


def run_models(initial_peers: tuple[str, ...]) -> int:
    """``swarm models``: the supported families, or the models the swarm of ``initial_peers`` serves."""
    if not initial_peers:
        from swarm.models import describe_families

        print("Supported model families (model_type in config.json, what it covers):")
        for name, label in describe_families():
            print(f"  {name:<12} {label}")
        print("Models that ship their own code run only with `swarm serve --trust-remote-code` "
              "and from_pretrained(..., trust_remote_code=True).")
        return 0
    check_maddrs("--initial-peers", initial_peers)
    with _ctrl_c_exits_at_once():
        _route_hivemind_logs()
        from swarm.served import describe_served, list_served

    served = aio.run(list_served(initial_peers))
    for line in describe_served(served):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handler is in place (e.g. while importing torch)
        return 130


def _main(argv: list[str] | None) -> int:
    args = make_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if getattr(args, "prefix", None) is not None:
        print("note: --prefix is deprecated; use --dht-prefix (the same DHT namespace, the name clients and "
              "`swarm finetune` use)", file=sys.stderr)
    try:
        if args.command == "demo":
            from swarm.demo import run_demo

            return run_demo(model=args.model, num_servers=args.servers, prompt=args.prompt,
                            max_new_tokens=args.max_new_tokens)
        if args.command == "keygen":
            from swarm.swarm_key import write_key_file

            key = write_key_file(args.file)
            print(f"Wrote a new swarm key to {args.file} (fingerprint {key.fingerprint}). Copy it to every peer of "
                  f"the private swarm and start each with --swarm-key {args.file} (clients: swarm_key=...).")
            return 0
        if args.command == "models":
            return run_models(tuple(args.initial_peers))
        configs = {"dht": DHTConfig, "serve": ServerConfig, "health": HealthConfig, "api": ApiConfig,
                   "finetune": FinetuneConfig, "doctor": DoctorConfig, "download": DownloadConfig,
                   "slurm": SlurmConfig, "verify": VerifyConfig}
        config = _build_config(configs[args.command], args)  # every flag checked before a heavy import
        if args.command == "slurm":
            from swarm.sbatch import run_slurm, split_serve_args

            return run_slurm(config, split_serve_args(args.serve_args))
        # (module, function, joins a swarm: route hivemind's logs)
        roles = {"dht": ("swarm.dht", None, True), "serve": ("server.server", "serve", True),
                 "health": ("health.app", "run_health", True), "api": ("api.app", "run_api", True),
                 "finetune": ("client.finetune", "run_finetune", True), "doctor": ("swarm.doctor", "run_doctor", True),
                 "download": ("swarm.download", "run_download", False),
                 "verify": ("client.checker", "run_verify", True)}
        module, name, joins = roles[args.command]
        with _ctrl_c_exits_at_once():
            if joins:
                _route_hivemind_logs()
            try:
                loaded = importlib.import_module(module)
                run = run_dht if name is None else getattr(loaded, name)
            except ImportError as e:
                if args.command not in ("health", "api"):
                    raise
                print(f"error: swarm {args.command} needs {e.name or 'its web stack'}: pip install "
                      f"'swarm-llm[{args.command}]'", file=sys.stderr)
                return 2
        return run(config)
    except SwarmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
