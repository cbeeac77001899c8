"""Server-side loading (server/loading.py): how many blocks fit a device, and moving to another span
while keeping the blocks both spans share."""

from __future__ import annotations

import pytest
import torch

from server.loading import (
    available_ram,
    block_bytes,
    blocks_that_fit,
    default_num_blocks,
    load_span,
    respan,
    shared_blocks,
)
from swarm.errors import ConfigError
from swarm.models import decoder_layer_class, kv_bytes_per_token, load_config
from swarm.weights import Checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_config(tiny_llama):
    return load_config(tiny_llama)


# ---------------------------------------------------------------- how many blocks fit


def test_block_bytes_counts_one_block(tiny_config):
    layer = decoder_layer_class(tiny_config)(tiny_config, layer_idx=0)
    expected = sum(p.numel() * 4 for p in layer.parameters()) + sum(b.numel() * 4 for b in layer.buffers())
    assert block_bytes(tiny_config, torch.float32) == expected
    assert block_bytes(tiny_config, torch.bfloat16) == expected // 2


def test_blocks_that_fit():
    gib = 2**30
    assert blocks_that_fit(11 * gib, 1.0, gib, 80) == 10  # 1 GiB headroom
    assert blocks_that_fit(11 * gib, 0.5, gib // 2, 80) == 9
    assert blocks_that_fit(100 * gib, 1.0, gib, 8) == 8  # never more than the model has
    assert blocks_that_fit(gib // 2, 0.9, 1, 8) == 0


def test_default_num_blocks_on_cpu_prints_the_budget(tiny_config, capsys):
    assert available_ram() > 0
    assert default_num_blocks(tiny_config, CPU, torch.float32, cache_tokens=1024) == tiny_config.num_hidden_layers
    out = capsys.readouterr().out
    assert "Memory budget:" in out and "available RAM" in out and "--cache-tokens 1024" in out


def test_default_num_blocks_says_what_to_change_when_nothing_fits(tiny_config, monkeypatch):
    import server.loading

    monkeypatch.setattr(server.loading, "available_ram", lambda: 2**30)  # all of it is headroom
    with pytest.raises(ConfigError, match="--cache-tokens.*--num-blocks"):
        default_num_blocks(tiny_config, CPU, torch.float32, cache_tokens=1024)
    assert kv_bytes_per_token(tiny_config, torch.float32) > 0


def test_default_num_blocks_counts_quantized_blocks(tiny_config, monkeypatch, capsys):
    import server.loading
    from swarm.quant import quant_scratch_bytes, quantized_block_bytes

    cache = 64 * kv_bytes_per_token(tiny_config, torch.float32)
    float_block = block_bytes(tiny_config, torch.float32) + cache
    scratch = quant_scratch_bytes(tiny_config, torch.float32, "nf4")  # reserved once for quantized matmuls
    assert scratch >= quant_scratch_bytes(tiny_config, torch.float32, "int8") > 0
    # RAM for 1.2 float blocks (with their KV cache) after the headroom and the scratch, at the CPU's fraction
    ram = int((server.loading.HEADROOM_BYTES + scratch + 1.2 * float_block)
              / server.loading.USABLE_FRACTION["cpu"]) + 1
    monkeypatch.setattr(server.loading, "available_ram", lambda: ram)
    fits = {quant: default_num_blocks(tiny_config, CPU, torch.float32, 64, quant) for quant in ("none", "int8", "nf4")}
    assert fits["none"] == 1 and fits["int8"] == 3 and fits["nf4"] == 4  # the model has 4 blocks
    out = capsys.readouterr().out
    nf4_bytes = quantized_block_bytes(tiny_config, torch.float32, "nf4")
    assert nf4_bytes == block_bytes(tiny_config, torch.float32, "nf4") < block_bytes(tiny_config, torch.float32) / 5
    assert f"({nf4_bytes} bytes, quantized to nf4)" in out and "4 of the model's 4 blocks fit" in out
    assert "headroom and 48.00 KiB of nf4 dequantization scratch" in out  # 64 x 128 weights, 6 bytes each


# ---------------------------------------------------------------- moving to another span


def test_respan_keeps_shared_blocks_and_loads_only_new_ones(tiny_llama, tiny_config, monkeypatch):
    import server.loading

    checkpoint = Checkpoint(tiny_llama)
    old = load_span(checkpoint, tiny_config, 0, 3, torch.float32, CPU)
    loaded: list[tuple[int, int]] = []
    real_load_span = server.loading.load_span

    def counting_load_span(checkpoint, config, start, end, *args, **kwargs):
        loaded.append((start, end))
        return real_load_span(checkpoint, config, start, end, *args, **kwargs)

    monkeypatch.setattr(server.loading, "load_span", counting_load_span)
    kept = shared_blocks(old, 1, 4)
    assert sorted(kept) == [1, 2]
    new = respan(tiny_config, kept, checkpoint, 1, 4, torch.float32, CPU)
    assert loaded == [(3, 4)]  # never reloads blocks 1 and 2
    assert new.blocks[0] is old.blocks[1] and new.blocks[1] is old.blocks[2]
    fresh = real_load_span(checkpoint, tiny_config, 1, 4, torch.float32, CPU)
    hidden = torch.randn(2, 5, tiny_config.hidden_size, generator=torch.Generator().manual_seed(0))  # [batch, seq, hidden]
    with torch.inference_mode():
        assert torch.equal(new(hidden), fresh(hidden))
        cache_new, cache_fresh = new.new_cache(), fresh.new_cache()  # incremental steps too
        for position in range(3):
            step = hidden[:, position:position + 1]
            assert torch.equal(new(step, cache_new, position), fresh(step, cache_fresh, position))


def test_respan_to_a_disjoint_span_loads_everything(tiny_llama, tiny_config):
    checkpoint = Checkpoint(tiny_llama)
    old = load_span(checkpoint, tiny_config, 0, 2, torch.float32, CPU)
    kept = shared_blocks(old, 2, 4)
    assert kept == {}
    new = respan(tiny_config, kept, checkpoint, 2, 4, torch.float32, CPU)
    assert (new.start, new.end, len(new.blocks)) == (2, 4, 2)
