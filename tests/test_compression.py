"""Activation compression (swarm/compression.py, its wire codec, and its choice per link in a session)."""

from __future__ import annotations

import asyncio

import pytest
import torch

import client.inference_session
from client.inference_session import InferenceSession
from swarm.compression import SLOW_LINK_S, choose, roundtrip, wire_bytes
from swarm.errors import BadRequest
from swarm.wire import InferenceStep, encode

from fake_swarm import FakeNet, record, toy_blocks
from test_wire import raw_frame, read_bytes, tensor_header


def _states(seed: int = 0) -> torch.Tensor:
    # [batch, tokens, hidden] with the spread of real hidden states: most values small, a few large outliers
    states = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(seed))
    states[0, 0, :3] = torch.tensor([300.0, -1200.0, 55.0])
    return states


@pytest.mark.parametrize("scheme, bound", [("float16", 2.0 ** -11), ("bfloat16", 2.0 ** -8)])
def test_16_bit_schemes_add_at_most_their_stated_relative_error(scheme, bound):
    states = _states()
    sent = roundtrip(states, scheme)
    assert sent.dtype == torch.float32
    relative = ((sent - states).abs() / states.abs()).max()
    assert 0 < relative <= bound, relative


def test_float16_sends_out_of_range_states_as_bfloat16_instead_of_inf():
    states = _states()
    states[1, 2, 7] = 1e6
    sent = roundtrip(states, "float16")
    assert torch.isfinite(sent).all()
    assert ((sent - states).abs() / states.abs()).max() <= 2.0 ** -8


def test_int8_adds_at_most_its_stated_absolute_error_per_row():
    states = _states()
    sent = roundtrip(states, "int8")
    bound = states.abs().amax(dim=-1, keepdim=True) / 254 * (1 + 1e-6)
    assert ((sent - states).abs() <= bound).all()
    assert (sent - states).abs().max() > 0
    zeros = torch.zeros(1, 2, 8)
    assert torch.equal(roundtrip(zeros, "int8"), zeros)  # an all-zero row has scale 0: no division by it


@pytest.mark.parametrize("scheme", ["none", "float16", "bfloat16", "int8"])
def test_wire_carries_compressed_states_and_decodes_them_to_what_roundtrip_says(scheme):
    states = _states()
    msg = InferenceStep(session_id="s", hidden=states, start_position=3, position_ids=torch.arange(5).expand(2, 5))
    parts = encode(msg, scheme)
    hidden_bytes = parts[1].nbytes
    assert hidden_bytes == wire_bytes(scheme, states.numel(), 64)
    decoded = read_bytes(b"".join(bytes(p) for p in parts))
    assert torch.equal(decoded.hidden.float(), roundtrip(states, scheme))
    assert torch.equal(decoded.position_ids, msg.position_ids)  # only the hidden states are compressed
    if scheme == "int8":
        assert decoded.hidden.dtype == torch.float32


def test_a_malformed_int8_tensor_is_rejected():
    for meta, size in ((dict(codec="int4"), 8), (dict(codec="int8", dtype="int64"), 8), (dict(codec="int8"), 12)):
        header = tensor_header(shape=(1, 4), size=size, **meta)
        with pytest.raises(BadRequest):
            read_bytes(raw_frame(header, b"\0" * size))
    # the right size: 1 row of 4 int8 values + its float32 scale
    out = read_bytes(raw_frame(tensor_header(shape=(1, 4), size=8, codec="int8"), b"\0" * 8))
    assert out.hidden.shape == (1, 4) and out.hidden.dtype == torch.float32


def test_choose_compresses_only_slow_links_and_only_as_far_as_allowed():
    nbytes = 64_000
    fast, slow, very_slow = nbytes / (SLOW_LINK_S / 10), nbytes / (SLOW_LINK_S * 1.5), nbytes / (SLOW_LINK_S * 10)
    assert [choose("auto", nbytes, bw) for bw in (None, fast, slow, very_slow)] == ["none", "none", "float16",
                                                                                    "float16"]
    assert choose("none", nbytes, very_slow) == "none"
    assert choose("bfloat16", nbytes, slow) == "bfloat16"
    assert [choose("int8", nbytes, bw) for bw in (fast, slow, very_slow)] == ["none", "float16", "int8"]
    with pytest.raises(BadRequest):
        choose("zip", nbytes, slow)


def test_a_session_compresses_the_slow_links_of_its_chain(monkeypatch):
    # client -> a is fast, a -> b slow (published by a), b -> client slow: prefill states of 4 x 8 x 4 bytes
    net = FakeNet({"a": record(0, 2), "b": record(2, 4)})
    sequence = net.sequence(4, {"a": 0.01, "b": 0.01})
    monkeypatch.setattr(client.inference_session, "Stream", net.Stream)
    bandwidths = {(None, "a"): 1e9, ("a", "b"): 1e3, ("b", None): 1e3}
    sequence.link_bandwidth = lambda source, target: bandwidths.get((source, target))
    inputs = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))

    async def scenario():
        session = InferenceSession(sequence, max_length=8)
        out = await session.astep(inputs)
        await session.aclose()
        return out

    out = asyncio.run(asyncio.wait_for(scenario(), 30))
    (a_step,) = net.servers["a"].steps
    assert a_step.compression == ("float16", "float16")  # a -> b, then b -> client
    assert a_step.hidden.dtype == torch.float32 and torch.equal(a_step.hidden, inputs)  # the fast link: exact
    expected = roundtrip(toy_blocks(roundtrip(toy_blocks(inputs, 0, 2), "float16"), 2, 4), "float16")
    assert torch.equal(out, expected)
    assert (out - toy_blocks(inputs, 0, 4)).abs().max() < 1e-2
