"""Test-only fault injection: make this server fail the way a bug, a broken machine or a hostile peer would.

``SWARM_TEST_FAULTS`` (read once, when the server starts) is a comma-separated list of
``KIND[:ACTION[=ARG]]`` items, where KIND is the compute that misbehaves (``forward``, ``backward``,
``inference``) and ACTION what it does:

- ``raise`` (the default, so plain ``inference`` works): raise ``ValueError``, an exception nobody
  anticipated (the kind once mistaken for the client's bad request);
- ``error=CODE``: answer with the error reply CODE (e.g. ``bad_request``, ``unknown_session``);
- ``sleep=SECONDS``: take that much longer (a slow or overloaded machine);
- ``nan``: return NaN hidden states;
- ``garbage``: return random bits as hidden states (mostly huge, infinite or NaN values);
- ``perturb=REL@FRACTION``: on a random FRACTION of calls, add noise of relative size REL to every
  row of the output (``‖noise‖ = REL * ‖row‖``: slightly wrong results that look plausible).

Unset, as it always is outside tests, :func:`check` and :func:`corrupt` do nothing. Tests use it to
prove that clients route around such servers (``tests/test_server_faults.py``,
``tests/test_hostile_servers.py``); the handler calls :func:`check` before computing and
:func:`corrupt` on what it computed (the same output goes to the client and to a pushed next server).
"""

from __future__ import annotations

import os
import random
import time

import torch

from swarm.errors import from_wire

ENV = "SWARM_TEST_FAULTS"
KINDS = ("forward", "backward", "inference")
ACTIONS = ("raise", "error", "sleep", "nan", "garbage", "perturb")


def parse(text: str) -> dict[str, list[tuple[str, str]]]:
    """``"inference:sleep=2,forward"`` -> ``{"inference": [("sleep", "2")], "forward": [("raise", "")]}``."""
    faults: dict[str, list[tuple[str, str]]] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        kind, _, action = item.partition(":")
        action, _, arg = (action or "raise").partition("=")
        if kind not in KINDS or action not in ACTIONS:
            raise ValueError(f"{ENV}: {item!r} is not KIND[:ACTION[=ARG]] with KIND in {KINDS}, ACTION in {ACTIONS}")
        faults.setdefault(kind, []).append((action, arg))
    return faults


_FAULTS = parse(os.environ.get(ENV, ""))
_rng = random.Random()


def check(kind: str) -> None:
    """Before computing ``kind``: raises ``ValueError`` or the error reply, or sleeps, as ``SWARM_TEST_FAULTS`` says."""
    for action, arg in _FAULTS.get(kind, ()):
        if action == "raise":
            raise ValueError(f"injected {kind} fault ({ENV})")
        if action == "error":
            raise from_wire(arg, f"injected {arg} reply to {kind} ({ENV})")
        if action == "sleep":
            time.sleep(float(arg))


def corrupt(kind: str, out: torch.Tensor) -> torch.Tensor:
    """What a faulty server returns instead of ``out`` ([batch, seq, hidden]), as ``SWARM_TEST_FAULTS`` says."""
    for action, arg in _FAULTS.get(kind, ()):
        if action == "nan":
            out = torch.full_like(out, float("nan"))
        elif action == "garbage":
            bits = torch.randint(-2**31, 2**31 - 1, out.shape, dtype=torch.int64).to(torch.int32)
            out = bits.view(torch.float32).to(out.dtype)
        elif action == "perturb":
            rel, _, fraction = arg.partition("@")
            if _rng.random() < float(fraction or 1.0):
                noise = torch.randn(out.shape, dtype=torch.float32)
                noise *= float(rel) * out.float().norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)
                out = (out.float() + noise).to(out.dtype)
    return out
