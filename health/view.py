"""The state document: the one view of a :class:`~health.crawler.Snapshot` that the JSON API returns,
the page renders and the metrics count. Its fields are documented in ``docs/health.md``; bump
:data:`SCHEMA_VERSION` when a field changes meaning or disappears (adding fields does not).

Also the display helpers the page uses (the page's JavaScript mirrors them in ``static/health.js``).
"""

from __future__ import annotations

import re
import time
from typing import Any

from swarm import __version__
from swarm.records import ServerRecord
from swarm.served import serve_command
from swarm.swarm_state import PeerState, merge_servers, model_health

from health.crawler import ModelSnapshot, Reachability, Snapshot
from health.probe import ProbeResult

SCHEMA_VERSION = 1

# multiaddr address parts and bare IPv4/IPv6 addresses (probe errors quote the addresses they dialed)
_ADDRESS = re.compile(r"/(?:ip4|ip6|dns|dns4|dns6)/[^/\s]+|\b\d{1,3}(?:\.\d{1,3}){3}\b"
                      r"|\b[0-9a-f]{1,4}(?::[0-9a-f]{0,4}){2,7}\b", re.IGNORECASE)


def redact_addresses(text: str | None, show_ips: bool) -> str | None:
    """``text`` with network addresses replaced by ``<address>`` unless the operator asked to show them."""
    if text is None or show_ips:
        return text
    return _ADDRESS.sub("<address>", text)


def _server(peer_id: str, record: ServerRecord, state: PeerState, probe: ProbeResult | None,
            addrs: tuple[str, ...] | None, show_ips: bool, reports: dict[str, str]) -> dict[str, Any]:
    info = probe.info if probe is not None and probe.ok else None
    out: dict[str, Any] = {
        "peer_id": peer_id,
        "start": record.start,
        "end": record.end,
        "state": state.value,
        "announced_state": record.state.name.lower(),
        "throughput": record.throughput,
        "inference_rps": record.inference_rps,
        "forward_rps": record.forward_rps,
        "network_rps": record.network_rps,
        "dtype": record.dtype,
        "quant": record.quant,
        "device": record.device,
        "device_name": record.device_name,
        "cache_tokens_left": info.cache_tokens_left if info is not None else record.cache_tokens_left,
        "max_session_length": record.max_session_length,
        "adapters": list(record.adapters),
        "public_name": record.public_name,
        "version": record.version,
        "using_relay": record.using_relay,
        "next_pings": dict(record.next_pings),
        "ping": probe.rtt if probe is not None and probe.ok else None,
        "probe_error": redact_addresses(probe.error, show_ips) if probe is not None else None,
        "reported_by": reports,
    }
    if show_ips:
        out["addrs"] = list(addrs or ())
    return out


def _model(model: ModelSnapshot, show_ips: bool, initial_peers: tuple[str, ...]) -> dict[str, Any]:
    health = model_health(model.servers, model.record.num_blocks,
                          reachable={p: probe.ok for p, probe in model.probes.items()})
    servers = [_server(p, record, health.states[p], model.probes.get(p), model.addrs.get(p), show_ips,
                       dict(model.reports.get(p, {}))) for p, record in merge_servers(model.servers).items()]
    return {
        "prefix": model.prefix,
        "name": model.record.name,
        "family": model.record.family,
        "num_blocks": model.record.num_blocks,
        "state": "healthy" if health.healthy else "broken",
        "replicas": list(health.replicas),
        "min_replicas": health.min_replicas,
        "missing_blocks": health.missing,
        "fix_command": serve_command(model.record, model.prefix, health.missing, initial_peers if show_ips else ()),
        "block_states": [s.value for s in health.blocks],
        "servers_by_state": {s.value: health.servers_in(s) for s in PeerState},
        "throughput": sum(s["throughput"] for s in servers if s["state"] == PeerState.ONLINE.value),
        "servers": servers,
    }


def build_state(snapshot: Snapshot, *, show_ips: bool, refresh_period: float,
                initial_peers: tuple[str, ...] = ()) -> dict[str, Any]:
    """The state document (a JSON-ready dict) for ``snapshot``; see docs/health.md. ``initial_peers``:
    the addresses this service joined through, which the fix commands name with ``show_ips`` (others
    join the same way); without it they say ``SWARM_ADDRESS``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "version": __version__,
        "updated_at": snapshot.updated_at,
        "generated_at": time.time(),
        "crawl_duration": snapshot.crawl_duration,
        "crawl_error": redact_addresses(snapshot.error, show_ips),
        "crawls": snapshot.crawls,
        "refresh_period": refresh_period,
        "show_ips": show_ips,
        "models": [_model(m, show_ips, initial_peers) for m in snapshot.models],
    }


def reachability(result: Reachability, show_ips: bool) -> dict[str, Any]:
    """The ``/api/v1/is_reachable/<peer_id>`` document."""
    return {"schema_version": SCHEMA_VERSION, "peer_id": result.peer_id, "reachable": result.reachable,
            "serves_info": result.serves_info, "rtt": result.rtt, "error": redact_addresses(result.error, show_ips)}


# ---------------------------------------------------------------- display helpers (mirrored in static/health.js)


def short_id(peer_id: str) -> str:
    """``12D3KooWKmhj...aSYbPsd`` -> ``…aSYbPsd``: the end of a peer id is what tells peers apart."""
    return "…" + peer_id[-7:] if len(peer_id) > 8 else peer_id


def fmt_throughput(value: float) -> str:
    return f"{value:,.0f} tok/s" if value >= 10 else (f"{value:.1f} tok/s" if value > 0 else "—")


def fmt_tokens(value: int) -> str:
    if value >= 1_000_000:
        return f"{value / 1e6:.1f}M"
    return f"{value / 1e3:.1f}k" if value >= 10_000 else str(value)


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def fmt_time(unix: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix)) if unix is not None else "not yet"


def fmt_pings(pings: dict[str, float]) -> str:
    """Announced round trips to the next servers, e.g. ``…aSYbPsd 3.1 ms, …k9Lm2Qx 8.0 ms``."""
    return ", ".join(f"{short_id(p)} {fmt_ms(rtt)}" for p, rtt in sorted(pings.items(), key=lambda item: item[1]))


FILTERS = {"short_id": short_id, "throughput": fmt_throughput, "tokens": fmt_tokens, "ms": fmt_ms,
           "time": fmt_time, "pings": fmt_pings}
