"""The health service end to end: real ``swarm serve`` processes, a real ``swarm health`` process,
its JSON API, Prometheus metrics, reachability checks, and its page in headless Chromium.

The swarm: a DHT peer and four servers of the tiny Llama (4 blocks). Under prefix ``tiny-llama``:
``alpha`` 0:2 stays online, ``doomed`` 2:4 is SIGKILLed (its record lingers as ONLINE, the probe
fails: unreachable), ``leaving`` 1:3 gets SIGTERM (it announces OFFLINE), and a hivemind peer of
the test announces a JOINING record for 3:4. Under prefix ``tiny-llama-copy``: ``full`` 0:4.
Before the kills both models are healthy; after them ``tiny-llama`` is broken (blocks 2:4).
"""

from __future__ import annotations

import asyncio
import html.parser
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from swarm.dht import NetworkConfig, Peer, clean_peer_sockets, declare_server, peer_sockets
from swarm.local_swarm import LocalSwarm, Proc
from swarm.records import ModelRecord, ServerRecord, ServerState

pytestmark = pytest.mark.integration

PREFIX, COPY = "tiny-llama", "tiny-llama-copy"
JOINING_SPAN = (3, 4)
WAIT = 90.0  # seconds any state may take to show up


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get_state(url: str) -> dict[str, Any]:
    status, body = http_get(url + "api/v1/state")
    assert status == 200, body
    return json.loads(body)


def wait_for_state(url: str, done: Callable[[dict[str, Any]], bool], what: str,
                   timeout: float = WAIT) -> dict[str, Any]:
    """Polls the JSON API until ``done(state)``; fails with the last state after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = get_state(url)
        if doc["updated_at"] is not None and done(doc):
            return doc
        time.sleep(0.2)
    pytest.fail(f"the health service did not show {what} within {timeout:.0f}s; last state:\n"
                f"{json.dumps(doc, indent=1)[:4000]}")


def model_of(doc: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    return next((m for m in doc["models"] if m["prefix"] == prefix), None)


def states_by_name(doc: dict[str, Any], prefix: str) -> dict[str, tuple[str, int, int]]:
    """``{public name: (state, start, end)}``; the joining record has no name and shows as ``joining``."""
    model = model_of(doc, prefix)
    return {s["public_name"] or "joining": (s["state"], s["start"], s["end"]) for s in (model or {}).get("servers", [])}


def announce_joining(initial_peers: list[str], model_path: str) -> str:
    """A real hivemind peer announces a JOINING record for blocks 3:4 (a server still loading); returns its id."""
    async def announce() -> str:
        peer = await Peer.start(NetworkConfig(initial_peers=tuple(initial_peers), client_mode=True,
                                              host_maddrs=("/ip4/127.0.0.1/tcp/0",)))
        try:
            record = ServerRecord(state=ServerState.JOINING, start=JOINING_SPAN[0], end=JOINING_SPAN[1],
                                  version="0.1.0")
            model = ModelRecord(prefix=PREFIX, name=model_path, num_blocks=4, family="llama")
            assert await declare_server(peer, PREFIX, record, expiration=600, model=model)
            return peer.peer_id.to_base58()
        finally:
            await peer.shutdown()

    return asyncio.run(asyncio.wait_for(announce(), 60))


class HealthSwarm:
    def __init__(self, url: str, before: dict[str, Any], dht: str, joining_id: str, server_log: str):
        self.url, self.before, self.dht, self.joining_id, self.server_log = url, before, dht, joining_id, server_log
        self.dht_peer_id = dht.rsplit("/p2p/", 1)[1]


@pytest.fixture(scope="module")
def health_swarm(tiny_llama, tmp_path_factory):
    sockets_before = peer_sockets()
    log_dir = tmp_path_factory.mktemp("health-swarm")
    swarm = LocalSwarm(log_dir=str(log_dir))
    health: subprocess.Popen | None = None
    try:
        dht = swarm.start_dht()
        servers = {name: swarm.start_server(tiny_llama, span, "--num-threads", "1", "--public-name", name, *extra,
                                            wait=False, name=name)
                   for name, span, extra in [("alpha", "0:2", ()), ("doomed", "2:4", ()), ("leaving", "1:3", ()),
                                             ("full", "0:4", ("--dht-prefix", COPY))]}
        for proc in servers.values():
            proc.wait_for("Server ONLINE", 180)
        joining_id = announce_joining(swarm.initial_peers, tiny_llama)

        log_path = str(log_dir / "health.log")
        with open(log_path, "w") as log:
            health = subprocess.Popen(
                [sys.executable, "-m", "swarm.cli", "health", "--initial-peers", dht, "--host", "127.0.0.1",
                 "--port", "0", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--refresh-period", "1",
                 "--probe-cache-ttl", "1", "--probe-timeout", "5"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = Proc("health", health, log_path, time.monotonic()).wait_for("Health page: http://", 60)
        url = line.split("Health page: ", 1)[1].split()[0]

        before = wait_for_state(url, lambda d: states_by_name(d, PREFIX) == {
            "alpha": ("online", 0, 2), "doomed": ("online", 2, 4), "leaving": ("online", 1, 3),
            "joining": ("joining", 3, 4)} and states_by_name(d, COPY) == {"full": ("online", 0, 4)},
            "every server online and the joining record")
        swarm.stop(servers["doomed"], signal.SIGKILL)  # no chance to say goodbye: its ONLINE record lingers
        swarm.stop(servers["leaving"], signal.SIGTERM)  # announces OFFLINE on the way out
        yield HealthSwarm(url, before, dht, joining_id, servers["alpha"].log())

        health.send_signal(signal.SIGTERM)
        assert health.wait(30) == 0, "swarm health did not exit cleanly on SIGTERM"
    finally:
        if health is not None:
            if health.poll() is None:
                health.kill()
            try:
                os.killpg(health.pid, signal.SIGKILL)  # its p2pd child, if it outlived it
            except (ProcessLookupError, PermissionError):
                pass
            health.wait(10)
        swarm.close()
        clean_peer_sockets(keep=sockets_before)


def after_kills(doc: dict[str, Any]) -> bool:
    return states_by_name(doc, PREFIX) == {"alpha": ("online", 0, 2), "doomed": ("unreachable", 2, 4),
                                           "leaving": ("offline", 1, 3), "joining": ("joining", 3, 4)}


# ---------------------------------------------------------------- JSON API


def test_servers_print_the_status_command(health_swarm):
    assert f"Status: swarm health --initial-peers {health_swarm.dht}" in health_swarm.server_log


def test_before_the_kills_both_models_are_healthy(health_swarm):
    doc = health_swarm.before
    assert doc["schema_version"] == 1
    llama, copy = model_of(doc, PREFIX), model_of(doc, COPY)
    assert llama["state"] == "healthy" and llama["num_blocks"] == 4 and llama["family"] == "llama"
    assert llama["replicas"] == [1, 2, 2, 1]  # alpha 0:2 + leaving 1:3 + doomed 2:4; joining does not count
    assert copy["state"] == "healthy" and copy["replicas"] == [1, 1, 1, 1] and copy["min_replicas"] == 1


def test_each_server_shows_its_state_and_span(health_swarm):
    doc = wait_for_state(health_swarm.url, after_kills, "alpha online, doomed unreachable, leaving offline")
    llama = model_of(doc, PREFIX)
    assert llama["state"] == "broken"
    assert llama["replicas"] == [1, 1, 0, 0] and llama["min_replicas"] == 0 and llama["missing_blocks"] == [2, 3]
    assert llama["block_states"] == ["served", "served", "missing", "joining"]
    assert llama["servers_by_state"] == {"online": 1, "joining": 1, "offline": 1, "unreachable": 1}
    by_name = {s["public_name"] or "joining": s for s in llama["servers"]}
    assert by_name["joining"]["peer_id"] == health_swarm.joining_id
    assert by_name["doomed"]["announced_state"] == "online" and by_name["doomed"]["probe_error"]
    alpha = by_name["alpha"]
    assert alpha["ping"] is not None and alpha["ping"] > 0 and alpha["probe_error"] is None
    assert (alpha["dtype"], alpha["device"], alpha["version"], alpha["using_relay"]) == ("float32", "cpu", "0.1.0",
                                                                                         False)
    assert alpha["cache_tokens_left"] > 0 and alpha["throughput"] >= 0
    # the healthy model is untouched
    assert model_of(doc, COPY)["state"] == "healthy"
    assert doc["updated_at"] is not None and doc["crawl_duration"] >= 0 and doc["crawl_error"] is None


def test_no_addresses_unless_asked(health_swarm):
    wait_for_state(health_swarm.url, after_kills, "the state after the kills")
    _, body = http_get(health_swarm.url + "api/v1/state")
    doc = json.loads(body)
    assert doc["show_ips"] is False
    assert "127.0.0.1" not in body and "/ip4/" not in body  # not even in the probe error of the dead server
    assert all("addrs" not in s for m in doc["models"] for s in m["servers"])
    _, page = http_get(health_swarm.url)
    assert "127.0.0.1" not in page


# ---------------------------------------------------------------- metrics and reachability


def test_metrics_parse_and_match_the_state(health_swarm):
    from prometheus_client.parser import text_string_to_metric_families

    wait_for_state(health_swarm.url, after_kills, "the state after the kills")
    status, text = http_get(health_swarm.url + "metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("swarm_model_servers", "swarm_model_min_replicas", "swarm_model_blocks",
                 "swarm_health_crawl_duration_seconds", "swarm_model_throughput_tokens_per_second"):
        assert name in families and families[name].documentation, name
        assert f"# TYPE {name} gauge" in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("swarm_model_servers", (("model", PREFIX), ("state", "unreachable")))] == 1
    assert samples[("swarm_model_servers", (("model", PREFIX), ("state", "online")))] == 1
    assert samples[("swarm_model_min_replicas", (("model", PREFIX),))] == 0
    assert samples[("swarm_model_min_replicas", (("model", COPY),))] == 1
    assert samples[("swarm_model_healthy", (("model", COPY),))] == 1
    assert samples[("swarm_model_blocks", (("model", PREFIX), ("state", "missing")))] == 1
    assert samples[("swarm_model_blocks", (("model", PREFIX), ("state", "joining")))] == 1
    assert samples[("swarm_health_crawls_total", ())] >= 1


def test_is_reachable(health_swarm):
    doc = wait_for_state(health_swarm.url, after_kills, "the state after the kills")
    ids = {s["public_name"]: s["peer_id"] for s in model_of(doc, PREFIX)["servers"]}

    def check(peer_id: str) -> dict[str, Any]:
        status, body = http_get(health_swarm.url + f"api/v1/is_reachable/{peer_id}")
        assert status == 200, body
        return json.loads(body)

    alive = check(ids["alpha"])
    assert alive["reachable"] and alive["serves_info"] and alive["rtt"] > 0 and alive["error"] is None
    dead = check(ids["doomed"])
    assert not dead["reachable"] and not dead["serves_info"] and dead["error"]
    dht = check(health_swarm.dht_peer_id)  # a peer that is no server: reachable, but it serves no info
    assert dht["reachable"] and not dht["serves_info"]
    status, body = http_get(health_swarm.url + "api/v1/is_reachable/not-a-peer-id!")
    assert status == 400 and "is not a peer id" in json.loads(body)["error"]


# ---------------------------------------------------------------- the page


class PageParser(html.parser.HTMLParser):
    """Collects the page's model sections, server rows and replica cells by their data attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, str] = {}  # prefix -> "model healthy" / "model broken"
        self.rows: list[dict[str, str]] = []
        self.cells = 0
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        elif tag == "section" and "data-prefix" in a:
            self.models[a["data-prefix"]] = a.get("class", "")
        elif tag == "tr" and "data-peer-id" in a:
            self.rows.append(a)
        elif tag == "span" and a.get("class", "").startswith("cell "):
            self.cells += 1


def parse_page(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    return parser


def check_page(page: PageParser) -> None:
    assert page.models == {PREFIX: "model broken", COPY: "model healthy"}
    assert sorted((r["data-state"], r["data-span"]) for r in page.rows) == [
        ("joining", "3:4"), ("offline", "1:3"), ("online", "0:2"), ("online", "0:4"), ("unreachable", "2:4")]
    assert page.cells == 8  # one replica cell per block of each model


def test_page_is_server_rendered(health_swarm):
    """What a browser without JavaScript shows: every model and server row, in the same markup."""
    wait_for_state(health_swarm.url, after_kills, "the state after the kills")
    status, text = http_get(health_swarm.url)
    assert status == 200
    page = parse_page(text)
    assert page.body["data-rendered-by"] == "server"
    check_page(page)
    assert "Blocks 2:4 have no online server" in text and '<meta http-equiv="refresh"' in text
    assert http_get(health_swarm.url + "static/health.js")[0] == 200
    assert http_get(health_swarm.url + "static/health.css")[0] == 200


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is needed for the page test: apt-get install chromium (.ci/run does)")
    pytest.skip("no chromium on PATH: apt-get install chromium to run the real-browser test")


def chromium(binary: str, profile: str, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run in its own process group, killed whole if it overruns."""
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
               "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"chromium did not finish in 90s: {err[-2000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its zygote and renderer children
        except (ProcessLookupError, PermissionError):
            pass
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_page_in_a_real_browser(health_swarm, tmp_path):
    """Headless Chromium runs the page's script (which re-renders it from the JSON API) and draws it."""
    binary = find_chromium()
    wait_for_state(health_swarm.url, after_kills, "the state after the kills")
    # virtual time lets the page's first poll of /api/v1/state finish before the DOM is dumped
    dumped = chromium(binary, str(tmp_path / "profile-dom"), "--virtual-time-budget=5000", "--dump-dom",
                      health_swarm.url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    page = parse_page(dumped.stdout)
    assert page.body.get("data-rendered-by") == "js", "the page's script did not render the JSON state"
    check_page(page)

    screenshot = tmp_path / "page.png"
    shot = chromium(binary, str(tmp_path / "profile-shot"), "--virtual-time-budget=5000",
                    f"--screenshot={screenshot}", "--window-size=1280,900", health_swarm.url)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {screenshot}")
