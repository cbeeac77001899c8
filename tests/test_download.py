"""``swarm download MODEL --blocks A:B`` on a "login node" that reaches a hub (a real HTTP server on
127.0.0.1 speaking the Hub's download protocol: tests/fake_hub.py), then serving the span on an
"offline node": the same cache with ``HF_HUB_OFFLINE=1`` and the hub gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch

from fake_hub import FakeHub
from server.loading import load_span
from swarm.command_config import DownloadConfig
from swarm.download import download
from swarm.errors import ConfigError, ModelError
from swarm.models import load_config
from swarm.tiny import TINY_LLAMA
from swarm.weights import INDEX_FILE, Checkpoint

REPO = "tiny-org/tiny-llama"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny random Llama saved in many small shards (blocks live in different files): (dir, model, weight map)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = str(tmp_path_factory.mktemp("hub-model"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY_LLAMA)).eval()
    model.save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    with open(os.path.join(path, INDEX_FILE)) as f:
        weight_map = json.load(f)["weight_map"]
    return path, model, weight_map


def _download(hub: FakeHub, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "swarm.cli", "download", REPO, *args], env=env,
                          capture_output=True, text=True, timeout=180)


def _shards(weight_map: dict[str, str], predicate) -> set[str]:
    return {shard for name, shard in weight_map.items() if predicate(name)}


def test_download_fetches_only_the_span_then_serves_it_offline(sharded, tmp_path, monkeypatch):
    path, model, weight_map = sharded
    cache = str(tmp_path / "hub-cache")
    with FakeHub(path, REPO) as hub:
        done = _download(hub, "--blocks", "1:3", "--cache-dir", cache)
    assert done.returncode == 0, done.stderr[-3000:]
    span_shards = _shards(weight_map, lambda n: n.startswith(("model.layers.1.", "model.layers.2.")))
    assert sorted(hub.gets) == sorted({"config.json", INDEX_FILE} | span_shards)  # nothing else came over
    assert len(span_shards) < len(set(weight_map.values())) - 2  # blocks 0 and 3 and the head stayed on the hub
    assert f"{len(span_shards)} of {len(set(weight_map.values()))} shard file(s)" in done.stdout
    assert f"HF_HUB_OFFLINE=1 swarm serve --model {REPO} --blocks 1:3 --cache-dir {cache}" in done.stdout

    # the offline node: no hub to ask, only the cache the login node filled
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = load_config(REPO, cache_dir=cache)
    checkpoint = Checkpoint(REPO, cache_dir=cache)
    span = load_span(checkpoint, config, 1, 3, torch.float32, torch.device("cpu"))
    for i in (1, 2):
        expected = model.model.layers[i].state_dict()
        got = span.blocks[i - 1].state_dict()
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected), f"block {i}"
    with pytest.raises(ModelError, match=r"offline, and not in the hub cache.*swarm download tiny-org/tiny-llama "
                                         r"--blocks START:END"):
        load_span(checkpoint, config, 0, 1, torch.float32, torch.device("cpu"))


def test_download_for_a_client_adds_the_head_and_tokenizer_files(sharded, tmp_path):
    path, _, weight_map = sharded
    with FakeHub(path, REPO) as hub:
        done = _download(hub, "--blocks", "3:4", "--client", "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    wanted = _shards(weight_map, lambda n: n.startswith("model.layers.3.") or not n.startswith("model.layers."))
    assert sorted(hub.gets) == sorted({"config.json", INDEX_FILE, "generation_config.json"} | wanted)
    assert "tokenizer.json" not in hub.gets  # this repository has none: asked for (404), not an error
    assert "and the client's parts" in done.stdout


def test_download_refuses_bad_spans(sharded):
    path, _, _ = sharded
    with pytest.raises(ConfigError, match=r"the model has 4 blocks \(0:4\)"):
        download(DownloadConfig(model=path, blocks="2:9"))
    for bad in ("x", "3:1", "-1:2"):
        with pytest.raises(ConfigError, match="--blocks"):
            DownloadConfig(model=REPO, blocks=bad)
    with pytest.raises(ConfigError, match="needs a model"):
        DownloadConfig()
