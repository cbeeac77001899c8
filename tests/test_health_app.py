"""The health app over synthetic snapshots, on a real uvicorn server on 127.0.0.1 (no swarm needed):
the state document, escaping, ``--show-ips``, big models, empty and failed crawls, metrics, the probe
cache. The same app over a real swarm is tested in test_health.py."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from health.app import create_app
from swarm.web import make_server
from health.crawler import ModelSnapshot, Reachability, Snapshot
from health.probe import ProbeCache, ProbeResult
from health.view import build_state, fmt_ms, fmt_throughput, fmt_tokens, redact_addresses, short_id
from swarm.command_config import HealthConfig
from swarm.errors import ConfigError
from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.wire import InfoResponse

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWExamplePeerIdForTests1111111111111111111"
ONLINE, JOINING, OFFLINE = ServerState.ONLINE, ServerState.JOINING, ServerState.OFFLINE


def peer_id(i: int) -> str:
    return f"12D3KooWTestPeer{i:04d}".replace("0", "z") + "abcdefghijkmnopqrstuvwxyzABCDEFGH"  # base58: no 0


def model(prefix: str, num_blocks: int, servers: dict[str, ServerRecord], probes: dict[str, ProbeResult],
          addrs: dict[str, tuple[str, ...]] | None = None,
          reports: dict[str, dict[str, str]] | None = None) -> ModelSnapshot:
    by_block: dict[int, dict[str, ServerRecord]] = {b: {} for b in range(num_blocks)}
    for p, r in servers.items():
        for b in range(r.start, r.end):
            by_block[b][p] = r
    record = ModelRecord(prefix=prefix, name=f"org/{prefix}", num_blocks=num_blocks, family="llama")
    return ModelSnapshot(prefix=prefix, record=record,
                         servers=by_block, probes=probes, addrs=addrs or {}, reports=reports or {})


def ok(rtt: float = 0.004, cache: int = 9000) -> ProbeResult:
    info = InfoResponse(protocol_version=1, version="0.1.0", model="m", start=0, end=1, hidden_size=64,
                        dtype="float32", max_session_length=8192, max_batch_size=64, cache_tokens_left=cache)
    return ProbeResult(ok=True, checked_at=0.0, rtt=rtt, info=info)


def failed() -> ProbeResult:
    return ProbeResult(ok=False, checked_at=0.0, error="cannot reach server: failed to dial /ip4/10.1.2.3/tcp/4 "
                                                       "and 10.1.2.3:4")


def sample_snapshot() -> Snapshot:
    """A small healthy model, a broken one with every server state, and an 80-block model."""
    small = model("Small-1B", 4, {peer_id(1): ServerRecord(ONLINE, 0, 4, throughput=812.0, public_name="<b>bold</b>",
                                                           version="0.1.0", next_pings={peer_id(2): 0.003})},
                  {peer_id(1): ok()}, addrs={peer_id(1): ("/ip4/10.9.8.7/tcp/4242",)})
    broken = model("Broken-7B", 8, {
        peer_id(2): ServerRecord(ONLINE, 0, 3, throughput=40.5, dtype="bfloat16", quant="nf4", device="cuda",
                                 device_name="NVIDIA A100", public_name="alpha", using_relay=True),
        peer_id(3): ServerRecord(ONLINE, 3, 6, public_name="dead"),
        peer_id(4): ServerRecord(JOINING, 5, 8, public_name="loading"),
        peer_id(5): ServerRecord(OFFLINE, 6, 8, public_name="gone"),
    }, {peer_id(2): ok(), peer_id(3): failed()},
        reports={peer_id(2): {peer_id(9): "blocks 0:3: relative error 1.2e-02 > 5e-03 <script>"}})
    big_servers = {peer_id(10 + i): ServerRecord(ONLINE, start, min(start + 24, 80), throughput=100.0 + i,
                                                 public_name=f"node-{i}")
                   for i, start in enumerate(range(0, 80, 16))}
    big = model("Big-70B", 80, big_servers, {p: ok() for p in big_servers})
    return Snapshot(models=(broken, big, small), updated_at=1_700_000_000.0, crawl_duration=0.25, crawls=3)


@dataclasses.dataclass
class FixedSource:
    snapshot: Snapshot

    async def is_reachable(self, peer_id: str) -> Reachability:
        return Reachability(peer_id=peer_id, reachable=True, serves_info=False, rtt=None, error=None)


@dataclasses.dataclass
class Running:
    url: str
    source: FixedSource

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def state(self) -> dict[str, Any]:
        status, body = self.get("api/v1/state")
        assert status == 200
        return json.loads(body)


def serve(config: HealthConfig, snapshot: Snapshot) -> Iterator[Running]:
    source = FixedSource(snapshot)
    sock = socket.create_server(("127.0.0.1", 0))
    server = make_server(create_app(config, source))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield Running(f"http://127.0.0.1:{sock.getsockname()[1]}/", source)
    finally:
        server.request_stop()
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def app() -> Iterator[Running]:
    yield from serve(HealthConfig(initial_peers=(PEER,)), sample_snapshot())


@pytest.fixture(scope="module")
def app_with_ips() -> Iterator[Running]:
    yield from serve(HealthConfig(initial_peers=(PEER,), show_ips=True), sample_snapshot())


# ---------------------------------------------------------------- the state document


def test_state_document(app):
    doc = app.state()
    assert doc["schema_version"] == 1 and doc["updated_at"] == 1_700_000_000.0 and doc["crawl_error"] is None
    assert [m["prefix"] for m in doc["models"]] == ["Broken-7B", "Big-70B", "Small-1B"]
    broken = doc["models"][0]
    assert broken["state"] == "broken" and broken["missing_blocks"] == [3, 4, 5, 6, 7]
    assert broken["replicas"] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert broken["block_states"] == ["served"] * 3 + ["missing"] * 2 + ["joining"] * 3
    assert {s["public_name"]: s["state"] for s in broken["servers"]} == {
        "alpha": "online", "dead": "unreachable", "loading": "joining", "gone": "offline"}
    assert broken["throughput"] == 40.5  # online servers only
    alpha = broken["servers"][0]
    assert (alpha["dtype"], alpha["quant"], alpha["device_name"], alpha["using_relay"]) == (
        "bfloat16", "nf4", "NVIDIA A100", True)
    assert alpha["cache_tokens_left"] == 9000  # the live probe beats the record
    big = doc["models"][1]
    assert big["state"] == "healthy" and len(big["replicas"]) == 80 and big["min_replicas"] == 1
    assert big["replicas"][16:24] == [2] * 8


def test_no_addresses_by_default(app):
    _, body = app.get("api/v1/state")
    assert "10.1.2.3" not in body and "10.9.8.7" not in body and "<address>" in body
    assert all("addrs" not in s for m in json.loads(body)["models"] for s in m["servers"])
    assert "10.9.8.7" not in app.get("")[1]


def test_show_ips_shows_addresses(app_with_ips):
    doc = app_with_ips.state()
    small = next(m for m in doc["models"] if m["prefix"] == "Small-1B")
    assert doc["show_ips"] is True and small["servers"][0]["addrs"] == ["/ip4/10.9.8.7/tcp/4242"]
    assert "/ip4/10.9.8.7/tcp/4242" in app_with_ips.get("")[1]


def test_peer_strings_are_escaped_on_the_page(app):
    status, page = app.get("")
    assert status == 200 and page.startswith("<!doctype html>")
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page


def test_page_lists_every_model_and_server(app):
    _, page = app.get("")
    assert page.count('<section class="model') == 3 and page.count('class="server ') == 4 + 5 + 1
    assert page.count('class="cell ') == 8 + 80 + 4
    assert "Blocks 3:8 have no online server" in page
    assert "swarm serve --model org/Broken-7B --blocks 3:8" in page


def test_is_reachable_rejects_malformed_ids(app):
    status, body = app.get("api/v1/is_reachable/" + "0OIl" * 10)  # not base58
    assert status == 400 and "is not a peer id" in json.loads(body)["error"]
    status, body = app.get("api/v1/is_reachable/" + peer_id(1))
    assert status == 200 and json.loads(body)["reachable"] is True


def test_metrics(app):
    status, text = app.get("metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("swarm_model_min_replicas", (("model", "Big-70B"),))] == 1
    assert samples[("swarm_model_servers", (("model", "Broken-7B"), ("state", "unreachable")))] == 1
    assert samples[("swarm_model_blocks", (("model", "Broken-7B"), ("state", "missing")))] == 2
    assert samples[("swarm_model_throughput_tokens_per_second", (("model", "Small-1B"),))] == 812.0
    assert samples[("swarm_models", ())] == 3 and samples[("swarm_health_crawl_duration_seconds", ())] == 0.25
    assert "# HELP swarm_model_healthy " in text and "# TYPE swarm_health_crawls_total counter" in text


def test_before_the_first_crawl_and_after_a_failed_one():
    config = HealthConfig(initial_peers=(PEER,))
    for running in serve(config, Snapshot()):
        doc = running.state()
        assert doc["updated_at"] is None and doc["models"] == []
        assert "The first crawl of the swarm is running" in running.get("")[1]
        running.source.snapshot = Snapshot(updated_at=1.0, crawl_duration=0.1, crawls=2, crawl_errors=1,
                                           error="DHT timed out talking to /ip4/10.0.0.1/tcp/1")
        doc = running.state()
        assert doc["crawl_error"] == "DHT timed out talking to <address>/tcp/1"
        page = running.get("")[1]
        assert "The last crawl failed" in page and "No models in the swarm" in page
        samples = {s.name: s.value for f in text_string_to_metric_families(running.get("metrics")[1])
                   for s in f.samples}
        assert samples["swarm_health_last_crawl_failed"] == 1 and samples["swarm_models"] == 0


# ---------------------------------------------------------------- pure helpers


def test_probe_cache_reads_the_clock_it_is_given():
    cache = ProbeCache(ttl=5)
    result = ProbeResult(ok=True, checked_at=100.0, rtt=0.01)
    cache.put("a", result)
    assert cache.get("a", now=104.9) is result
    assert cache.get("a", now=105.0) is None and cache.get("b", now=100.0) is None
    cache.prune(now=103.0)
    assert cache.get("a", now=103.0) is result
    cache.prune(now=106.0)
    cache.ttl = 100
    assert cache.get("a", now=106.0) is None  # pruned for good


def test_redact_addresses():
    text = "dial /ip4/10.0.0.5/tcp/31337/p2p/12D3Koo, /ip6/::1/tcp/4, 192.168.1.1:80 and fe80::1:2; span 0:2"
    assert redact_addresses(text, show_ips=False) == (
        "dial <address>/tcp/31337/p2p/12D3Koo, <address>/tcp/4, <address>:80 and <address>; span 0:2")
    assert redact_addresses(text, show_ips=True) == text and redact_addresses(None, False) is None


def test_display_helpers():
    assert short_id("12D3KooWKmhjUUstgBz2BLamcZngw6FnZBXk2g2wbvAkuaSYbPsd") == "…aSYbPsd"
    assert short_id("Qm1") == "Qm1"
    assert [fmt_throughput(v) for v in (0.0, 2.25, 1234.4)] == ["—", "2.2 tok/s", "1,234 tok/s"]
    assert [fmt_tokens(v) for v in (0, 9999, 16384, 2_500_000)] == ["0", "9999", "16.4k", "2.5M"]
    assert [fmt_ms(v) for v in (None, 0.0042, 0.25)] == ["—", "4.2 ms", "250 ms"]


def test_build_state_is_json_ready():
    doc = build_state(sample_snapshot(), show_ips=False, refresh_period=15.0)
    assert json.loads(json.dumps(doc)) == doc


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("fields, flag", [
    ({"initial_peers": ()}, "--initial-peers"),
    ({"initial_peers": ("/ip4/1.2.3.4/tcp/5",)}, "--initial-peers"),
    ({"port": 70000}, "--port"),
    ({"port": -1}, "--port"),
    ({"host": ""}, "--host"),
    ({"refresh_period": 0}, "--refresh-period"),
    ({"probe_timeout": -1}, "--probe-timeout"),
    ({"probe_cache_ttl": -1}, "--probe-cache-ttl"),
    ({"max_probes": 0}, "--max-probes"),
    ({"host_maddrs": ()}, "--host-maddrs"),
])
def test_health_config_names_the_flag_to_fix(fields, flag, monkeypatch):
    monkeypatch.delenv("SWARM_INITIAL_PEERS", raising=False)
    with pytest.raises(ConfigError, match=flag):
        HealthConfig(**{"initial_peers": (PEER,), **fields})


def test_health_cli_flags_come_from_the_config(monkeypatch):
    import swarm.cli

    monkeypatch.setenv("SWARM_INITIAL_PEERS", PEER)
    args = swarm.cli.make_parser().parse_args(["health", "--port", "0", "--show-ips", "--refresh-period", "2"])
    config = swarm.cli._build_config(HealthConfig, args)
    assert config == HealthConfig(initial_peers=(PEER,), port=0, show_ips=True, refresh_period=2.0)
    assert HealthConfig(initial_peers=(PEER,)).port == 8000 and HealthConfig(initial_peers=(PEER,)).host == "127.0.0.1"


def test_the_fix_command_joins_this_swarm_and_names_no_foreign_path(app, app_with_ips):
    # without --show-ips the page names no address, but never leaves --initial-peers out (that would start a
    # separate swarm); SWARM_ADDRESS, pasted as it is, is refused
    broken = app.state()["models"][0]
    assert broken["fix_command"] == "swarm serve --model org/Broken-7B --blocks 3:8 --initial-peers SWARM_ADDRESS"
    assert broken["fix_command"] in app.get("")[1]
    broken = app_with_ips.state()["models"][0]
    assert broken["fix_command"] == f"swarm serve --model org/Broken-7B --blocks 3:8 --initial-peers {PEER}"
    local = dataclasses.replace(sample_snapshot().models[0],
                                record=ModelRecord(prefix="Broken-7B", name="/home/alice/models/Broken-7B", num_blocks=8,
                                                                  family="llama"))
    doc = build_state(Snapshot(models=(local,)), show_ips=True, refresh_period=15.0, initial_peers=(PEER,))
    assert doc["models"][0]["fix_command"] == ("swarm serve --model /path/to/Broken-7B --blocks 3:8 --dht-prefix "
                                               f"Broken-7B --initial-peers {PEER}")
    assert "/home/alice" not in json.dumps(doc["models"][0]["fix_command"])


def test_a_server_that_dies_shows_as_unreachable_after_one_crawl(monkeypatch):
    """The page says it crawls every refresh period; a probe answer is never reused across crawls, so a
    dead server (its ONLINE record still in the DHT) is unreachable after one crawl, not after the probe cache's
    ttl on top."""
    import asyncio
    import types

    import health.crawler as crawler_module
    from health.crawler import Crawler

    alive = {"A": True}
    probes: list[str] = []

    async def fetch_models(peer):
        return {"m": {"A": ModelRecord(prefix="m", name="org/m", num_blocks=2, family="llama")}}

    async def fetch_servers(peer, prefix, blocks):
        return {b: {"A": ServerRecord(ONLINE, 0, 2)} for b in blocks}

    async def probe_server(p2p, peer_id, timeout):
        probes.append(peer_id)
        import time

        info = InfoResponse(protocol_version=1, version="0.1.0", model="org/m", start=0, end=2, hidden_size=8,
                            dtype="float32", max_session_length=8, max_batch_size=1, cache_tokens_left=8,
                            num_blocks=2) if alive[peer_id] else None
        return ProbeResult(ok=alive[peer_id], checked_at=time.monotonic(), rtt=0.001, info=info,
                           error=None if alive[peer_id] else "cannot reach server")

    for name, fake in (("fetch_models", fetch_models), ("fetch_servers", fetch_servers),
                       ("probe_server", probe_server)):
        monkeypatch.setattr(crawler_module, name, fake)
    config = HealthConfig(initial_peers=(PEER,), refresh_period=15.0, probe_cache_ttl=30.0)
    crawler = Crawler(config)
    crawler._peer = types.SimpleNamespace(p2p=None)

    def crawl_after(seconds: float) -> dict[str, Any]:
        for peer_id, result in list(crawler.cache._results.items()):  # time passes: answers age
            crawler.cache.put(peer_id, dataclasses.replace(result, checked_at=result.checked_at - seconds))
        return build_state(asyncio.run(crawler.crawl_once()), show_ips=False, refresh_period=15.0)["models"][0]

    assert crawl_after(0)["state"] == "healthy" and probes == ["A"]
    alive["A"] = False  # the server dies right after that probe
    model = crawl_after(config.refresh_period)  # the next crawl, though the answer is younger than the ttl
    assert probes == ["A", "A"] and model["state"] == "broken" and model["servers"][0]["state"] == "unreachable"


def test_servers_caught_computing_wrong_are_shown(app):
    broken = app.state()["models"][0]
    alpha = next(s for s in broken["servers"] if s["public_name"] == "alpha")
    assert alpha["reported_by"] == {peer_id(9): "blocks 0:3: relative error 1.2e-02 > 5e-03 <script>"}
    assert all(not s["reported_by"] for s in broken["servers"] if s is not alpha)
    _, page = app.get("")
    assert page.count("reported by 1") == 1 and "&gt; 5e-03 &lt;script&gt;" in page and "<script>\"" not in page
