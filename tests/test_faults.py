"""server.faults: the test-only fault injection (SWARM_TEST_FAULTS) parses and acts as documented."""

from __future__ import annotations

import pytest
import torch

from server import faults
from swarm.errors import UnknownSession


def test_items_parse_into_kinds_and_actions():
    assert faults.parse("inference,backward") == {"inference": [("raise", "")], "backward": [("raise", "")]}
    assert faults.parse(" inference:sleep=2 , forward:perturb=0.01@0.1,forward:nan") == {
        "inference": [("sleep", "2")], "forward": [("perturb", "0.01@0.1"), ("nan", "")]}
    assert faults.parse("") == {}
    for bad in ("compute", "inference:explode", "forwards:nan"):
        with pytest.raises(ValueError, match="KIND\\[:ACTION"):
            faults.parse(bad)


def test_actions(monkeypatch):
    monkeypatch.setattr(faults, "_FAULTS", faults.parse(
        "inference:error=unknown_session,forward:nan,backward:garbage,inference:perturb=0.01@1.0"))
    with pytest.raises(UnknownSession, match="injected unknown_session reply to inference"):
        faults.check("inference")
    out = torch.randn(2, 3, 64)
    assert faults.corrupt("forward", out).isnan().all()
    garbage = faults.corrupt("backward", out)
    assert garbage.shape == out.shape and not bool((garbage.abs() < 1e3).all())  # random bits: huge, inf, NaN
    perturbed = faults.corrupt("inference", out)
    relative = (perturbed - out).norm(dim=-1) / out.norm(dim=-1)
    assert torch.allclose(relative, torch.full_like(relative, 0.01), rtol=1e-3)
    faults.check("backward")  # kinds without a check-time fault pass
    assert faults.corrupt("backward", out) is not out and faults.corrupt("nothing", out) is out
