"""Pure parts of fine-tuning: LoRA specs and names, PEFT files, request checks, hooks, prompts, wire."""

from __future__ import annotations

import asyncio
import json
import math

import msgpack
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from swarm.blocks import add_prompt
from swarm.errors import BadRequest, ConfigError
from swarm.lora import AppliedLora, LoraSpec, TargetModule, applied, check_lora, peft_key, read_peft_adapter
from swarm.models import FAMILIES
from swarm.wire import BackwardRequest, BackwardResponse, encode, read_message

from client.tuning import Extras

LLAMA = FAMILIES["llama"]


def _read(data: bytes):
    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_message(reader)

    return asyncio.run(run())


def test_spec_from_peft_and_scaling():
    spec = LoraSpec.from_peft(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["v_proj", "q_proj"]))
    assert (spec.rank, spec.alpha, spec.dropout, spec.target_modules) == (8, 16.0, 0.05, ("q_proj", "v_proj"))
    assert spec.scaling == 2.0
    rs = LoraSpec.from_peft(LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert rs.scaling == 8 / math.sqrt(16)
    back = spec.to_peft("my/model")
    assert (back.r, back.lora_alpha, set(back.target_modules)) == (8, 16.0, {"q_proj", "v_proj"})


@pytest.mark.parametrize("field, value", [("use_dora", True), ("layers_to_transform", [0]), ("bias", "all"),
                                          ("modules_to_save", ["lm_head"])])
def test_spec_refuses_unsupported_variants(field, value):
    with pytest.raises(ConfigError, match=field):
        LoraSpec.from_peft(LoraConfig(r=4, target_modules=["q_proj"], **{field: value}))


def test_target_matching_follows_peft():
    names = LoraSpec(rank=1, alpha=1, target_modules=("q_proj", "mlp"))
    assert names.matches("model.layers.0.self_attn.q_proj") and names.matches("model.layers.3.mlp")
    assert not names.matches("model.layers.0.self_attn.qq_proj") and not names.matches("model.layers.0.mlp.up_proj")
    regex = LoraSpec(rank=1, alpha=1, target_modules=r".*layers\.[01]\.self_attn\.(q|v)_proj")
    assert regex.matches("model.layers.1.self_attn.v_proj") and not regex.matches("model.layers.2.self_attn.v_proj")


def test_peft_key_layout():
    target = TargetModule(block=3, path="self_attn.q_proj", in_features=64, out_features=64)
    assert target.wire_name == "3.self_attn.q_proj"
    assert peft_key("model.layers.{}.", target, "B") == "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"


def _write_adapter(path, tensors, config=None):
    path.mkdir(exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config or {"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                                   "target_modules": ["q_proj"]}))


def test_read_peft_adapter(tmp_path):
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    _write_adapter(tmp_path / "ok", {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": a,
                                     "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": b})
    spec, weights = read_peft_adapter(str(tmp_path / "ok"), LLAMA)
    assert spec.rank == 2 and list(weights) == [(1, "self_attn.q_proj")]
    assert torch.equal(weights[(1, "self_attn.q_proj")][0], a)

    with pytest.raises(ConfigError, match="not a PEFT adapter directory"):
        read_peft_adapter(str(tmp_path), LLAMA)
    _write_adapter(tmp_path / "half", {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": a})
    with pytest.raises(ConfigError, match="not both A and B"):
        read_peft_adapter(str(tmp_path / "half"), LLAMA)
    _write_adapter(tmp_path / "head", {"base_model.model.lm_head.lora_A.weight": a})
    with pytest.raises(ConfigError, match="not a LoRA weight of a block"):
        read_peft_adapter(str(tmp_path / "head"), LLAMA)
    _write_adapter(tmp_path / "ia3", {}, {"peft_type": "IA3"})
    with pytest.raises(ConfigError, match="LoRA adapters only"):
        read_peft_adapter(str(tmp_path / "ia3"), LLAMA)


def _modules():
    torch.manual_seed(0)
    block = torch.nn.Module()
    block.q_proj = torch.nn.Linear(8, 6, bias=False)
    block.act = torch.nn.ReLU()
    return {2: dict(block.named_modules())}, block


@pytest.mark.parametrize("names, a, b, match", [
    (["2.q_proj"], [torch.zeros(2, 8)], [], "equal lengths"),
    (["1.q_proj"], [torch.zeros(2, 8)], [torch.zeros(6, 2)], "outside the requested blocks 2:3"),
    (["2.k_proj"], [torch.zeros(2, 8)], [torch.zeros(6, 2)], "no Linear module 'k_proj'"),
    (["2.act"], [torch.zeros(2, 8)], [torch.zeros(6, 2)], "no Linear module 'act'"),
    (["q_proj"], [torch.zeros(2, 8)], [torch.zeros(6, 2)], "must look like"),
    (["2.q_proj"], [torch.zeros(2, 7)], [torch.zeros(6, 2)], r"expected \[rank, 8\] and \[6, rank\]"),
    (["2.q_proj"], [torch.zeros(2, 8, dtype=torch.int64)], [torch.zeros(6, 2)], "floating point"),
    (["2.q_proj"], [torch.zeros(5, 8)], [torch.zeros(6, 5)], "rank 5 .* --max-lora-rank 4"),
    (["2.q_proj", "2.q_proj"], [torch.zeros(2, 8)] * 2, [torch.zeros(6, 2)] * 2, "twice"),
])
def test_check_lora_rejects_bad_requests(names, a, b, match):
    modules, _ = _modules()
    with pytest.raises(BadRequest, match=match):
        check_lora(names, a, b, 2, 3, modules, max_rank=4, max_bytes=1 << 20)


def test_check_lora_caps_bytes():
    modules, _ = _modules()
    with pytest.raises(BadRequest, match="--max-adapter-mb"):
        check_lora(["2.q_proj"], [torch.zeros(4, 8)], [torch.zeros(6, 4)], 2, 3, modules, max_rank=4, max_bytes=100)


def test_applied_hooks_add_lora_and_are_removed():
    _, block = _modules()
    x = torch.randn(3, 8)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    base = block.q_proj(x)
    with applied(AppliedLora([(block.q_proj, a, b)], scaling=0.5)):
        adapted = block.q_proj(x)
    assert torch.allclose(adapted, base + x @ a.t() @ b.t() * 0.5)
    assert torch.equal(block.q_proj(x), base)  # the hook is gone


def test_dropout_masks_follow_seed_and_module_name():
    _, block = _modules()
    x = torch.randn(4, 8)
    a, b = torch.randn(2, 8), torch.randn(6, 2)

    def run(seed, name):
        with applied(AppliedLora([(block.q_proj, a, b)], scaling=1.0, dropout=0.5, seed=seed, names=[name])):
            return block.q_proj(x)

    assert torch.equal(run(1, "2.q_proj"), run(1, "2.q_proj"))  # a backward recompute draws the forward's masks
    assert not torch.equal(run(1, "2.q_proj"), run(2, "2.q_proj"))
    assert not torch.equal(run(1, "2.q_proj"), run(1, "3.q_proj"))


def test_add_prompt_only_touches_prompt_positions():
    hidden = torch.zeros(2, 5, 4)
    prompt = torch.ones(1, 3, 4)
    assert add_prompt(hidden, prompt, 0)[:, :, 0].tolist() == [[1, 1, 1, 0, 0]] * 2
    assert add_prompt(hidden, prompt, 2)[:, :, 0].tolist() == [[1, 0, 0, 0, 0]] * 2  # positions 2..6
    assert torch.equal(add_prompt(hidden, prompt, 3), hidden)


def test_extras_slice_by_blocks():
    extras = Extras(prompts=torch.randn(4, 1, 2, 8), lora_names=["0.q", "1.q", "3.q"], lora_blocks=[0, 1, 3],
                    lora_a=[torch.zeros(1)] * 3, lora_b=[torch.ones(1)] * 3, lora_scaling=2.0, seed=5)
    fields = extras.fields(1, 4)
    assert fields["lora_modules"] == ("1.q", "3.q") and fields["prompts"].shape == (3, 1, 2, 8)
    assert extras.indices(1, 4) == [1, 2] and fields["seed"] == 5
    session = extras.session_fields(3, 4)  # sessions get the adapter and prompts, no dropout seed
    assert session["lora_modules"] == ("3.q",) and session["prompts"].shape == (1, 1, 2, 8) and "seed" not in session


def test_wire_carries_tuples_of_tensors():
    request = BackwardRequest(start=0, end=2, hidden=torch.randn(1, 3, 4), grad_output=torch.randn(1, 3, 4),
                              prompts=torch.randn(2, 1, 2, 4), lora_modules=("0.q", "1.q"),
                              lora_a=(torch.randn(2, 4), torch.randn(2, 4)), lora_b=(torch.randn(4, 2),) * 2,
                              lora_scaling=2.0, lora_dropout=0.1, seed=9)
    decoded = _read(b"".join(bytes(part) for part in encode(request)))
    assert decoded.lora_modules == ("0.q", "1.q") and decoded.seed == 9
    assert all(torch.equal(x, y) for x, y in zip(decoded.lora_a + decoded.lora_b, request.lora_a + request.lora_b))
    assert torch.equal(decoded.prompts, request.prompts)
    empty = _read(b"".join(bytes(p) for p in encode(BackwardResponse(grad_input=torch.zeros(1, 1, 4)))))
    assert empty.grad_lora_a == () and empty.grad_prompts is None


def test_wire_rejects_a_tensor_list_pointing_past_its_buffers():
    parts = encode(BackwardResponse(grad_input=torch.zeros(1, 1, 4), grad_lora_a=(torch.zeros(2),)))
    header_len = int.from_bytes(bytes(parts[0][:4]), "little")
    header = msgpack.unpackb(bytes(parts[0][4:4 + header_len]))
    header["fields"]["grad_lora_a"][0]["__tensor__"] = 7
    packed = msgpack.packb(header)
    with pytest.raises(BadRequest, match="grad_lora_a.*buffer 7"):
        _read(len(packed).to_bytes(4, "little") + packed + b"".join(bytes(p) for p in parts[1:]))
