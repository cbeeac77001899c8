"""Quantizers and the block transform (swarm/quant.py): round-trip bounds, packing, hostile shapes,
the modules' matmuls and gradients, stored bytes, and where a scheme runs. Pure CPU, in-process."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import swarm.quant as quant
from swarm.errors import ConfigError, ModelError
from swarm.lora import AppliedLora, applied, check_lora
from swarm.models import decoder_layer_class, load_config
import swarm.quantizers as quantizers
from swarm.quant import (
    Int8Linear,
    NF4Linear,
    QuantizedLinear,
    check_scheme,
    module_bytes,
    quant_scratch_bytes,
    quantize_block,
    quantized_block_bytes,
    runnable_schemes,
)
from swarm.quantizers import (
    NF4_CODE,
    NF4_GROUP,
    dequantize_int8,
    dequantize_nf4,
    nf4_code,
    quantize_int8,
    quantize_nf4,
    scratch,
)

CPU = torch.device("cpu")
CODE = torch.tensor(NF4_CODE)
HALF_GAP = ((CODE[1:] - CODE[:-1]) / 2).max().item()  # the farthest a normalized weight is from its level


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_nf4_code_is_the_normal_float_construction():
    assert torch.allclose(nf4_code().float(), CODE, atol=1e-6)
    assert CODE[0] == -1 and CODE[-1] == 1 and 0.0 in NF4_CODE and torch.all(CODE[1:] > CODE[:-1])


def test_int8_round_trip_is_within_half_a_step():
    weight = _randn(37, 100) * torch.linspace(0.01, 3, 37)[:, None]  # rows of very different scales
    weight[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and q.shape == weight.shape and scale.shape == (37,)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    error = (dequantize_int8(q, scale, torch.float32) - weight).abs()
    assert torch.all(error <= scale[:, None] / 2 * (1 + 1e-5))
    assert torch.equal(q[5], torch.zeros(100, dtype=torch.int8)) and torch.isfinite(scale).all()
    assert torch.all(q.abs().amax(1)[torch.arange(37) != 5] == 127)  # each row uses its whole range


def test_nf4_round_trip_picks_the_nearest_level():
    weight = _randn(9, 70)  # 630 weights: 9 whole groups and a partial one, groups crossing rows
    packed, absmax = quantize_nf4(weight)
    groups = -(-630 // NF4_GROUP)
    assert packed.dtype == torch.uint8 and packed.numel() == groups * NF4_GROUP // 2 and absmax.numel() == groups
    back = dequantize_nf4(packed, absmax, weight.shape, torch.float32)
    assert back.shape == weight.shape
    padded = F.pad(weight.reshape(-1), (0, groups * NF4_GROUP - 630)).view(groups, NF4_GROUP)
    assert torch.equal(absmax, padded.abs().amax(1))
    normalized = padded / absmax[:, None]
    nearest = CODE[(normalized[..., None] - CODE).abs().argmin(-1)]  # brute force
    assert torch.allclose(back.reshape(-1), (nearest * absmax[:, None]).reshape(-1)[:630], atol=1e-6)
    error = (back.reshape(-1) - weight.reshape(-1)).abs()
    assert torch.all(error <= absmax.repeat_interleave(NF4_GROUP)[:630] * HALF_GAP * (1 + 1e-5))


def test_nf4_packs_two_codes_per_byte_high_nibble_first():
    weight = torch.zeros(1, NF4_GROUP)
    weight[0, :16] = CODE * 2  # every level once, in order; absmax 2
    packed, absmax = quantize_nf4(weight)
    assert absmax.tolist() == [2.0]
    assert packed[:8].tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    assert packed[8:].tolist() == [0x77] * 24  # zeros are level 7 (the exact 0)
    assert torch.equal(dequantize_nf4(packed, absmax, weight.shape, torch.float32), weight)


@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (3, 100), (64, 1), (130, 65)])
@pytest.mark.parametrize("cls", [Int8Linear, NF4Linear])
def test_hostile_shapes_multiply_like_their_dequantized_weight(cls, shape):
    out_features, in_features = shape
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    module = cls.from_linear(linear)
    assert (module.in_features, module.out_features) == (in_features, out_features)
    weight = module.dequantized(torch.float32)
    assert weight.shape == (out_features, in_features)
    for tokens in (1, 5, 40):  # the int8 kernel (<= 16 rows on a CPU) and the dequantizing path
        x = _randn(2, tokens, in_features, seed=tokens)  # [batch, seq, in]
        expected = F.linear(x, weight, linear.bias)
        assert module(x).shape == expected.shape
        assert (module(x) - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantizing_into_scratch_buffers_equals_fresh_tensors(dtype):
    weight = _randn(33, 70)
    packed, absmax = quantize_nf4(weight)
    fresh = dequantize_nf4(packed, absmax, weight.shape, dtype)
    reference = (CODE[(packed.long()[:, None] >> torch.tensor([4, 0])) & 15].view(absmax.numel(), -1).to(dtype)
                 * absmax.to(dtype)[:, None]).view(-1)[:33 * 70].view(33, 70)  # one level at a time
    assert fresh.dtype == dtype and torch.equal(fresh, reference)
    out, index = scratch("test", 4096, dtype, CPU), scratch("test index", 4096, torch.int32, CPU)
    out.fill_(7)
    assert torch.equal(dequantize_nf4(packed, absmax, weight.shape, dtype, out=out, index=index), fresh)
    q, scale = quantize_int8(weight)
    assert torch.equal(dequantize_int8(q, scale, dtype, out=out), dequantize_int8(q, scale, dtype))
    assert scratch("test", 100, dtype, CPU).data_ptr() == out.data_ptr()  # reused, not reallocated
    assert scratch("test", 8192, dtype, CPU).numel() == 8192  # grown


def test_chunked_quantization_equals_one_pass(monkeypatch):
    weight = _randn(33, 200)
    whole_int8, whole_nf4 = quantize_int8(weight), quantize_nf4(weight)
    monkeypatch.setattr(quantizers, "_CHUNK", 128)  # many chunks, none aligned with rows
    for got, want in zip((*quantize_int8(weight), *quantize_nf4(weight)), (*whole_int8, *whole_nf4)):
        assert torch.equal(got, want)


def test_non_finite_weights_are_refused_with_the_module_name():
    block = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with torch.no_grad():
        block[0].weight[3, 3] = float("inf")
    for scheme in ("int8", "nf4"):
        with pytest.raises(ModelError, match="'0'|0 has non-finite"):
            quantize_block(block, scheme)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_gradients_flow_to_inputs_not_to_quantized_weights(scheme):
    module = quant.LINEAR_CLASSES[scheme].from_linear(torch.nn.Linear(48, 20))
    quantizers._SCRATCH.__dict__.pop("buffers", None)
    with torch.inference_mode():  # a forward request first: its scratch must serve backward passes too
        module(_randn(3, 48))
    x = _randn(3, 48).requires_grad_()
    module(x).pow(2).sum().backward()
    reference = x.detach().clone().requires_grad_()
    F.linear(reference, module.dequantized(torch.float32), module.bias).pow(2).sum().backward()
    assert torch.allclose(x.grad, reference.grad, atol=1e-5)
    assert not any(p.requires_grad for p in module.parameters())
    with torch.inference_mode():  # the inference path gives the same numbers
        assert torch.equal(module(x.detach()), module.matmul(x.detach()) + module.bias)


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_half_precision_inputs(scheme):
    linear = torch.nn.Linear(96, 40)
    module = quant.LINEAR_CLASSES[scheme].from_linear(linear)
    for tokens in (1, 20):
        x = _randn(tokens, 96)
        expected = F.linear(x, module.dequantized(torch.float32), linear.bias)
        out = module(x.bfloat16())
        assert out.dtype == torch.bfloat16
        assert (out.float() - expected).abs().max().item() <= 0.03 * expected.abs().max().item()


@pytest.fixture(scope="module")
def tiny_config(tiny_llama):
    return load_config(tiny_llama)


def _block(config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return decoder_layer_class(config)(config, layer_idx=0).eval()


@pytest.mark.parametrize("scheme", ["none", "int8", "nf4"])
def test_quantize_block_replaces_every_linear_and_counts_its_bytes(tiny_config, scheme):
    block = _block(tiny_config)
    linears = {name for name, m in block.named_modules() if type(m) is torch.nn.Linear}
    assert len(linears) == 7  # q, k, v, o, gate, up, down
    assert quantize_block(block, scheme, CPU) is block
    for name in linears:
        module = block.get_submodule(name)
        assert type(module) is (torch.nn.Linear if scheme == "none" else quant.LINEAR_CLASSES[scheme])
    for dtype in (torch.float32, torch.bfloat16):
        assert module_bytes(quantize_block(_block(tiny_config).to(dtype), scheme, CPU)) == \
            quantized_block_bytes(tiny_config, dtype, scheme)
    # the scratch of a matmul: the largest Linear (64 x 128) dequantized, plus NF4's int32 index
    per_weight = {"none": 0, "int8": 4, "nf4": 4 + 2}[scheme]
    assert quant_scratch_bytes(tiny_config, torch.float32, scheme) == 64 * 128 * per_weight


def test_quantized_bytes_of_a_7b_shaped_block():
    """Counted on the meta device: the targets of a Llama-2-7B block (hidden 4096, intermediate 11008)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=1)
    bf16 = quantized_block_bytes(config, torch.bfloat16, "none")
    assert bf16 == 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096)
    assert quantized_block_bytes(config, torch.bfloat16, "int8") / bf16 < 0.51
    assert quantized_block_bytes(config, torch.bfloat16, "nf4") / bf16 < 0.29


def test_quantizing_frees_the_float_weights(tiny_config):
    block = _block(tiny_config)
    weight = weakref.ref(block.mlp.down_proj.weight)
    quantize_block(block, "nf4", CPU)
    gc.collect()
    assert weight() is None


def test_lora_targets_a_quantized_linear(tiny_config):
    block = quantize_block(_block(tiny_config), "nf4", CPU)
    modules = {0: dict(block.named_modules())}
    q_proj = block.self_attn.q_proj
    assert isinstance(q_proj, QuantizedLinear) and isinstance(q_proj, torch.nn.Linear)
    a, b = _randn(2, 64, seed=1), _randn(64, 2, seed=2)
    check_lora(["0.self_attn.q_proj"], [a], [b], 0, 1, modules, max_rank=8, max_bytes=1 << 20)
    x = _randn(3, 64)
    with applied(AppliedLora([(q_proj, a, b)], scaling=0.5)):
        adapted = q_proj(x)
    assert torch.allclose(adapted, q_proj(x) + x @ a.t() @ b.t() * 0.5, atol=1e-6)


def test_scheme_checks():
    with pytest.raises(ConfigError, match="--quant 'int4' is not one of none, int8, nf4"):
        check_scheme("int4", CPU, torch.float32)
    assert runnable_schemes(CPU, torch.float32) == ["none", "int8", "nf4"]
    assert runnable_schemes(CPU, torch.bfloat16) == ["none", "int8", "nf4"]
    with pytest.raises(ConfigError, match=r"--quant nf4 cannot run on meta .*what runs there: nothing \(try"):
        check_scheme("nf4", torch.device("meta"), torch.float32)


def test_a_device_without_an_op_gets_a_message_naming_what_runs(monkeypatch):
    """Stands in for an accelerator that lacks one op nf4 needs (this machine has only a CPU)."""
    def missing(*args, **kwargs):
        raise NotImplementedError("aten::bucketize is not implemented for this device")

    monkeypatch.setattr(torch, "bucketize", missing)
    with pytest.raises(ConfigError, match=r"--quant nf4 cannot run on cpu in float32 \(NotImplementedError: "
                                          r"aten::bucketize.*what runs there: --quant none, int8"):
        check_scheme("nf4", CPU, torch.float32)
    check_scheme("int8", CPU, torch.float32)  # the others still run


# ---------------------------------------------------------------- a loaded span


def quantized_local_model(path: str, scheme: str):
    """The local transformers model with its decoder layers quantized by the same transform."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for layer in model.model.layers:
        quantize_block(layer, scheme, CPU)
    return model


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_span_quantizes_while_loading_and_equals_the_local_quantized_model(tiny_llama, tiny_config, scheme,
                                                                           monkeypatch):
    import server.loading
    from server.loading import load_span
    from swarm.weights import Checkpoint

    # the float tensors of the blocks so far: as read from the checkpoint, and as the blocks' parameters
    floats: list[weakref.ref] = []
    alive_when_a_block_loads: list[int] = []
    real_quantize = server.loading.quantize_block
    checkpoint = Checkpoint(tiny_llama)
    real_load = checkpoint.load

    def quantizing(block, scheme, device):
        floats.extend(weakref.ref(m.weight) for m in block.modules() if type(m) is torch.nn.Linear)
        return real_quantize(block, scheme, device)

    def loading(*args, **kwargs):
        gc.collect()
        alive_when_a_block_loads.append(sum(ref() is not None for ref in floats))
        tensors = real_load(*args, **kwargs)
        floats.extend(weakref.ref(t) for t in tensors.values() if t.ndim == 2)
        return tensors

    monkeypatch.setattr(server.loading, "quantize_block", quantizing)
    monkeypatch.setattr(checkpoint, "load", loading)
    span = load_span(checkpoint, tiny_config, 0, 4, torch.float32, CPU, quant=scheme)
    assert len(floats) == 4 * 2 * 7
    assert alive_when_a_block_loads == [0, 0, 0, 0]  # the float weights of a block are gone before the next loads

    local = quantized_local_model(tiny_llama, scheme)
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = local(ids).logits
        hidden = span(local.model.embed_tokens(ids))  # [batch, seq, hidden]
        logits = local.lm_head(local.model.norm(hidden))
        assert (logits - expected).abs().max().item() <= 1e-5  # float32, same kernels: measured 0 to 2e-7
        cache, steps = span.new_cache(), []
        for position in range(ids.shape[1]):
            steps.append(span(local.model.embed_tokens(ids[:, position:position + 1]), cache, position))
        incremental = local.lm_head(local.model.norm(torch.cat(steps, dim=1)))
        assert (incremental - expected).abs().max().item() <= 1e-4  # 1-token steps take the int8 kernel
