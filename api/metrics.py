"""Prometheus series of the API (one registry per app, so two apps in one process never share series).

- ``swarm_api_requests_total{endpoint, status}``: answered requests by HTTP status
- ``swarm_api_errors_total{endpoint, code}``: requests that ended in an error, by error code
- ``swarm_api_time_to_first_token_seconds{model}``: from the request's arrival to its first token
- ``swarm_api_tokens_per_second{model}``: a request's generated tokens after the first, per second
- ``swarm_api_generated_tokens_total{model}``, ``swarm_api_prompt_tokens_total{model}``
- ``swarm_api_active_generations``, ``swarm_api_waiting_requests``: now running / waiting for a slot
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("swarm_api_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("swarm_api_errors", "Requests that ended in an error, by endpoint and error code",
                              ["endpoint", "code"], registry=r)
        self.ttft = Histogram("swarm_api_time_to_first_token_seconds", "Seconds from a request's arrival to its "
                              "first generated token", ["model"], buckets=_TTFT_BUCKETS, registry=r)
        self.rate = Histogram("swarm_api_tokens_per_second", "A request's generated tokens after the first, per "
                              "second", ["model"], buckets=_RATE_BUCKETS, registry=r)
        self.generated = Counter("swarm_api_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt = Counter("swarm_api_prompt_tokens", "Prompt tokens sent through the swarm", ["model"],
                              registry=r)
        self.active = Gauge("swarm_api_active_generations", "Generations running now", registry=r)
        self.waiting = Gauge("swarm_api_waiting_requests", "Requests waiting for a free slot (--max-concurrent)",
                             registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
