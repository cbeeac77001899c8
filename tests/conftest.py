"""Shared fixtures: tiny random models and real swarms of ``swarm`` processes on 127.0.0.1."""

from __future__ import annotations

import os

import pytest
import torch

from swarm.local_swarm import LocalSwarm
from swarm.tiny import make_tiny_model


@pytest.fixture(scope="session", autouse=True)
def throughput_cache(tmp_path_factory):
    """Servers started by the tests measure into a cache of this run, never the user's ~/.cache/swarm."""
    path = str(tmp_path_factory.mktemp("swarm-cache"))
    before = os.environ.get("SWARM_CACHE_DIR")
    os.environ["SWARM_CACHE_DIR"] = path
    yield path
    if before is None:
        os.environ.pop("SWARM_CACHE_DIR", None)
    else:
        os.environ["SWARM_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-llama"), "llama")


@pytest.fixture(scope="session")
def local_llama(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="session")
def llama_swarm(tiny_llama, tmp_path_factory):
    """A DHT peer and three servers splitting the tiny Llama unevenly: 0:1, 1:3, 3:4."""
    with LocalSwarm(log_dir=str(tmp_path_factory.mktemp("llama-swarm"))) as swarm:
        swarm.start_dht()
        for span in ("0:1", "1:3", "3:4"):
            swarm.start_server(tiny_llama, span, "--num-threads", "1", wait=False)
        for proc in swarm.procs[1:]:
            proc.wait_for("Server ONLINE", 180)
        yield swarm


@pytest.fixture(scope="session")
def swarm_llama(tiny_llama, llama_swarm):
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=llama_swarm.initial_peers)
    model.generation_config.eos_token_id = None
    yield model
    model.shutdown()


def pytest_configure(config) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
