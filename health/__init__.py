"""The health service: where every block of every model in the swarm lives, and whether it works.

Map (this package imports only from ``swarm``; the pure state functions it shares with servers and
clients live in :mod:`swarm.swarm_state`):

- ``probe``     the ``info`` probe of one server, and the short-lived cache of its answers
- ``crawler``   the DHT client: model index -> block keys -> probes, into an immutable Snapshot
- ``view``      the state document (JSON API, page and metrics all read it) and display helpers
- ``metrics``   the Prometheus collector over the state document
- ``app``       the Starlette app, the uvicorn server and ``swarm health``'s entry point
- ``templates/index.html``, ``static/``   the page; ``static/health.js`` re-renders it from the JSON API
"""
