"""Reading only a span's tensors: swarm.weights.Checkpoint, server.loading.load_span, swarm.models.load_config.

Hub ids are resolved offline (HF_HUB_OFFLINE=1) from a directory laid out like the huggingface_hub
cache (tests/hub_layout.py), so nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import shutil

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from hub_layout import make_hub_cache, remove_from_hub_cache
from server.loading import load_span
from swarm.errors import ModelError
from swarm.models import load_config
from swarm.tiny import TINY_LLAMA
from swarm.weights import INDEX_FILE, SINGLE_FILE, Checkpoint

REPO = "tiny-org/tiny-llama"
CPU = torch.device("cpu")
NUM_LAYERS = TINY_LLAMA["num_hidden_layers"]


def _block_names(weight_map: dict[str, str], *blocks: int) -> list[str]:
    return [n for n in weight_map if n.startswith(tuple(f"model.layers.{i}." for i in blocks))]


def _shards_of(weight_map: dict[str, str], *blocks: int) -> set[str]:
    return {weight_map[n] for n in _block_names(weight_map, *blocks)}


def _assert_span_equals_model(span, model, start: int, end: int, dtype: torch.dtype = torch.float32) -> None:
    assert (span.start, span.end, len(span.blocks)) == (start, end, end - start)
    for i in range(start, end):
        expected = model.model.layers[i].state_dict()
        got = span.blocks[i - start].state_dict()
        assert set(got) == set(expected), f"block {i}"
        for name, tensor in expected.items():
            assert got[name].dtype == dtype, f"block {i} {name}"
            assert got[name].device.type == "cpu"
            assert torch.equal(got[name], tensor.to(dtype)), f"block {i} {name}"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny random Llama (hidden 64, 4 layers) saved in several safetensors shards + index; (dir, model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = str(tmp_path_factory.mktemp("sharded"))
    config = AutoConfig.for_model("llama", **TINY_LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
    with open(os.path.join(path, INDEX_FILE)) as f:
        weight_map = json.load(f)["weight_map"]
    shards = set(weight_map.values())
    assert len(shards) > 3, shards  # the point of the fixture: blocks live in different files
    assert not os.path.exists(os.path.join(path, SINGLE_FILE))
    return path, model, weight_map


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1; huggingface_hub reads it once at import, so its constant is set too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def fetched(monkeypatch):
    """The file names Checkpoint asks hf_hub_download for, in order."""
    names: list[str] = []
    real = huggingface_hub.hf_hub_download

    def spy(repo_id, filename, *args, **kwargs):
        names.append(filename)
        return real(repo_id, filename, *args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    return names


# -- the hub-like cache itself ------------------------------------------------------------------------


def test_hub_layout_matches_what_huggingface_hub_resolves(tmp_path, sharded, offline):
    path, _, _ = sharded
    cache = tmp_path / "hub"
    snapshot = make_hub_cache(cache, REPO, path)
    storage = cache / "models--tiny-org--tiny-llama"
    commit = os.path.basename(snapshot)
    assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)
    assert (storage / "refs" / "main").read_text() == commit
    assert os.path.islink(os.path.join(snapshot, INDEX_FILE))
    for revision in (None, "main", commit):
        resolved = huggingface_hub.hf_hub_download(REPO, INDEX_FILE, revision=revision, cache_dir=str(cache))
        assert resolved == os.path.join(snapshot, INDEX_FILE)
    with pytest.raises(huggingface_hub.errors.LocalEntryNotFoundError):
        huggingface_hub.hf_hub_download(REPO, "no-such-file.txt", cache_dir=str(cache))


# -- hub ids, offline ---------------------------------------------------------------------------------


def test_hub_checkpoint_lists_all_tensors(tmp_path, sharded, offline, fetched):
    path, model, weight_map = sharded
    cache = tmp_path / "hub"
    snapshot = make_hub_cache(cache, REPO, path)
    commit = os.path.basename(snapshot)
    for revision in (None, "main", commit):
        checkpoint = Checkpoint(REPO, revision=revision, cache_dir=str(cache))
        assert not checkpoint.is_local
        assert checkpoint.weight_map == weight_map
        assert set(checkpoint.weight_map) == set(model.state_dict())
    # listing reads only the index, never a shard
    assert set(fetched) == {INDEX_FILE}


def test_hub_span_fetches_only_the_shards_of_its_blocks(tmp_path, sharded, offline, fetched):
    """Blocks 2:4 from a cache that holds only the config, the index and the shards of blocks 2 and 3."""
    path, model, weight_map = sharded
    needed = _shards_of(weight_map, 2, 3)
    absent = set(weight_map.values()) - needed
    assert absent, "every shard holds a tensor of blocks 2:4; the test would prove nothing"
    cache = tmp_path / "hub"
    make_hub_cache(cache, REPO, path, files=["config.json", INDEX_FILE, *sorted(needed)])

    config = load_config(REPO, cache_dir=str(cache))
    checkpoint = Checkpoint(REPO, cache_dir=str(cache))
    assert set(checkpoint.weight_map) == set(model.state_dict())  # the index lists tensors it cannot read here
    assert set(checkpoint.shards_for(_block_names(weight_map, 2, 3))) == needed
    span = load_span(checkpoint, config, 2, 4, torch.float32, CPU)

    _assert_span_equals_model(span, model, 2, 4)
    assert set(fetched) == {INDEX_FILE} | needed
    assert not any(p.requires_grad for p in span.parameters())


def test_hub_span_after_deleting_other_shards_and_missing_shard_error(tmp_path, sharded, offline, fetched):
    path, model, weight_map = sharded
    needed = _shards_of(weight_map, 2, 3)
    block0_shards = _shards_of(weight_map, 0)
    assert block0_shards.isdisjoint(needed)
    cache = tmp_path / "hub"
    snapshot = make_hub_cache(cache, REPO, path)
    for shard in sorted(set(weight_map.values()) - needed):
        remove_from_hub_cache(snapshot, shard)
    blobs = os.listdir(cache / "models--tiny-org--tiny-llama" / "blobs")
    assert len(blobs) == len(os.listdir(snapshot)) == len(needed) + 3  # + config, generation config, index

    config = load_config(REPO, cache_dir=str(cache))
    checkpoint = Checkpoint(REPO, cache_dir=str(cache))
    span = load_span(checkpoint, config, 2, 4, torch.float32, CPU)
    _assert_span_equals_model(span, model, 2, 4)

    # block 0's shard is not in the cache and the hub cannot be reached: a clear ModelError
    fetched.clear()
    missing = sorted(block0_shards)[0]
    with pytest.raises(ModelError) as info:
        load_span(checkpoint, config, 0, 1, torch.float32, CPU)
    message = str(info.value)
    assert missing in message and REPO in message and "offline" in message and "cache" in message
    assert fetched == [missing]  # gave up at the first absent shard


def test_hub_single_file_checkpoint_offline(tmp_path, single, offline, fetched):
    """No index in the repo (nor in the cache): the single model.safetensors is used."""
    path, tensors = single
    cache = tmp_path / "hub"
    make_hub_cache(cache, "tiny-org/tiny-single", path)
    checkpoint = Checkpoint("tiny-org/tiny-single", cache_dir=str(cache))
    assert set(checkpoint.weight_map) == set(tensors)
    span = load_span(checkpoint, load_config("tiny-org/tiny-single", cache_dir=str(cache)), 3, 4, torch.float32, CPU)
    assert torch.equal(span.blocks[0].mlp.down_proj.weight, tensors["model.layers.3.mlp.down_proj.weight"])
    assert fetched[:2] == [INDEX_FILE, SINGLE_FILE] and set(fetched) == {INDEX_FILE, SINGLE_FILE}


def test_hub_checkpoint_unknown_repo_offline(tmp_path, offline):
    """Offline and not cached is a download problem, not a "convert to safetensors" one."""
    cache = tmp_path / "hub"
    cache.mkdir()
    with pytest.raises(ModelError, match="tiny-org/no-such-model") as info:
        Checkpoint("tiny-org/no-such-model", cache_dir=str(cache))
    assert "offline" in str(info.value) and "not in the hub cache" in str(info.value)
    assert "convert" not in str(info.value)


def test_load_config_hub_id_offline(tmp_path, sharded, offline):
    path, model, _ = sharded
    cache = tmp_path / "hub"
    make_hub_cache(cache, REPO, path, files=["config.json"])
    config = load_config(REPO, cache_dir=str(cache))
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers) == (64, NUM_LAYERS)
    assert config.num_key_value_heads == model.config.num_key_value_heads
    assert config._attn_implementation == "sdpa"


def test_load_config_unknown_repo_offline(tmp_path, offline):
    cache = tmp_path / "hub"
    cache.mkdir()
    with pytest.raises(ModelError, match="tiny-org/no-such-model"):
        load_config("tiny-org/no-such-model", cache_dir=str(cache))


# -- local directories --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tiny_llama):
    """make_tiny_model's single-file checkpoint (conftest's ``tiny_llama``); (dir, its tensors)."""
    assert not os.path.exists(os.path.join(tiny_llama, INDEX_FILE))
    return tiny_llama, load_file(os.path.join(tiny_llama, SINGLE_FILE))


def _copy_without(src: str, dst, drop) -> str:
    """A copy of single-file checkpoint ``src`` at ``dst`` without the tensors ``drop(name)`` is true for."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = {n: t for n, t in load_file(os.path.join(src, SINGLE_FILE)).items() if not drop(n)}
    save_file(tensors, os.path.join(dst, SINGLE_FILE), metadata={"format": "pt"})
    return str(dst)


def test_local_single_file_checkpoint(single):
    path, tensors = single
    checkpoint = Checkpoint(path)
    assert checkpoint.is_local
    assert set(checkpoint.weight_map) == set(tensors)
    assert set(checkpoint.weight_map.values()) == {SINGLE_FILE}
    config = load_config(path)
    span = load_span(checkpoint, config, 1, 3, torch.float32, CPU)
    for i in (1, 2):
        prefix = f"model.layers.{i}."
        got = span.blocks[i - 1].state_dict()
        expected = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
        assert set(got) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor)
    # a client's part: embeddings, final norm, head and nothing else
    head = checkpoint.load(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
    assert set(head) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert torch.equal(head["lm_head.weight"], tensors["lm_head.weight"])


def test_local_sharded_checkpoint(sharded):
    path, model, weight_map = sharded
    checkpoint = Checkpoint(path)
    assert checkpoint.is_local and checkpoint.weight_map == weight_map
    span = load_span(checkpoint, load_config(path), 0, NUM_LAYERS, torch.float32, CPU)
    _assert_span_equals_model(span, model, 0, NUM_LAYERS)


def test_local_pytorch_bin_only_is_refused(tmp_path, single):
    path, tensors = single
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(os.path.join(path, "config.json"), legacy)
    torch.save(tensors, legacy / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors"):
        Checkpoint(str(legacy))


def test_local_checkpoint_without_a_block(tmp_path, single):
    path, _ = single
    broken = _copy_without(path, tmp_path / "no-block-3", lambda n: n.startswith("model.layers.3."))
    checkpoint = Checkpoint(broken)
    config = load_config(broken)
    load_span(checkpoint, config, 1, 3, torch.float32, CPU)  # blocks that are there still load
    with pytest.raises(ModelError, match=r"block 3\b"):
        load_span(checkpoint, config, 2, 4, torch.float32, CPU)


def test_local_checkpoint_missing_one_tensor_of_a_block(tmp_path, single):
    path, _ = single
    broken = _copy_without(path, tmp_path / "no-down-proj", lambda n: n == "model.layers.3.mlp.down_proj.weight")
    with pytest.raises(ModelError, match=r"block 3\b.*mlp\.down_proj\.weight"):
        load_span(Checkpoint(broken), load_config(broken), 2, 4, torch.float32, CPU)


def test_load_unknown_tensor_names_the_tensor(single):
    path, _ = single
    with pytest.raises(ModelError, match="model.layers.99.mlp.up_proj.weight"):
        Checkpoint(path).load(["model.norm.weight", "model.layers.99.mlp.up_proj.weight"])


def test_load_span_converts_dtype(sharded):
    path, model, _ = sharded
    span = load_span(Checkpoint(path), load_config(path), 1, 3, torch.bfloat16, CPU)
    assert {p.dtype for p in span.parameters()} == {torch.bfloat16}
    _assert_span_equals_model(span, model, 1, 3, dtype=torch.bfloat16)
    hidden = torch.randn(1, 5, TINY_LLAMA["hidden_size"], dtype=torch.bfloat16)
    out = span(hidden)
    assert out.dtype == torch.bfloat16 and out.shape == hidden.shape and torch.isfinite(out).all()


# -- numerical exactness vs the transformers model -------------------------------------------------------


@torch.no_grad()
def test_spans_compose_to_the_full_model(tmp_path, sharded, offline):
    path, model, _ = sharded
    cache = tmp_path / "hub"
    make_hub_cache(cache, REPO, path)
    checkpoint = Checkpoint(REPO, cache_dir=str(cache))
    config = load_config(REPO, cache_dir=str(cache))
    first = load_span(checkpoint, config, 0, 2, torch.float32, CPU)
    second = load_span(checkpoint, config, 2, NUM_LAYERS, torch.float32, CPU)
    whole = load_span(checkpoint, config, 0, NUM_LAYERS, torch.float32, CPU)

    torch.manual_seed(1)
    input_ids = torch.randint(3, TINY_LLAMA["vocab_size"], (2, 7))
    expected = model.model(input_ids=input_ids).last_hidden_state  # after the final norm
    hidden = model.model.embed_tokens(input_ids)
    composed = second(first(hidden))
    torch.testing.assert_close(model.model.norm(composed), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.model.norm(whole(hidden)), expected, rtol=1e-5, atol=1e-5)
    # the mask is causal: a later token does not change earlier outputs
    prefix = second(first(hidden[:, :4]))
    torch.testing.assert_close(prefix, composed[:, :4], rtol=1e-5, atol=1e-5)


def _file_mappings(folder: str) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of files in ``folder`` (Linux /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        lines = [line.split() for line in f]
    return [tuple(int(x, 16) for x in line[0].split("-")) for line in lines
            if len(line) >= 6 and line[5].startswith(os.path.realpath(folder))]


def test_served_weights_are_owned_memory_not_views_of_the_mapped_file(sharded):
    """In the checkpoint's own dtype (float32 here, so no conversion copies them) a span's weights are
    copied out of safetensors' memory map: 64-byte aligned, and counted in RSS as the server's own."""
    path, model, _ = sharded
    span = load_span(Checkpoint(path), load_config(path), 0, 2, torch.float32, CPU)
    tensors = [*span.parameters(), *span.buffers()]
    mappings = _file_mappings(path)
    assert not [t for t in tensors if any(start <= t.data_ptr() < end for start, end in mappings)]
    assert {t.data_ptr() % 64 for t in tensors if t.numel()} == {0}
    _assert_span_equals_model(span, model, 0, 2)
