"""Prometheus metrics of the swarm, computed from the state document at scrape time.

Each app gets its own :class:`CollectorRegistry` holding one :class:`SwarmCollector`, so two apps in
one process (tests) never share series. Metric names use the page's words; label ``model`` is the
model's DHT prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from swarm.swarm_state import BlockState, PeerState


class SwarmCollector(Collector):
    """Yields the swarm's metrics from ``state()``, which returns the current state document."""

    def __init__(self, state: Callable[[], dict[str, Any]]):
        self._state = state

    def collect(self) -> Iterator[Metric]:
        doc = self._state()
        servers = GaugeMetricFamily("swarm_model_servers", "Servers of a model by observed state "
                                    "(online, joining, offline, unreachable)", labels=["model", "state"])
        min_replicas = GaugeMetricFamily("swarm_model_min_replicas", "Online servers of the model's least "
                                         "served block (0: the model is broken)", labels=["model"])
        healthy = GaugeMetricFamily("swarm_model_healthy", "1 if every block of the model has an online server",
                                    labels=["model"])
        blocks = GaugeMetricFamily("swarm_model_blocks", "Blocks of a model by state (served, joining, missing)",
                                   labels=["model", "state"])
        num_blocks = GaugeMetricFamily("swarm_model_num_blocks", "Blocks in the model", labels=["model"])
        throughput = GaugeMetricFamily("swarm_model_throughput_tokens_per_second", "Sum of the throughput that "
                                       "online servers of the model announce", labels=["model"])
        for model in doc["models"]:
            name = model["prefix"]
            for peer_state in PeerState:
                servers.add_metric([name, peer_state.value], model["servers_by_state"][peer_state.value])
            for block_state in BlockState:
                blocks.add_metric([name, block_state.value], model["block_states"].count(block_state.value))
            min_replicas.add_metric([name], model["min_replicas"])
            healthy.add_metric([name], 1.0 if model["state"] == "healthy" else 0.0)
            num_blocks.add_metric([name], model["num_blocks"])
            throughput.add_metric([name], model["throughput"])
        yield from (servers, min_replicas, healthy, blocks, num_blocks, throughput)

        yield GaugeMetricFamily("swarm_models", "Models in the model index", value=len(doc["models"]))
        yield GaugeMetricFamily("swarm_health_crawl_duration_seconds", "Seconds the last crawl of the DHT took",
                                value=doc["crawl_duration"] or 0.0)
        yield GaugeMetricFamily("swarm_health_last_update_timestamp_seconds", "Unix time when the last "
                                "successful crawl ended (0: none yet)", value=doc["updated_at"] or 0.0)
        yield GaugeMetricFamily("swarm_health_last_crawl_failed", "1 if the last crawl failed",
                                value=1.0 if doc["crawl_error"] else 0.0)
        yield CounterMetricFamily("swarm_health_crawls", "Crawls of the DHT attempted", value=doc["crawls"])


def make_registry(state: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A fresh registry with one :class:`SwarmCollector` over ``state``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SwarmCollector(state))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry`` (HELP and TYPE lines included)."""
    return generate_latest(registry)
