"""GPTQ and AWQ checkpoints served as 4-bit layers: exact against a model dequantized the same way.

The checkpoints are written here (tests/int4_files.py: round-to-nearest 4-bit, packed from the
formats' descriptions). The unpacking is checked three ways: a hand-computed word from the specs'
bit order; the same integers packed by compressed-tensors' own packer and dequantized by its own
decompressor (an independent implementation of ``(q - z) * s``); and whole spans and a swarm
against the float model whose weights are exactly the dequantized ones.

Tolerance: the 4-bit layers dequantize to bit-identical float32 weights, so spans match exactly
and a swarm's logits are within 1e-5 of the local reference; greedy tokens are identical.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from int4_files import dequantize, pack_awq, pack_gptq, rtn_int4, write_int4_checkpoint
from server.loading import load_span
from swarm.errors import ModelError
from swarm.int4 import Int4Linear, awq_tensors, gptq_tensors, unpack_int32
from swarm.models import load_config
from swarm.weights import open_checkpoint

CPU = torch.device("cpu")
ATOL = 1e-5


def test_bit_order_of_one_word_as_the_specs_say():
    word = torch.tensor([[0x87654321 - 2**32]], dtype=torch.int32)  # nibbles 1..8 from the lowest bits up
    assert unpack_int32(word, dim=1).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert unpack_int32(word, dim=0).flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    # GPTQ: one word of qweight [in/8, out] is 8 consecutive input features of one output
    scales = torch.ones(1, 8, dtype=torch.float16)
    zeros = torch.zeros(1, 1, dtype=torch.int32)  # stored z - 1 = 0 -> z = 1
    q, z, _, _ = gptq_tensors(word.expand(1, 8).contiguous(), zeros, scales, None, zero_offset=1)
    assert q[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8] and z.flatten().tolist() == [1] * 8
    # AWQ: nibble k of a word holds output column ORDER[k] = 0, 2, 4, 6, 1, 3, 5, 7
    q, _, _ = awq_tensors(word, zeros, scales)
    assert q[:, 0].tolist() == [1, 5, 2, 6, 3, 7, 4, 8]


def test_dequantization_matches_compressed_tensors():
    """The same 4-bit integers through compressed-tensors' packer and decompressor, and through our
    GPTQ and AWQ readers: the same float32 weights."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    q, z, s, g_idx = rtn_int4(weight, 32, min_zero=1)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    state = {"weight_packed": pack_to_int32((q - 8).to(torch.int8), 4),  # its format stores signed values
             "weight_zero_point": pack_to_int32((z - 8).to(torch.int8), 4, packed_dim=0),
             "weight_scale": s.float(), "weight_shape": torch.tensor(weight.shape)}
    theirs = PackedQuantizationCompressor.decompress(state, QuantizationScheme(targets=["Linear"], weights=args))
    expected = theirs["weight"]
    assert torch.equal(expected, dequantize(q, z, s.float(), g_idx))

    gptq = pack_gptq(q, z, s, g_idx)
    layer = Int4Linear(*gptq_tensors(gptq["qweight"], gptq["qzeros"], gptq["scales"].float(), gptq["g_idx"],
                                     zero_offset=1), None)
    assert torch.equal(layer.dequantized(torch.float32), expected)
    awq = pack_awq(q, z, s)
    layer = Int4Linear(*awq_tensors(awq["qweight"], awq["qzeros"], awq["scales"].float()), None, None)
    assert torch.equal(layer.dequantized(torch.float32), expected)


VARIANTS = {
    "gptq": dict(method="gptq"),
    "gptq-act-order": dict(method="gptq", act_order=True),
    "gptq_v2-symmetric": dict(method="gptq", v2=True, symmetric=True),
    "awq": dict(method="awq"),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    """{variant: (checkpoint dir, float reference model)}."""
    out = {}
    for name, kwargs in VARIANTS.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        path = str(tmp_path_factory.mktemp("int4") / name)
        out[name] = (path, write_int4_checkpoint(model, path, **kwargs))
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_span_equals_the_dequantized_model(checkpoints, variant):
    path, reference = checkpoints[variant]
    config = load_config(path)
    checkpoint = open_checkpoint(path, config)
    assert checkpoint.quant == f"{VARIANTS[variant]['method']}-int4"
    span = load_span(checkpoint, config, 1, 4, torch.float32, CPU)
    expected = reference.state_dict()
    for i, block in enumerate(span.blocks, start=1):
        layers = {name: m for name, m in block.named_modules() if isinstance(m, Int4Linear)}
        assert len(layers) == 7  # q, k, v, o, gate, up, down
        for name, layer in layers.items():
            assert torch.equal(layer.dequantized(torch.float32), expected[f"model.layers.{i}.{name}.weight"]), name
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = reference.model.embed_tokens(ids)
        first = reference.model.layers[0]
        position_ids = torch.arange(9).unsqueeze(0)
        rotary = reference.model.rotary_emb(hidden, position_ids)
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=reference.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=position_ids)
        hidden = first(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
        expected_out = reference.model(ids).last_hidden_state
        torch.testing.assert_close(reference.model.norm(span(hidden)), expected_out, rtol=0, atol=1e-6)


def test_qwen2_gptq_span_with_biases(tmp_path):
    """Qwen2's q/k/v projections have biases: they stay float next to the 4-bit weights."""
    from swarm.tiny import make_tiny_model

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(str(tmp_path / "qwen2"), "qwen2"),
                                                 dtype=torch.float32).eval()
    reference = write_int4_checkpoint(model, str(tmp_path / "gptq"), "gptq")
    config = load_config(str(tmp_path / "gptq"))
    span = load_span(open_checkpoint(str(tmp_path / "gptq"), config), config, 0, 4, torch.float32, CPU)
    assert isinstance(span.blocks[0].self_attn.q_proj, Int4Linear) and span.blocks[0].self_attn.q_proj.bias is not None
    ids = torch.randint(3, 1000, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(reference.model.norm(span(reference.model.embed_tokens(ids))),
                                   reference.model(ids).last_hidden_state, rtol=0, atol=1e-6)


def test_bfloat16_span_and_memory(checkpoints):
    """In bfloat16 the norms are cast and the 4-bit layers compute in bfloat16; the weights stay ~4 bits."""
    path, reference = checkpoints["gptq"]
    config = load_config(path)
    span = load_span(open_checkpoint(path, config), config, 0, 1, torch.bfloat16, CPU)
    layer = span.blocks[0].mlp.down_proj
    assert layer.dequantized(torch.bfloat16).dtype == torch.bfloat16
    assert span.blocks[0].input_layernorm.weight.dtype == torch.bfloat16
    hidden = torch.randn(1, 5, 64, dtype=torch.bfloat16)
    assert torch.isfinite(span(hidden)).all()
    # a 7B-shaped layer with groups of 128: 4 bits per weight + an fp16 scale and a zero per group
    big = Int4Linear(torch.randint(0, 16, (4096, 4096)), torch.randint(0, 16, (4096, 32)),
                     torch.rand(4096, 32, dtype=torch.float16), None, None)
    bits = 8 * sum(t.numel() * t.element_size() for t in big.buffers()) / (4096 * 4096)
    assert bits <= 4.2, bits


def _scratch_after_a_forward(span, dtype: torch.dtype) -> int:
    """Bytes of the scratch buffers a fresh thread holds after one forward through ``span`` in ``dtype``."""
    import threading

    from swarm import quantizers

    held: list[int] = []

    def run() -> None:
        with torch.no_grad():
            span(torch.randn(1, 3, 64).to(dtype))
        held.append(sum(b.numel() * b.element_size() for b in quantizers._SCRATCH.__dict__["buffers"].values()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    return held[0]


@pytest.mark.parametrize("variant", ["gptq", "gptq-act-order", "awq"])
def test_memory_planning_counts_4bit_blocks(checkpoints, variant, monkeypatch, capsys):
    """A block counts as the 4-bit layers it loads as (not at --dtype size), plus their dequantization
    scratch, so the default --num-blocks fills what 4-bit blocks leave free."""
    import server.loading
    from server.loading import block_bytes, default_num_blocks
    from swarm.models import kv_bytes_per_token
    from swarm.prequantized import int4_format
    from swarm.quant import module_bytes, quant_scratch_bytes

    path, _ = checkpoints[variant]
    config = load_config(path)
    fmt = int4_format(config)
    assert fmt.act_order == (variant == "gptq-act-order")
    for dtype in (torch.float32, torch.bfloat16):
        span = load_span(open_checkpoint(path, config), config, 0, 1, dtype, CPU)
        assert block_bytes(config, dtype, fmt) == module_bytes(span.blocks[0]) < block_bytes(config, dtype) / 2
        assert quant_scratch_bytes(config, dtype, fmt) == _scratch_after_a_forward(span, dtype) > 0

    float_block = block_bytes(config, torch.float32) + 64 * kv_bytes_per_token(config, torch.float32)
    int4_block = block_bytes(config, torch.float32, fmt) + 64 * kv_bytes_per_token(config, torch.float32)
    scratch = quant_scratch_bytes(config, torch.float32, fmt)
    usable = 5 * int4_block + 8  # past the headroom and the scratch: room for 5 4-bit blocks
    monkeypatch.setattr(server.loading, "available_ram",
                        lambda: int((server.loading.HEADROOM_BYTES + scratch + usable) / 0.8))
    config.num_hidden_layers = 8
    assert default_num_blocks(config, CPU, torch.float32, 64, fmt) == 5
    assert default_num_blocks(config, CPU, torch.float32, 64) == (usable + scratch) // float_block < 5
    out = capsys.readouterr().out
    assert f"quantized to {fmt.label}" in out and f"{fmt.label} dequantization scratch" in out


def test_4bit_block_bytes_of_a_7b_shaped_block():
    """A Llama-2-7B block in GPTQ with groups of 128: ~0.27x of bfloat16 (4 bits + a float16 scale and a zero
    point per 128 weights; the norms stay bfloat16)."""
    from transformers import LlamaConfig

    from server.loading import block_bytes
    from swarm.prequantized import Int4Format

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=1)
    weights = 4 * 4096 * 4096 + 3 * 4096 * 11008
    groups = (4 * 4096 * 4096 + 2 * 4096 * 11008) // 128 + 4096 * 11008 // 128  # rows x groups per row
    expected = weights // 2 + 3 * groups + 2 * 2 * 4096
    assert block_bytes(config, torch.bfloat16, Int4Format("gptq", 128)) == expected
    assert expected / block_bytes(config, torch.bfloat16) < 0.27


@pytest.fixture(scope="module")
def gptq_swarm(checkpoints, llama_swarm):
    """Two servers (0:2, 2:4) of the GPTQ act-order checkpoint in the shared swarm, under their own prefix."""
    path, reference = checkpoints["gptq-act-order"]
    prefix = "tiny-gptq-act-order"
    procs = [llama_swarm.start_server(path, span, "--num-threads", "1", "--throughput", "100", "--dht-prefix", prefix,
                                      wait=False) for span in ("0:2", "2:4")]
    try:
        for proc in procs:
            proc.wait_for("Server ONLINE", 180)
        yield path, reference, prefix
    finally:
        for proc in procs:
            llama_swarm.stop(proc)


def _gptq_client(gptq_swarm, llama_swarm, **kwargs):
    from swarm import AutoDistributedModelForCausalLM

    path, reference, prefix = gptq_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=llama_swarm.initial_peers,
                                                            dht_prefix=prefix, **kwargs)
    model.generation_config.eos_token_id = reference.generation_config.eos_token_id = None
    return model


@pytest.mark.integration
def test_gptq_swarm_equals_the_dequantized_model(gptq_swarm, llama_swarm):
    """The client reads the checkpoint's float embeddings and head; the servers' blocks stay 4-bit."""
    from client.loop import run_sync

    _, reference, _ = gptq_swarm
    model = _gptq_client(gptq_swarm, llama_swarm)
    try:
        records = run_sync(model.remote.servers(force=True))
        assert {r.quant for servers in records.values() for r in servers.values()} == {"gptq-int4"}
        ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert (model(ids).logits - reference(ids).logits).abs().max().item() <= ATOL
        prompt = ids[:1, :6]
        assert torch.equal(model.generate(prompt, max_new_tokens=20, do_sample=False),
                           reference.generate(prompt, max_new_tokens=20, do_sample=False))
    finally:
        model.shutdown()


@pytest.mark.integration
def test_lora_gradients_through_4bit_servers_match_a_local_dequantized_peft_model(gptq_swarm, llama_swarm,
                                                                                    tmp_path):
    """LoRA on the 4-bit layers (QLoRA on a GPTQ checkpoint): the same loss and gradients as peft on the float
    model whose weights are the dequantized ones; tolerances as for float servers (tests/test_finetune.py)."""
    import copy

    from peft import LoraConfig, PeftModel

    from test_finetune import TARGETS, _assert_grad_close, _peft_grads, _randomize_lora

    _, reference, _ = gptq_swarm
    model = _gptq_client(gptq_swarm, llama_swarm, lora=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    try:
        _randomize_lora(model)
        ids = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(3))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        model.save_adapter(str(tmp_path / "adapter"))
        local = PeftModel.from_pretrained(copy.deepcopy(reference), str(tmp_path / "adapter"), is_trainable=True).eval()
        expected = local(input_ids=ids, labels=ids)
        expected.loss.backward()
        assert (out.logits - expected.logits).abs().max().item() <= ATOL
        for what, actual, wanted in _peft_grads(local, model):
            _assert_grad_close(actual, wanted, what)
    finally:
        model.shutdown()


# -- what cannot be served ------------------------------------------------------------------------------


def _with_quantization_config(src: str, dst, quantization_config: dict) -> str:
    os.makedirs(dst)
    for name in os.listdir(src):
        os.symlink(os.path.join(src, name), os.path.join(dst, name))
    os.remove(os.path.join(dst, "config.json"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return str(dst)


@pytest.mark.parametrize("quantization_config, message", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, r"quant_method 'bitsandbytes'.*--quant"),
    ({"quant_method": "fp8"}, r"quant_method 'fp8'"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, r"8-bit GPTQ"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, r"'marlin'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, r"AWQ version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 0}, r"group_size 0"),
])
def test_unsupported_quantization_configs_are_refused(checkpoints, tmp_path, quantization_config, message):
    path = _with_quantization_config(checkpoints["gptq"][0], tmp_path / "q", quantization_config)
    with pytest.raises(ModelError, match=message):
        open_checkpoint(path, load_config(path))


def test_serve_refuses_quant_on_a_4bit_checkpoint(checkpoints):
    """Its 4-bit layers are not plain Linear modules: --quant would change nothing while announcing it did."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "swarm.cli", "serve", "--model", checkpoints["awq"][0], "--quant",
                          "int8", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"], capture_output=True, text=True,
                         timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    assert "already quantized (awq-int4)" in out.stderr + out.stdout and "drop --quant" in out.stderr + out.stdout


def test_malformed_4bit_tensors_name_the_block_and_layer(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src = checkpoints["awq"][0]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors["model.layers.2.mlp.up_proj.qzeros"] = tensors["model.layers.2.mlp.up_proj.qzeros"][:, :3].contiguous()
    del tensors["model.layers.3.self_attn.o_proj.qzeros"]
    broken = tmp_path / "broken"
    broken.mkdir()
    os.symlink(os.path.join(src, "config.json"), broken / "config.json")
    save_file(tensors, str(broken / "model.safetensors"))
    config = load_config(str(broken))
    checkpoint = open_checkpoint(str(broken), config)
    load_span(checkpoint, config, 0, 2, torch.float32, CPU)  # untouched blocks still load
    with pytest.raises(ModelError, match=r"block 2, mlp\.up_proj: malformed 4-bit layer: qzeros"):
        load_span(checkpoint, config, 2, 3, torch.float32, CPU)
    with pytest.raises(ModelError, match=r"block 3: self_attn\.o_proj\.qweight has no self_attn\.o_proj\.qzeros"):
        load_span(checkpoint, config, 3, 4, torch.float32, CPU)
