"""Test-only fault injection: make this server's compute fail the way a bug or an out-of-memory would.

``SWARM_TEST_FAULTS`` (read once, when the server starts) lists the kinds of compute that raise
``ValueError`` (the kind of exception once mistaken for the client's bad request): ``forward``,
``backward``, ``inference`` (comma-separated). Unset, as it always is
outside tests, :func:`check` does nothing. Tests use it to prove that clients route around a server
whose compute fails unexpectedly (``tests/test_first_contact.py``).
"""

from __future__ import annotations

import os

ENV = "SWARM_TEST_FAULTS"
KINDS = ("forward", "backward", "inference")

_FAULTS = frozenset(kind.strip() for kind in os.environ.get(ENV, "").split(",") if kind.strip())


def check(kind: str) -> None:
    """Raises ``ValueError`` if ``SWARM_TEST_FAULTS`` names ``kind``."""
    if kind in _FAULTS:
        raise ValueError(f"injected {kind} fault ({ENV})")
