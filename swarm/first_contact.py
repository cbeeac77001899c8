"""Checks of what a user gives first (model sources, multiaddrs, key files): a mistake is refused in one
line naming the flag and its fix, before anything heavy loads. Light: imports neither torch nor hivemind
(the swarm key file is read with :mod:`swarm.swarm_key` only when one is given).
"""

from __future__ import annotations

import ipaddress
import os

from swarm.errors import ConfigError, ModelError

GGUF_SUFFIX = ".gguf"  # a model file in llama.cpp's format (swarm.gguf reads it)


def _looks_like_path(model: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with a separator, or that starts like a path, is a path."""
    if model.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in model or model.count("/") > 1:
        return True
    return "/" in model and os.path.isdir(model.split("/")[0])  # "models/tiny-llam": a typo under a local dir


def check_model_source(model: str, flag: str = "--model", gguf_file: str | None = None) -> None:
    """Refuses, in one line and before anything heavy loads, a model that cannot be one; passes every form
    that loads: a directory with ``config.json``, a ``.gguf`` file, a directory or hub repository holding
    ``gguf_file`` (``--gguf-file``), a hub id (the hub judges it when it downloads). Paths are taken as
    given (like transformers, no ``~`` expansion: the shell does that)."""
    if os.path.isdir(model):
        ggufs = sorted(d for d in os.listdir(model) if d.endswith(GGUF_SUFFIX))
        if gguf_file is not None:
            if not os.path.isfile(os.path.join(model, gguf_file)):
                hint = f" (it holds {', '.join(map(repr, ggufs[:3]))})" if ggufs else ""
                raise ModelError(f"{flag} {model!r} has no GGUF file {gguf_file!r} (--gguf-file){hint}")
            return
        if os.path.isfile(os.path.join(model, "config.json")):
            return
        inside = sorted(d for d in os.listdir(model) if os.path.isfile(os.path.join(model, d, "config.json")))
        hint = (f" (it holds {ggufs[0]!r}: pass that file, or --gguf-file {ggufs[0]})" if ggufs
                else f" (its subdirectory {inside[0]!r} has one)" if inside else "")
        raise ModelError(f"{flag} {model!r} has no config.json{hint}: pass the directory that holds the model's "
                         "config.json and *.safetensors files")
    if os.path.isfile(model):
        if gguf_file is not None:
            raise ModelError(f"{flag} {model!r} is a file, and --gguf-file names a file inside a directory or hub "
                             f"repository: pass --model {os.path.dirname(model) or '.'} --gguf-file {gguf_file}, or "
                             "the .gguf file alone as --model")
        if model.endswith(GGUF_SUFFIX):
            return
        raise ModelError(f"{flag} {model!r} is a file: pass the directory that holds it (with config.json and "
                         "*.safetensors), a .gguf file, or a hub id such as Qwen/Qwen2.5-7B-Instruct")
    if model.endswith(GGUF_SUFFIX):
        parts = model.split("/")
        if len(parts) >= 3 and not model.startswith(("/", ".", "~")) and not os.path.isdir(parts[0]):
            return  # ORG/REPO/NAME.gguf: a file in a hub repository, the name such a server announces
        raise ModelError(f"GGUF file {model!r} does not exist; for a file in a hub repository pass "
                         "--model ORG/REPO --gguf-file NAME.gguf (or name it ORG/REPO/NAME.gguf)")
    if _looks_like_path(model):
        raise ModelError(f"{flag} {model!r}: no such directory. Pass a local directory with config.json and "
                         "*.safetensors, a .gguf file, or a hub id such as Qwen/Qwen2.5-7B-Instruct")


_MADDR_EXAMPLE = "/ip4/10.0.0.5/tcp/31337/p2p/12D3Koo... as printed by `swarm dht` or `swarm serve`"
_NO_VALUE = {"p2p-circuit", "quic", "quic-v1", "ws", "wss", "tls", "noise", "http", "https", "webtransport",
             "webrtc", "webrtc-direct", "tcp-tls"}


def _maddr_problem(addr: str) -> str | None:
    """What is wrong with the parts of a multiaddr that are easy to get wrong (IP, port), or None.
    Protocols this check does not know end it: p2pd judges the rest."""
    parts = addr.split("/")[1:]
    i = 0
    while i < len(parts):
        name = parts[i]
        if name in _NO_VALUE:
            i += 1
            continue
        if name not in ("ip4", "ip6", "dns", "dns4", "dns6", "dnsaddr", "tcp", "udp", "p2p", "ipfs"):
            return None
        if i + 1 >= len(parts) or not parts[i + 1]:
            return f"/{name} needs a value"
        value = parts[i + 1]
        try:
            if name == "ip4":
                ipaddress.IPv4Address(value)
            elif name == "ip6":
                ipaddress.IPv6Address(value)
        except ValueError:
            return f"{value!r} is not an {'IPv4' if name == 'ip4' else 'IPv6'} address"
        if name in ("tcp", "udp") and not (value.isdigit() and int(value) < 65536):
            return f"{value!r} is not a {name.upper()} port (0..65535)"
        i += 2
    return None


def check_maddrs(flag: str, maddrs: tuple[str, ...], *, full: bool = True) -> None:
    """Refuses a malformed multiaddr in one line naming ``flag``; ``full``: it must name a peer (``/p2p/...``)."""
    for addr in maddrs:
        if not addr.startswith("/") or (full and "/p2p/" not in addr):
            raise ConfigError(f"{flag} {addr!r} is not a full multiaddr; expected e.g. {_MADDR_EXAMPLE}")
        problem = _maddr_problem(addr)
        if problem:
            raise ConfigError(f"{flag} {addr!r}: {problem}; expected e.g. {_MADDR_EXAMPLE}")


def check_swarm_key(path: str | None) -> None:
    """Reads the key file now, so a bad one fails at start with the flag's name."""
    if path is not None:
        from swarm.swarm_key import SwarmKey  # only when given: it imports hivemind

        SwarmKey.from_file(path)
