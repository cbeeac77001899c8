"""The floor bench_wan measures against (benchmarks/wan_floor.py): legs per token for each configuration,
the ceiling they set with the measured compute, and the leg count fitted from several delays."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from wan_floor import add_floors, floor, legs, message_bytes, slope  # noqa: E402


def cell(delay: float, servers: int, ms: dict[str, float], **extra) -> dict:
    run = {"delay_ms": delay, "servers": servers, "hidden": 64, **extra}
    for name, value in ms.items():
        run[name] = {"ms_per_token": value, "tokens_per_s": round(1000 / value, 2)}
    return run


def test_legs_per_step_are_2n_without_push_and_n_plus_1_with_it():
    assert [legs(name, 4) for name in ("petals", "no_push", "defaults", "push_echo", "push", "push_spec")] == \
        [8, 8, 5, 5, 5, 5]
    assert legs("push_int8", 2) == 3 and legs("no_push", 2) == 4


def test_floor_is_legs_times_delay_plus_compute_and_speculation_divides_by_tokens_per_round():
    run = cell(25, 4, {"push": 150.0, "push_spec": 60.0})
    run["push_spec"]["tokens_per_round"] = 2.5
    push = floor("push", run, 64, compute_ms=8.0)
    assert push["floor_ms"] == 5 * 25 + 8.0 and push["ceiling_tokens_per_s"] == round(1000 / 133, 2)
    assert push["of_ceiling"] == pytest.approx(133 / 150, abs=0.01)
    assert push["legs_measured"] == round((150 - 8) / 25, 2)
    spec = floor("push_spec", run, 64, compute_ms=10.0)
    assert spec["legs_per_token"] == 2.0 and spec["floor_ms"] == 5 * 25 / 2.5 + 10.0
    alone = floor("push", run, 64, compute_ms=None)  # no 0 ms run: the delays alone
    assert alone["floor_ms"] == 125.0 and "legs_measured" not in alone


def test_narrow_links_add_the_bytes_and_echoes_are_bound_by_the_downlink():
    assert message_bytes("push", 256, 0.0) == 1024  # float32 where nothing is compressed
    assert message_bytes("push_auto", 256, 32e3) == 512  # float16 on a slow link
    assert message_bytes("push_int8", 256, 32e3) == 260  # int8 plus the row's scale
    run = cell(25, 4, {"push": 400.0, "push_echo": 600.0}, client_downlink_bytes_per_s=16e3)
    # without echo only the last server's answer crosses the downlink: one message on the critical path
    assert floor("push", run, 256, compute_ms=0.0)["floor_ms"] == pytest.approx(125 + 64, abs=0.1)
    # with echo four messages a token must cross it: 256 ms, more than the delays and one message
    assert floor("push_echo", run, 256, compute_ms=0.0)["floor_ms"] == pytest.approx(256, abs=0.1)
    slow = cell(25, 4, {"push_none": 300.0, "push_auto": 250.0}, link_bandwidth_bytes_per_s=32e3)
    assert floor("push_none", slow, 256, None)["floor_ms"] == pytest.approx(5 * (25 + 32), abs=0.1)
    assert floor("push_auto", slow, 256, None)["floor_ms"] == pytest.approx(5 * (25 + 16), abs=0.1)


def test_floors_take_the_compute_of_the_0_ms_run_and_the_legs_are_fitted_over_the_delays():
    runs = [cell(d, 4, {"no_push": 10 + 8 * d, "push": 8 + 5 * d}) for d in (0, 10, 25, 50)]
    runs.append(cell(25, 4, {"push": 500.0}, client_downlink_bytes_per_s=16e3))  # not a point of the fit
    fits = add_floors(runs)
    assert runs[2]["floor"]["push"]["compute_ms"] == 8 and runs[2]["floor"]["push"]["legs_measured"] == 5.0
    assert fits == [{"servers": 4, "hidden": 64, "delays_ms": [0, 10, 25, 50],
                     "no_push": {"legs_fit": 8.0, "legs_model": 8.0}, "push": {"legs_fit": 5.0, "legs_model": 5.0}}]
    assert slope([(0, 1.0), (1, 1.0)]) == 0.0
    # of several 0 ms runs the fastest of each configuration is its compute (the others waited on a busy machine)
    again = [*runs, cell(0, 4, {"push": 6.0, "no_push": 12.0})]
    add_floors(again)
    assert again[2]["floor"]["push"]["compute_ms"] == 6.0 and again[2]["floor"]["no_push"]["compute_ms"] == 10
