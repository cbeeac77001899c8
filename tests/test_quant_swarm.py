"""Quantized servers on real peers (``swarm serve --quant``), against local transformers models whose
decoder layers were quantized by the same transform (:func:`swarm.quant.quantize_block`).

One swarm: nf4 servers for blocks 0:2 and 2:4 (a chain of two quantized spans), an int8 server for
0:4 and a float server for 0:4; every client picks its servers with ``allowed_quant``.

Tolerances (float32 compute everywhere, the same kernels on both sides): logits within 1e-5 (measured
0 to 3e-7), greedy tokens identical; LoRA and prompt gradients within 1e-4 of the reference's largest
entry, as for float servers (tests/test_finetune.py).
"""

from __future__ import annotations

import pytest
import torch

from swarm.errors import MissingBlocksError
from swarm.local_swarm import LocalSwarm
from swarm.quant import quantize_block
from test_finetune import TARGETS, _add_prompt, _assert_grad_close, _randomize_lora

pytestmark = pytest.mark.integration

ATOL = 1e-5
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def quant_swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(log_dir=str(tmp_path_factory.mktemp("quant-swarm"))) as swarm:
        swarm.start_dht()
        for span, quant in (("0:2", "nf4"), ("2:4", "nf4"), ("0:4", "int8"), ("0:4", "none")):
            swarm.start_server(tiny_llama, span, "--quant", quant, "--num-threads", "1", wait=False,
                               name=f"{quant}_{span.replace(':', '_')}")
        for proc in swarm.procs[1:]:
            proc.wait_for("Server ONLINE", 180)
        yield swarm


def _client(path: str, swarm: LocalSwarm, **kwargs):
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, **kwargs)
    model.generation_config.eos_token_id = None
    return model


def _local(path: str, scheme: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    for layer in model.model.layers:
        quantize_block(layer, scheme, CPU)
    return model


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", ["nf4", "int8", "none"])
def test_quantized_servers_match_the_local_model_quantized_the_same_way(tiny_llama, quant_swarm, scheme):
    model = _client(tiny_llama, quant_swarm, allowed_quant=(scheme,))
    local = _local(tiny_llama, scheme)
    try:
        ids = _ids(2, 12, seed=0)
        with torch.no_grad():
            remote_logits, local_logits = model(ids).logits, local(ids).logits
        assert (remote_logits - local_logits).abs().max().item() <= ATOL
        if scheme != "none":  # the comparison can tell the schemes apart: a quantized model differs from float
            with torch.no_grad():
                assert (local_logits - _local(tiny_llama, "none")(ids).logits).abs().max().item() > 1e-3

        prompt = _ids(1, 6, seed=1)  # incremental decoding: one-token steps into the servers' caches
        kwargs = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
        remote = model.generate(prompt, **kwargs)
        expected = local.generate(prompt, **kwargs)
        assert torch.equal(remote.sequences, expected.sequences)
        assert max((r - e).abs().max().item() for r, e in zip(remote.logits, expected.logits)) <= ATOL
    finally:
        model.shutdown()


def test_records_carry_the_quant_and_a_filter_no_server_meets_says_so(tiny_llama, quant_swarm):
    from client.loop import run_sync

    model = _client(tiny_llama, quant_swarm, allowed_quant=("fp8",), missing_blocks_timeout=0.5)
    try:
        servers = run_sync(model.remote.servers(force=True))
        assert sorted(record.quant for record in servers[1].values()) == ["int8", "nf4", "none"]
        assert sorted(record.quant for record in servers[3].values()) == ["int8", "nf4", "none"]
        with pytest.raises(MissingBlocksError, match=r"blocks 0:4 .*allowed_quant=\('fp8',\)\) excluded 4 online "
                                                     r"server\(s\) of these blocks that serve quant int8, nf4, none: allow it$"):
            with torch.no_grad():
                model(_ids(1, 4, seed=2))
    finally:
        model.shutdown()


def test_qlora_gradients_match_a_local_quantized_peft_model(tiny_llama, quant_swarm, tmp_path):
    from peft import LoraConfig, PeftModel

    model = _client(tiny_llama, quant_swarm, allowed_quant=("nf4",),
                    lora=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    try:
        _randomize_lora(model)
        ids = _ids(2, 10, seed=3)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        model.save_adapter(str(tmp_path / "adapter"))
        reference = PeftModel.from_pretrained(_local(tiny_llama, "nf4"), str(tmp_path / "adapter"),
                                              is_trainable=True).eval()
        expected = reference(input_ids=ids, labels=ids)
        expected.loss.backward()
        assert (out.logits - expected.logits).abs().max().item() <= ATOL
        named = dict(reference.named_parameters())
        for target, a, b in zip(model.tuning.lora.targets, model.tuning.lora.lora_A, model.tuning.lora.lora_B):
            key = f"base_model.model.model.layers.{target.block}.{target.path}.lora_A.default.weight"
            _assert_grad_close(a.grad, named[key].grad, target.wire_name + " A")
            _assert_grad_close(b.grad, named[key.replace("lora_A", "lora_B")].grad, target.wire_name + " B")
    finally:
        model.shutdown()


def test_deep_prompt_gradients_through_int8_servers_match_local(tiny_llama, quant_swarm):
    model = _client(tiny_llama, quant_swarm, allowed_quant=("int8",), tuning_mode="deep_ptune", pre_seq_len=3)
    try:
        tuning = model.tuning
        with torch.no_grad():
            tuning.intermediate_prompts.copy_(torch.randn(tuning.intermediate_prompts.shape,
                                                          generator=torch.Generator().manual_seed(4)) * 0.5)
        ids = _ids(2, 8, seed=5)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()

        local = _local(tiny_llama, "int8")
        prompts = tuning.prompt_embeddings.detach().clone().requires_grad_()
        deep = tuning.intermediate_prompts.detach().clone().requires_grad_()
        for i, layer in enumerate(local.model.layers):
            layer.register_forward_pre_hook(_add_prompt(deep[i]), with_kwargs=True)
        embeds = torch.cat([prompts.unsqueeze(0).expand(2, -1, -1), local.get_input_embeddings()(ids)], dim=1)
        expected = local(inputs_embeds=embeds, labels=torch.cat([torch.full((2, 3), -100), ids], dim=1))
        expected.loss.backward()
        assert abs(out.loss.item() - expected.loss.item()) <= ATOL
        _assert_grad_close(tuning.prompt_embeddings.grad, prompts.grad, "prompt_embeddings")
        _assert_grad_close(tuning.intermediate_prompts.grad, deep.grad, "intermediate_prompts")
    finally:
        model.shutdown()
