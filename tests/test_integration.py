"""End-to-end on real peers: a DHT peer + 3 ``swarm serve`` processes + a client, against transformers.

Tolerance: float32 everywhere, logits within 1e-5 of the local model; greedy tokens identical.
"""

from __future__ import annotations

import re
import time

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from swarm.errors import MissingBlocksError

pytestmark = pytest.mark.integration

ATOL = 1e-5


def _prompt(batch: int = 1, length: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (batch, length), generator=generator)  # no pad/bos/eos ids


def test_logits_and_loss_match_local(swarm_llama, local_llama):
    ids = _prompt(batch=2, length=16)
    with torch.no_grad():
        remote = swarm_llama(ids, labels=ids)
        local = local_llama(ids, labels=ids)
    assert remote.logits.shape == local.logits.shape
    assert (remote.logits - local.logits).abs().max().item() <= ATOL
    assert abs(remote.loss.item() - local.loss.item()) <= ATOL


def test_greedy_generate_is_identical(swarm_llama, local_llama):
    ids = _prompt(length=7, seed=1)
    remote = swarm_llama.generate(ids, max_new_tokens=32, do_sample=False)
    local = local_llama.generate(ids, max_new_tokens=32, do_sample=False)
    assert remote.shape == (1, 7 + 32)
    assert torch.equal(remote, local)


def test_batched_greedy_generate_is_identical(swarm_llama, local_llama):
    ids = _prompt(batch=3, length=5, seed=2)
    remote = swarm_llama.generate(ids, max_new_tokens=12, do_sample=False)
    local = local_llama.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(remote, local)


def _left_padded(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of 10, 6 and 3 tokens left-padded to 10 with the pad id 0: (ids, attention mask)."""
    ids = _prompt(batch=3, length=10, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_padded_batch_matches_local(swarm_llama, local_llama):
    """Left-padded prompts of different lengths: logits and loss of a forward with labels, greedy generate."""
    ids, mask = _left_padded(seed=11)
    with torch.no_grad():
        remote = swarm_llama(ids, attention_mask=mask, labels=ids)
        local = local_llama(ids, attention_mask=mask, labels=ids)
    assert (remote.logits - local.logits).abs().max().item() <= ATOL
    assert abs(remote.loss.item() - local.loss.item()) <= ATOL
    remote = swarm_llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(remote, local_llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False))


def test_sampling_matches_local_with_the_same_seed(swarm_llama, local_llama):
    ids = _prompt(seed=3)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=50, top_p=0.95)
    torch.manual_seed(123)
    remote = swarm_llama.generate(ids, **kwargs)
    torch.manual_seed(123)
    local = local_llama.generate(ids, **kwargs)
    assert torch.equal(remote, local)


def test_streamer_and_stopping_criteria(swarm_llama, local_llama):
    ids = _prompt(seed=4)

    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 5, dtype=torch.bool)

    streamer = Collect()
    out = swarm_llama.generate(ids, max_new_tokens=30, do_sample=False, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert out.shape[1] == ids.shape[1] + 5
    assert streamer.chunks[0] == ids[0].tolist() and streamer.chunks[-1] == "end"
    streamed = [t for chunk in streamer.chunks[1:-1] for t in chunk]
    assert streamed == out[0, ids.shape[1]:].tolist()
    assert torch.equal(out, local_llama.generate(ids, max_new_tokens=5, do_sample=False))


def test_session_continues_across_generate_calls(swarm_llama, local_llama):
    ids = _prompt(seed=5)
    full = local_llama.generate(ids, max_new_tokens=16, do_sample=False)
    with swarm_llama.inference_session(max_length=ids.shape[1] + 16) as session:
        first = swarm_llama.generate(ids, max_new_tokens=8, do_sample=False, session=session)
        assert session.position == ids.shape[1] + 7  # the last token is not sent until the next step
        second = swarm_llama.generate(None, max_new_tokens=8, do_sample=False, session=session)
    assert torch.equal(first, full[:, : ids.shape[1] + 8])
    assert torch.equal(second, full)


def test_session_accepts_new_tokens_between_calls(swarm_llama, local_llama):
    ids = _prompt(seed=6)
    extra = _prompt(length=3, seed=7)
    with swarm_llama.inference_session(max_length=64) as session:
        first = swarm_llama.generate(ids, max_new_tokens=4, do_sample=False)  # the active session
        second = swarm_llama.generate(extra, max_new_tokens=4, do_sample=False)
    expected = local_llama.generate(torch.cat([first, extra], dim=1), max_new_tokens=4, do_sample=False)
    assert torch.equal(second, expected)


def test_incremental_steps_equal_full_forward(swarm_llama, local_llama):
    """Multi-token steps after prefill: catches masks sized against the wrong layer."""
    ids = _prompt(batch=2, length=12, seed=8)
    with torch.no_grad():
        embeds = local_llama.model.embed_tokens(ids)
        full = swarm_llama.remote_forward(embeds)
        with swarm_llama.inference_session(max_length=16) as session:
            parts = [session.step(embeds[:, :5]), session.step(embeds[:, 5:9]), session.step(embeds[:, 9:10]),
                     session.step(embeds[:, 10:])]
            assert session.position == 12
            # rolling back two tokens and re-sending them gives the same states again
            again = session.step(embeds[:, 10:], start_position=10)
    incremental = torch.cat(parts, dim=1)
    assert (incremental - full).abs().max().item() <= ATOL
    assert (again - parts[-1]).abs().max().item() <= ATOL
    # and the remote blocks equal the local ones
    with torch.no_grad():
        hidden = local_llama.model(ids, output_hidden_states=True).hidden_states[-1]
    assert (local_llama.model.norm(full) - hidden).abs().max().item() <= ATOL


def test_missing_blocks_fail_in_bounded_time(tiny_llama, llama_swarm):
    from swarm import AutoDistributedModelForCausalLM

    llama_swarm.start_server(tiny_llama, "0:2", "--dht-prefix", "partial-llama", "--num-threads", "1")
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=llama_swarm.initial_peers, dht_prefix="partial-llama",
        missing_blocks_timeout=2.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(MissingBlocksError, match=r"blocks 2:4 of .* have no online server"):
            model.generate(_prompt(), max_new_tokens=2)
        assert time.monotonic() - t0 < 15
    finally:
        model.shutdown()


def test_serve_alone_starts_a_joinable_swarm(tiny_llama, local_llama, tmp_path):
    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm

    with LocalSwarm(log_dir=str(tmp_path)) as swarm:
        proc = swarm.start_server(tiny_llama, None, "--num-threads", "1")
        log = proc.log()
        assert "Started a new swarm" in log
        maddrs = re.search(r"--initial-peers (\S+)", log).group(1)
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=[maddrs],
                                                                torch_dtype="float32")
        try:
            ids = _prompt(seed=9)
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
            assert torch.equal(out, local_llama.generate(ids, max_new_tokens=8, do_sample=False))
        finally:
            model.shutdown()
        code = swarm.stop(proc)
        assert code == 0
        assert "Traceback" not in proc.log()


def test_num_return_sequences_and_beam_search_match_local(swarm_llama, local_llama):
    ids = _prompt(seed=10)
    torch.manual_seed(7)
    remote = swarm_llama.generate(ids, max_new_tokens=8, do_sample=True, num_return_sequences=3)
    torch.manual_seed(7)
    local = local_llama.generate(ids, max_new_tokens=8, do_sample=True, num_return_sequences=3)
    assert remote.shape == (3, ids.shape[1] + 8)
    assert torch.equal(remote, local)
    # beam search reorders the servers' caches (hypo_ids) between steps
    remote = swarm_llama.generate(ids, max_new_tokens=8, do_sample=False, num_beams=3)
    local = local_llama.generate(ids, max_new_tokens=8, do_sample=False, num_beams=3)
    assert torch.equal(remote, local)
