"""Fine-tuning through the swarm, on real peers: LoRA for remote blocks and prompt tuning.

Reference: the same tiny Llama in local transformers, with ``peft`` applying the same LoRA weights
(or the same soft prompts added by hand). Tolerances (float32 everywhere): logits and loss within
1e-5; every gradient within 1e-4 of the largest entry of the reference gradient (relative to its
scale; measured: 0.0 on this machine, the servers run the same kernels).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from swarm.errors import BadRequest
from swarm.local_swarm import LocalSwarm

pytestmark = pytest.mark.integration

ATOL = 1e-5
GRAD_RTOL = 1e-4
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _lora_config(dropout: float = 0.0):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS)


def _client(path: str, swarm: LocalSwarm, **kwargs):
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, **kwargs)
    model.generation_config.eos_token_id = None
    return model


def _randomize_lora(model, seed: int = 1) -> None:
    """B starts at zero (a no-op adapter); random B gives every weight a non-trivial gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.tuning.lora.lora_B:
            b.copy_(torch.randn(b.shape, generator=generator) * 0.1)


def _local(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def _peft_local(path: str, adapter_dir: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(_local(path), adapter_dir, is_trainable=True).eval()


def _assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual is not None, f"{what} got no gradient"
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: the reference gradient is zero, the test would prove nothing"
    assert (actual - expected).abs().max().item() <= GRAD_RTOL * scale, what


def _peft_grads(peft_model, model) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    named = dict(peft_model.named_parameters())
    pairs = []
    for target, a, b in zip(model.tuning.lora.targets, model.tuning.lora.lora_A, model.tuning.lora.lora_B):
        key = f"base_model.model.model.layers.{target.block}.{target.path}.lora_A.default.weight"
        pairs.append((target.wire_name + " A", a.grad, named[key].grad))
        pairs.append((target.wire_name + " B", b.grad, named[key.replace("lora_A", "lora_B")].grad))
    return pairs


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_lora_gradients_match_peft(tiny_llama, llama_swarm, tmp_path):
    model = _client(tiny_llama, llama_swarm, lora=_lora_config())
    try:
        _randomize_lora(model)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora." in name for name in trainable)  # the base model is frozen
        assert len(model.tuning.lora.targets) == 3 * 4  # three modules in each of the four blocks
        ids = _ids(2, 12, seed=0)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()

        model.save_adapter(str(tmp_path / "adapter"))
        assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
        reference = _peft_local(tiny_llama, str(tmp_path / "adapter"))
        expected = reference(input_ids=ids, labels=ids)
        expected.loss.backward()
        assert (out.logits - expected.logits).abs().max().item() <= ATOL
        assert abs(out.loss.item() - expected.loss.item()) <= ATOL
        for what, actual, wanted in _peft_grads(reference, model):
            _assert_grad_close(actual, wanted, what)
    finally:
        model.shutdown()


def test_prompt_tuning_gradients_match_local(tiny_llama, llama_swarm):
    """deep_ptune: soft prompt embeddings before the input, and per-block prompts the servers add."""
    model = _client(tiny_llama, llama_swarm, tuning_mode="deep_ptune", pre_seq_len=3)
    try:
        tuning = model.tuning
        with torch.no_grad():
            tuning.intermediate_prompts.copy_(torch.randn(tuning.intermediate_prompts.shape,
                                                          generator=torch.Generator().manual_seed(3)) * 0.5)
        assert {name for name, p in model.named_parameters() if p.requires_grad} == {
            "swarm_tuning.prompt_embeddings", "swarm_tuning.intermediate_prompts"}
        ids = _ids(2, 10, seed=4)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        assert out.logits.shape == (2, 10, 1024)  # the prompt positions are dropped

        local = _local(tiny_llama)
        prompts = tuning.prompt_embeddings.detach().clone().requires_grad_()
        deep = tuning.intermediate_prompts.detach().clone().requires_grad_()
        hooks = [layer.register_forward_pre_hook(_add_prompt(deep[i]), with_kwargs=True)
                 for i, layer in enumerate(local.model.layers)]
        embeds = torch.cat([prompts.unsqueeze(0).expand(2, -1, -1), local.get_input_embeddings()(ids)], dim=1)
        labels = torch.cat([torch.full((2, 3), -100), ids], dim=1)
        expected = local(inputs_embeds=embeds, labels=labels)
        expected.loss.backward()
        for hook in hooks:
            hook.remove()
        assert (out.logits - expected.logits[:, 3:]).abs().max().item() <= ATOL
        assert abs(out.loss.item() - expected.loss.item()) <= ATOL
        _assert_grad_close(tuning.prompt_embeddings.grad, prompts.grad, "prompt_embeddings")
        _assert_grad_close(tuning.intermediate_prompts.grad, deep.grad, "intermediate_prompts")
    finally:
        model.shutdown()


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_generation_with_soft_prompts_matches_local(tiny_llama, llama_swarm, mode):
    """The prompt goes into the sessions' caches at prefill (deep prompts: the servers add theirs);
    later steps and a continued session see only the generated tokens."""
    model = _client(tiny_llama, llama_swarm, tuning_mode=mode, pre_seq_len=3)
    try:
        tuning = model.tuning
        generator = torch.Generator().manual_seed(12)
        with torch.no_grad():
            tuning.prompt_embeddings.copy_(torch.randn(tuning.prompt_embeddings.shape, generator=generator))
            if tuning.intermediate_prompts is not None:
                tuning.intermediate_prompts.copy_(torch.randn(tuning.intermediate_prompts.shape, generator=generator))
        ids = _ids(1, 5, seed=13)
        with torch.no_grad(), model.inference_session(max_length=5 + 12) as session:
            first = model.generate(ids, max_new_tokens=6, do_sample=False, session=session)
            both = model.generate(None, max_new_tokens=6, do_sample=False, session=session)
            assert session.position == 3 + 5 + 11  # the soft prompt is held besides; the last token was never sent

        local = _local(tiny_llama)
        hooks = [] if tuning.intermediate_prompts is None else [
            layer.register_forward_pre_hook(_add_prompt(tuning.intermediate_prompts[i].detach(), prefill_only=True),
                                            with_kwargs=True) for i, layer in enumerate(local.model.layers)]
        embeds = torch.cat([tuning.prompt_embeddings.detach().unsqueeze(0), local.get_input_embeddings()(ids)], dim=1)
        with torch.no_grad():
            expected = local.generate(inputs_embeds=embeds, max_new_tokens=12, do_sample=False)
        for hook in hooks:
            hook.remove()
        assert torch.equal(first, torch.cat([ids, expected[:, :6]], dim=1))
        assert torch.equal(both, torch.cat([ids, expected], dim=1))
    finally:
        model.shutdown()


def _peer_id(proc) -> str:
    return proc.wait_for("Server ONLINE", 5).split(" as ")[1].split()[0]


def _add_prompt(prompt: torch.Tensor, prefill_only: bool = False):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if prefill_only and hidden.shape[1] == 1:  # a decoding step: past the prompt's positions
            return None
        tokens = prompt.shape[0]
        hidden = torch.cat([hidden[:, :tokens] + prompt, hidden[:, tokens:]], dim=1)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hook


def test_tuning_arguments_are_checked(tiny_llama, llama_swarm, tmp_path):
    from peft import LoraConfig

    from swarm.errors import ConfigError

    with pytest.raises(ConfigError, match="match no Linear"):
        _client(tiny_llama, llama_swarm, lora=LoraConfig(r=4, target_modules=["no_such_proj"]))
    with pytest.raises(ConfigError, match="use_dora"):
        _client(tiny_llama, llama_swarm, lora=LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="pre_seq_len"):
        _client(tiny_llama, llama_swarm, tuning_mode="ptune")
    with pytest.raises(ConfigError, match="adapter_config.json"):
        _client(tiny_llama, llama_swarm, adapter=str(tmp_path))
    model = _client(tiny_llama, llama_swarm, tuning_mode="ptune", pre_seq_len=2)
    try:
        with pytest.raises(BadRequest, match="position_ids cannot be combined with soft prompts"):
            model(input_ids=_ids(1, 4, seed=0), position_ids=torch.arange(4).unsqueeze(0))
        with pytest.raises(BadRequest, match="no LoRA adapter"):
            model.save_adapter(str(tmp_path / "nothing"))
    finally:
        model.shutdown()


@pytest.fixture(scope="module")
def steep_llama(tmp_path_factory) -> str:
    """The tiny Llama with weights drawn 10x wider: its logits can become confident, so training shows.
    (With the default std 0.02 a 64-wide final norm and head cap every logit near 1.3.)"""
    from swarm.tiny import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("models") / "steep-llama"), "llama", initializer_range=0.2)


@pytest.fixture(scope="module")
def adapter_dir(steep_llama, tmp_path_factory) -> str:
    """A PEFT adapter written by peft itself (not by Swarm), with random non-zero weights."""
    from peft import get_peft_model

    torch.manual_seed(7)
    model = get_peft_model(_local(steep_llama), _lora_config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    path = str(tmp_path_factory.mktemp("adapters") / "chat")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_swarm(steep_llama, adapter_dir, tmp_path_factory):
    """Two servers with the adapter preloaded and strict limits, and a spare server for failover tests."""
    limits = ("--num-threads", "1", "--max-backward-tokens", "64", "--max-lora-rank", "8")
    with LocalSwarm(log_dir=str(tmp_path_factory.mktemp("adapter-swarm"))) as swarm:
        swarm.start_dht()
        for span in ("0:2", "2:4"):
            swarm.start_server(steep_llama, span, "--adapters", f"chat={adapter_dir}", *limits, wait=False,
                               name=f"adapters_{span.replace(':', '_')}")
        for proc in swarm.procs[1:]:
            proc.wait_for("Server ONLINE", 180)
        yield swarm


def test_training_lowers_the_loss_and_the_saved_adapter_reproduces_it(steep_llama, adapter_swarm, tmp_path):
    """LoRA training on a tiny fixed dataset (a cycle of six tokens) through the swarm; the adapter then
    serves generation (sent per session), a new client loads it, and peft reproduces the logits locally."""
    torch.manual_seed(0)
    model = _client(steep_llama, adapter_swarm, lora=_lora_config(dropout=0.1))
    try:
        cycle = torch.tensor([11, 222, 333, 444, 555, 66])
        data = torch.stack([cycle.roll(-i).repeat(3) for i in range(4)])  # [4, 18]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        model.train()  # LoRA dropout on: the servers draw the masks from the request's seed
        losses = []
        for step in range(20):
            batch = data[step % 2 * 2:(step % 2 + 1) * 2]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            final = model(input_ids=data, labels=data).loss.item()
        initial = sum(losses[:2]) / 2
        assert final < 0.1 * initial, (initial, final, losses)  # measured: 8.1 -> 0.09

        adapter = str(tmp_path / "trained")
        model.save_adapter(adapter)
        reference = _peft_local(steep_llama, adapter)
        with torch.no_grad():
            ours, expected = model(input_ids=data).logits, reference(input_ids=data).logits
            assert (ours - expected).abs().max().item() <= ATOL
            prompt = data[:1, :6]
            generated = model.generate(prompt, max_new_tokens=10, do_sample=False)  # the session carries the LoRA
            assert torch.equal(generated, reference.generate(input_ids=prompt, max_new_tokens=10, do_sample=False))

        loaded = _client(steep_llama, adapter_swarm, adapter=adapter)
        try:
            assert not any(p.requires_grad for p in loaded.parameters())
            with torch.no_grad():
                assert (loaded(input_ids=data).logits - expected).abs().max().item() <= ATOL
        finally:
            loaded.shutdown()
    finally:
        model.shutdown()


def test_preloaded_adapter_selected_by_name(steep_llama, adapter_dir, adapter_swarm):
    reference = _peft_local(steep_llama, adapter_dir)
    model = _client(steep_llama, adapter_swarm, active_adapter="chat", missing_blocks_timeout=3)
    try:
        ids = _ids(1, 9, seed=8)
        with torch.no_grad():
            expected = reference(input_ids=ids).logits
            assert (model(input_ids=ids).logits - expected).abs().max().item() <= ATOL
            assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                               reference.generate(input_ids=ids, max_new_tokens=6, do_sample=False))
            plain = _client(steep_llama, adapter_swarm)
            try:  # the same servers without the adapter
                assert (plain(input_ids=ids).logits - _local(steep_llama)(input_ids=ids).logits).abs().max() <= ATOL
            finally:
                plain.shutdown()
    finally:
        model.shutdown()
    unknown = _client(steep_llama, adapter_swarm, active_adapter="nope", missing_blocks_timeout=1)
    try:
        from swarm.errors import MissingBlocksError

        with pytest.raises(MissingBlocksError, match="0:4"), torch.no_grad():
            unknown(input_ids=ids)
    finally:
        unknown.shutdown()


def test_server_limits_give_clear_errors(steep_llama, adapter_swarm):
    from peft import LoraConfig

    model = _client(steep_llama, adapter_swarm, lora=_lora_config())
    try:
        ids = _ids(2, 40, seed=9)  # 80 tokens > --max-backward-tokens 64
        with pytest.raises(BadRequest, match="--max-backward-tokens 64"):
            model(input_ids=ids, labels=ids).loss.backward()
        small = _ids(1, 8, seed=9)
        model(input_ids=small, labels=small).loss.backward()  # within the limit: the servers are fine
    finally:
        model.shutdown()
    wide = _client(steep_llama, adapter_swarm, lora=LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj"]))
    try:
        with pytest.raises(BadRequest, match="rank 16 .* --max-lora-rank 8"), torch.no_grad():
            wide(input_ids=small)
    finally:
        wide.shutdown()


def test_backward_survives_a_server_lost_after_forward(steep_llama, adapter_swarm, tmp_path):
    """The server that ran the forward of blocks 2:4 dies before backward: another one recomputes them."""
    spare = adapter_swarm.start_server(steep_llama, "1:4", "--num-threads", "1", name="spare_1_4")
    model = _client(steep_llama, adapter_swarm, lora=_lora_config())
    try:
        _randomize_lora(model, seed=11)
        ids = _ids(1, 12, seed=10)
        records: list = []
        real_forward = model.remote.forward

        async def recording_forward(hidden, extras=None, records=None):
            out = await real_forward(hidden, extras, records=records)
            if records is not None and not records_seen:
                records_seen.extend(records)
            return out

        records_seen: list = []
        model.remote.forward = recording_forward
        out = model(input_ids=ids, labels=ids)
        victim = records_seen[-1][0].peer_id  # the last span's server
        proc = next(p for p in adapter_swarm.procs[1:] if _peer_id(p) == victim)
        adapter_swarm.stop(proc, signal.SIGKILL)
        out.loss.backward()
        assert victim in model.remote.bans.banned(time.monotonic())  # it was tried, failed, and routed around

        model.save_adapter(str(tmp_path / "a"))
        reference = _peft_local(steep_llama, str(tmp_path / "a"))
        reference(input_ids=ids, labels=ids).loss.backward()
        for what, actual, wanted in _peft_grads(reference, model):
            _assert_grad_close(actual, wanted, what)
    finally:
        model.shutdown()
        adapter_swarm.stop(spare, signal.SIGTERM)
