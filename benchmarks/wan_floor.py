"""The physical floor a WAN run is measured against: how many one-way delays lie on a token's critical
path for each configuration, what a token can cost at least, and how close each run came.

With a chain of N servers, every link ``delay`` seconds one way:

- ``no_push`` (and Petals 2.2): every server is a round trip from the client, 2N one-way legs;
- push (``defaults``, ``push_echo``, ``push`` and its compression variants): client -> server 1 -> ... ->
  server N -> client, N + 1 legs: the least a token can cost when the next token depends on the last;
- ``push_spec``: a verifying step costs N + 1 legs and yields ``tokens_per_round`` tokens.

A token's floor is its legs times the delay plus its compute (the same configuration's ms per token at
0 ms, the fastest of the runs with the same servers and hidden size, where there is one), plus what the bytes
cost where links are narrow (payload only: ``hidden`` values per token and message, 4 bytes each in
float32 or fewer when compressed; framing not counted):

- a client downlink of B bytes/s: the answer that ends a step crosses it after the others queued there
  (one message per server without push; with push the last server's, its echoes throughput-bound:
  N messages a token must take at least N * message / B);
- every link at W bytes/s: each of the legs above carries one message at W.

``legs_measured`` = (ms per token at d - at 0) / d checks the leg count; ``legs_fit`` is the slope of ms
per token against delay over every delay of the same servers and configuration.
"""

from __future__ import annotations

PUSHED = ("defaults", "push_echo", "push", "push_none", "push_auto", "push_int8", "push_spec")
ECHOED = ("defaults", "push_echo")  # every server's output also back to the client
COMPRESSION = {"push_none": "none", "push_auto": "auto", "push_int8": "int8"}  # else the run's --compression


def legs(name: str, servers: int) -> int:
    """One-way link crossings of one chain pass (one step) for configuration ``name``."""
    return servers + 1 if name in PUSHED else 2 * servers


def message_bytes(name: str, hidden: int, link_bandwidth: float, policy: str = "none") -> float:
    """Payload bytes of one token's states on one link (float32 unless the scheme chosen compresses it)."""
    from swarm.compression import _BYTES, choose

    nbytes = hidden * 4
    scheme = choose(COMPRESSION.get(name, policy), nbytes, link_bandwidth or None)
    return hidden * _BYTES[scheme] + (4 if scheme == "int8" else 0)


def floor(name: str, run: dict, hidden: int, compute_ms: float | None, policy: str = "none") -> dict:
    """The floor of configuration ``name`` in ``run`` (a bench_wan row: delay_ms, servers, downlink, link
    bandwidth, results) and how close its measured tokens/s came to the ceiling it sets."""
    n, delay = run["servers"], run["delay_ms"]
    per_round = run[name].get("tokens_per_round", 1.0) if name == "push_spec" else 1.0
    steps = legs(name, n)
    out: dict = {"legs_per_step": steps, "legs_per_token": round(steps / per_round, 2)}
    ms = steps * delay
    downlink, link = run.get("client_downlink_bytes_per_s", 0.0), run.get("link_bandwidth_bytes_per_s", 0.0)
    message = message_bytes(name, hidden, link, policy)
    if link:
        ms += steps * message / link * 1000
    throughput_ms = 0.0
    if downlink:
        serial = n if name not in PUSHED else 1  # answers that end a step on the client's downlink, one by one
        ms += serial * message / downlink * 1000
        if name in ECHOED:
            throughput_ms = n * message / downlink * 1000
    ms /= per_round
    out["delay_floor_ms"] = round(steps * delay / per_round, 1)
    if compute_ms is not None:
        ms += compute_ms
        out["compute_ms"] = compute_ms
    ms = max(ms, throughput_ms)
    out["floor_ms"] = round(ms, 1)
    if ms > 0:
        out["ceiling_tokens_per_s"] = round(1000 / ms, 2)
        out["of_ceiling"] = round(run[name]["tokens_per_s"] * ms / 1000, 2)
    if compute_ms is not None and delay > 0:
        out["legs_measured"] = round((run[name]["ms_per_token"] - compute_ms) / delay, 2)
    return out


def _key(run: dict) -> tuple:
    return run["servers"], run.get("hidden", 64)


def _names(run: dict) -> list[str]:
    return [k for k in run if isinstance(run[k], dict) and "ms_per_token" in run[k]]


def _plain(run: dict) -> bool:
    return not run.get("client_downlink_bytes_per_s") and not run.get("link_bandwidth_bytes_per_s")


def add_floors(runs: list[dict], policy: str = "none") -> list[dict]:
    """Adds ``floor`` (per configuration) to every run, with the compute of the fastest 0 ms run of the same
    servers and hidden size when there is one; returns ``legs_fit`` rows (the slope of ms per token against delay)."""
    compute: dict[tuple, float] = {}  # the fastest 0 ms run of a configuration: the least a token computes
    for r in runs:
        if r["delay_ms"] == 0 and _plain(r):
            for name in _names(r):
                key = (*_key(r), name)
                compute[key] = min(compute.get(key, float("inf")), r[name]["ms_per_token"])
    for run in runs:
        run["floor"] = {name: floor(name, run, run.get("hidden", 64), compute.get((*_key(run), name)),
                                    run.get("compression", policy))
                        for name in _names(run)}
    fits = []
    for key in sorted({_key(r) for r in runs}):
        same = sorted((r for r in runs if _key(r) == key and _plain(r)), key=lambda r: r["delay_ms"])
        if len({r["delay_ms"] for r in same}) < 2:
            continue
        row: dict = {"servers": key[0], "hidden": key[1], "delays_ms": [r["delay_ms"] for r in same]}
        for name in ("petals", "no_push", "defaults", "push_echo", "push", "push_spec"):
            points = [(r["delay_ms"], r[name]["ms_per_token"]) for r in same if name in r]
            if len(points) >= 2:
                row[name] = {"legs_fit": round(slope(points), 2),
                             "legs_model": round(legs(name, key[0]) / (same[-1][name].get("tokens_per_round", 1)
                                                                       if name == "push_spec" else 1), 2)}
        fits.append(row)
    return fits


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x."""
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
