"""A server whose compute raises an exception nobody anticipated (a bug, out of memory) is routed around.

Two servers hold all four blocks of the tiny Llama: ``faulty`` raises ``ValueError`` in every
inference step and every backward pass (``SWARM_TEST_FAULTS``, see server/faults.py) and offers a
huge throughput so that forward passes go to it; ``healthy`` does not fail. The client must send
its work to ``faulty`` first, get a ServerError back, ban it and finish on ``healthy``, with the
same result as the fault-free run (local transformers): identical greedy tokens, logits within
1e-5, LoRA gradients within 1e-4 of the reference's largest entry. The faulty server logs each
failure at ERROR with its traceback.
"""

from __future__ import annotations

import time

import pytest
import torch

from swarm.local_swarm import LocalSwarm

pytestmark = pytest.mark.integration

PREFIX = "faulty-llama"
ATOL = 1e-5
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def faulty_swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(log_dir=str(tmp_path_factory.mktemp("faults"))) as swarm:
        swarm.start_dht()
        faulty = swarm.start_server(tiny_llama, "0:4", "--num-threads", "1", "--dht-prefix", PREFIX, "--throughput",
                                    "1000000", wait=False, name="faulty",
                                    env={"SWARM_TEST_FAULTS": "inference,backward"})
        healthy = swarm.start_server(tiny_llama, "0:4", "--num-threads", "1", "--dht-prefix", PREFIX, "--throughput",
                                     "1", wait=False, name="healthy")
        ids = {}
        for proc in (faulty, healthy):
            ids[proc.name] = proc.wait_for("Server ONLINE", 180).rsplit(" as ", 1)[1].strip()
        yield swarm, ids


def _client(path: str, swarm: LocalSwarm, **kwargs):
    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                            dht_prefix=PREFIX, **kwargs)
    model.generation_config.eos_token_id = None
    return model


def _proc(swarm: LocalSwarm, name: str):
    return next(p for p in swarm.procs if p.name == name)


def _retried_after(caplog, peer_id: str, fault: str) -> bool:
    """The client logged that ``peer_id`` failed with the injected ``fault`` and that it retries elsewhere."""
    return any(r.name == "swarm.retry" and peer_id in r.getMessage() and f"injected {fault} fault" in r.getMessage()
               and "retrying elsewhere" in r.getMessage() for r in caplog.records)


def test_generate_routes_around_a_server_that_raises(tiny_llama, local_llama, faulty_swarm, caplog):
    swarm, ids = faulty_swarm
    model = _client(tiny_llama, swarm)
    try:
        # chains are chosen by latency: make the healthy server look far away, so the session opens on the
        # faulty one (the only other way through the model)
        model.remote.pings[ids["healthy"]] = (1.0, time.monotonic())
        prompt = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
        with model.inference_session(max_length=16) as session:
            out = model.generate(prompt, max_new_tokens=8, do_sample=False, session=session)
            assert session.failovers >= 1 and [link.peer_id for link in session.chain] == [ids["healthy"]]
        expected = local_llama.generate(prompt, max_new_tokens=8, do_sample=False)
        assert out.tolist() == expected.tolist()
        assert _retried_after(caplog, ids["faulty"], "inference")
    finally:
        model.shutdown()
    log = _proc(swarm, "faulty").log()
    assert "[ERROR] [server.handler._process_step" in log and "inference step of session" in log
    assert "ValueError: injected inference fault (SWARM_TEST_FAULTS)" in log  # with its traceback


def test_training_routes_around_a_server_that_raises(tiny_llama, faulty_swarm, tmp_path, caplog):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    swarm, ids = faulty_swarm
    targets = ["q_proj", "v_proj"]
    model = _client(tiny_llama, swarm, lora=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=targets))
    try:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # B starts at zero; random B gives A a gradient too
            for b in model.tuning.lora.lora_B:
                b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
        batch = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(2))
        records: list = []
        real_forward = model.remote.forward

        async def recording_forward(hidden, extras=None, records=None):
            out = await real_forward(hidden, extras, records=records)
            seen.extend(records or [])
            return out

        seen: list = []
        model.remote.forward = recording_forward
        out = model(input_ids=batch, labels=batch)
        assert [link.peer_id for link, _ in seen] == [ids["faulty"]]  # the forward ran there (no fault injected)
        out.loss.backward()  # its backward raises there; the client recomputes on the healthy server
        assert _retried_after(caplog, ids["faulty"], "backward")

        model.save_adapter(str(tmp_path / "adapter"))
        local = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
        reference = PeftModel.from_pretrained(local, str(tmp_path / "adapter"), is_trainable=True).eval()
        expected = reference(input_ids=batch, labels=batch)
        expected.loss.backward()
        assert (out.logits - expected.logits).abs().max().item() <= ATOL
        named = dict(reference.named_parameters())
        for target, a, b in zip(model.tuning.lora.targets, model.tuning.lora.lora_A, model.tuning.lora.lora_B):
            key = f"base_model.model.model.layers.{target.block}.{target.path}.lora_A.default.weight"
            for actual, wanted in ((a.grad, named[key].grad), (b.grad, named[key.replace("lora_A", "lora_B")].grad)):
                scale = wanted.abs().max().item()
                assert scale > 0 and (actual - wanted).abs().max().item() <= GRAD_RTOL * scale, target.wire_name
    finally:
        model.shutdown()
    log = _proc(swarm, "faulty").log()
    assert "[ERROR] [server.handler.guarded" in log and "handler _handle_backward failed" in log
    assert "ValueError: injected backward fault (SWARM_TEST_FAULTS)" in log
