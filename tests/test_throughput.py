"""Throughput measurement, its cache, and what a server publishes (server/throughput.py)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from server import throughput as probe
from server.loading import load_span
from swarm.models import load_config
from swarm.weights import Checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_config(tiny_llama):
    return load_config(tiny_llama)


@pytest.fixture(scope="module")
def tiny_span(tiny_llama, tiny_config):
    return load_span(Checkpoint(tiny_llama), tiny_config, 1, 3, torch.float32, CPU)


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv(probe.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / probe.CACHE_FILE


# ---------------------------------------------------------------- measuring


def test_measuring_a_tiny_span_is_quick_and_positive(tiny_span):
    t0 = time.perf_counter()
    speed = probe.measure_speed(tiny_span, CPU, torch.float32)
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0
    assert speed.inference_rps > 0 and speed.forward_rps > 0
    # a forward pass of many tokens moves more tokens per second than 1-token steps do
    assert speed.forward_rps > speed.inference_rps


def test_a_block_slower_than_the_budget_runs_once():
    calls = []
    rate = probe._rate(lambda: (calls.append(1), time.sleep(0.05)), 10.0, CPU, budget_s=0.01, max_runs=100)
    assert len(calls) == 1 and 0 < rate <= 10.0 / 0.05


def test_runs_are_capped_for_fast_blocks():
    calls = []
    probe._rate(lambda: calls.append(1), 1.0, CPU, budget_s=10.0, max_runs=7)
    assert len(calls) == probe.WARMUPS + 7


# ---------------------------------------------------------------- the cache


def test_cache_path_follows_the_environment(cache_file, monkeypatch):
    assert probe.cache_path() == cache_file
    monkeypatch.delenv(probe.CACHE_DIR_ENV)
    assert str(probe.cache_path()).endswith(".cache/swarm/throughput.json")


def test_cache_stores_and_reuses_by_key(cache_file):
    speed = probe.ComputeSpeed(inference_rps=123.0, forward_rps=4567.0)
    assert probe.load_cached("k1") is None
    probe.store_cached("k1", speed)
    probe.store_cached("k2", probe.ComputeSpeed(1.0, 2.0))
    assert probe.load_cached("k1") == speed
    assert probe.load_cached("k2") == probe.ComputeSpeed(1.0, 2.0)
    data = json.loads(cache_file.read_text())
    assert data["schema_version"] == probe.CACHE_SCHEMA_VERSION and set(data["entries"]) == {"k1", "k2"}
    assert not list(cache_file.parent.glob(".throughput-*"))  # no temporary files left behind


@pytest.mark.parametrize("content", ["{not json", "[]", '{"schema_version": 99, "entries": {}}',
                                     '{"schema_version": 1, "entries": {"k1": {"inference_rps": "x"}}}',
                                     '{"schema_version": 1, "entries": {"k1": {"inference_rps": 0, "forward_rps": 1}}}'])
def test_a_bad_cache_is_ignored_and_rewritten(cache_file, content):
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text(content)
    assert probe.load_cached("k1") is None
    probe.store_cached("k1", probe.ComputeSpeed(5.0, 6.0))
    assert probe.load_cached("k1") == probe.ComputeSpeed(5.0, 6.0)


def test_an_unwritable_cache_only_warns(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(probe.CACHE_DIR_ENV, str(blocker / "sub"))  # a directory under a file: cannot exist
    probe.store_cached("k", probe.ComputeSpeed(1.0, 1.0))
    assert "Could not write the throughput cache" in caplog.text


def test_speed_key_changes_with_what_changes_speed(tiny_config):
    key = probe.speed_key(tiny_config, CPU, torch.float32, 1)
    assert key == probe.speed_key(tiny_config, CPU, torch.float32, 1)
    assert "cpu:" in key and "float32" in key and f"torch {torch.__version__}" in key and "1 threads" in key
    assert key != probe.speed_key(tiny_config, CPU, torch.bfloat16, 1)
    assert key != probe.speed_key(tiny_config, CPU, torch.float32, 2)
    assert key == probe.speed_key(tiny_config, CPU, torch.float32, 1, "none")
    by_quant = {quant: probe.speed_key(tiny_config, CPU, torch.float32, 1, quant) for quant in ("int8", "nf4")}
    assert len({key, *by_quant.values()}) == 3 and "float32 nf4" in by_quant["nf4"]  # measured per quant
    wider = tiny_config.__class__.from_dict({**tiny_config.to_dict(), "intermediate_size": 256})
    assert key != probe.speed_key(wider, CPU, torch.float32, 1)
    # the same block in a deeper model, or saved elsewhere, computes as fast
    deeper = tiny_config.__class__.from_dict({**tiny_config.to_dict(), "num_hidden_layers": 32,
                                              "_name_or_path": "/elsewhere"})
    deeper._attn_implementation = tiny_config._attn_implementation
    assert key == probe.speed_key(deeper, CPU, torch.float32, 1)


# ---------------------------------------------------------------- what is published


def test_throughput_is_forward_speed_capped_by_the_network():
    speed = probe.ComputeSpeed(inference_rps=100.0, forward_rps=5000.0)
    free = probe.make_throughput(speed, network_rps=None, override=None, source="measured")
    assert (free.inference_rps, free.forward_rps, free.network_rps, free.throughput) == (100.0, 5000.0, 0.0, 5000.0)
    assert "network not limiting" in free.describe()
    capped = probe.make_throughput(speed, network_rps=1200.0, override=None, source="cached")
    assert capped.throughput == 1200.0 and capped.network_rps == 1200.0


def test_the_override_skips_measuring_and_wins():
    given = probe.make_throughput(None, network_rps=50.0, override=7.5, source="cached")
    assert (given.throughput, given.inference_rps, given.forward_rps, given.network_rps) == (7.5, 0.0, 0.0, 50.0)
    assert given.source == "--throughput" and "not measured" in given.describe()
    with pytest.raises(ValueError, match="needs a ComputeSpeed"):
        probe.make_throughput(None, network_rps=None, override=None, source="measured")
