"""The API's pure parts, no peers: request parsing, sampling, stop strings and streaming text,
tool-call formats (rendered by the Qwen2.5- and Llama 3.1-style templates of tests/api_models.py and
parsed back), and the staged local passes against the full local transformers model."""

from __future__ import annotations

import json

import pytest
import torch

from api.errors import ApiError, from_exception
from api.generation import LocalModel
from api.sampling import Sampler, top_p_filter
from api.schemas import Sampling, parse_body, parse_chat, parse_completion
from api.text import ChoiceText
from api.tools import ToolFormat, detect_format, partial_suffix
from swarm.errors import MissingBlocksError, RetriesExhausted, ServerUnavailable, SessionLengthExceeded
from swarm.tiny import make_tiny_tokenizer

from api_models import CORPUS, LLAMA31_TOOLS_TEMPLATE, LLAMA_TOKENS, QWEN_TOKENS, QWEN_TOOLS_TEMPLATE, WEATHER_TOOL

HI = [{"role": "user", "content": "hi"}]


def error_of(call) -> ApiError:
    with pytest.raises(ApiError) as e:
        call()
    return e.value


# ---------------------------------------------------------------- parsing


def test_chat_request_parsing_defaults_and_fields():
    request = parse_chat({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                  {"type": "text", "text": "b"}]}],
                          "max_completion_tokens": 5, "stop": "x", "seed": -3, "n": 2, "logprobs": True,
                          "top_logprobs": 4, "stream": True, "stream_options": {"include_usage": True},
                          "user": "ignored", "response_format": {"type": "text"}})
    assert request.messages == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"})
    s = request.sampling
    assert (s.max_tokens, s.stop, s.seed, s.n, s.logprobs, s.top_logprobs) == (5, ("x",), -3, 2, True, 4)
    assert (s.temperature, s.top_p) == (1.0, 1.0) and request.stream and request.include_usage
    assert parse_chat({"model": "m", "messages": HI, "tools": [WEATHER_TOOL], "tool_choice": "none"}).tools == ()


@pytest.mark.parametrize("body, param, status", [
    ({"messages": HI}, "model", 400),
    ({"model": "m"}, "messages", 400),
    ({"model": "m", "messages": "hi"}, "messages", 422),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", 400),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content", 400),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]", 400),
    ({"model": "m", "messages": HI, "temperature": "hot"}, "temperature", 422),
    ({"model": "m", "messages": HI, "temperature": 3}, "temperature", 400),
    ({"model": "m", "messages": HI, "max_tokens": 0}, "max_tokens", 400),
    ({"model": "m", "messages": HI, "max_tokens": True}, "max_tokens", 422),
    ({"model": "m", "messages": HI, "n": 17}, "n", 400),
    ({"model": "m", "messages": HI, "stop": ["a", ""]}, "stop", 400),
    ({"model": "m", "messages": HI, "top_logprobs": 2}, "top_logprobs", 400),
    ({"model": "m", "messages": HI, "stream_options": {"include_usage": True}}, "stream_options", 400),
    ({"model": "m", "messages": HI, "response_format": {"type": "json_object"}}, "response_format", 400),
    ({"model": "m", "messages": HI, "tools": [{"type": "code"}]}, "tools[0]", 400),
    ({"model": "m", "messages": HI, "tool_choice": "required"}, "tool_choice", 400),
    ({"model": "m", "messages": HI, "logit_bias": {"5": 1}}, "logit_bias", 400),
    ({"model": "m", "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": "{bad"}}]}]}, "messages[0].tool_calls[0].function.arguments", 400),
])
def test_bad_chat_requests_name_the_field(body, param, status):
    error = error_of(lambda: parse_chat(body))
    assert (error.param, error.status) == (param, status)
    assert error.body()["error"]["param"] == param and error.body()["error"]["type"] == "invalid_request_error"


def test_completion_request_parsing():
    assert parse_completion({"model": "m", "prompt": [[1, 2, 3]]}).prompt == (1, 2, 3)
    assert parse_completion({"model": "m", "prompt": ["text"], "logprobs": 0}).sampling.logprobs
    for body, param in (({"model": "m", "prompt": ["a", "b"]}, "prompt"), ({"model": "m", "prompt": ""}, "prompt"),
                        ({"model": "m", "prompt": [-1]}, "prompt"), ({"model": "m", "prompt": "a", "echo": True},
                                                                     "echo"),
                        ({"model": "m", "prompt": "a", "logprobs": 6}, "logprobs")):
        assert error_of(lambda: parse_completion(body)).param == param
    assert error_of(lambda: parse_body(b"[1]")).status == 400
    assert error_of(lambda: parse_body(b"\xff{")).status == 400


def test_exceptions_map_to_statuses():
    assert from_exception(MissingBlocksError("blocks 2:4")).status == 503
    assert from_exception(ServerUnavailable("gone")).status == 503
    assert from_exception(RetriesExhausted("blocks 0:2 done; 2:4 failed")).status == 503
    assert from_exception(SessionLengthExceeded("too long")).status == 400
    internal = from_exception(KeyError("secret internals"))
    assert internal.status == 500 and "secret" not in internal.message and "KeyError" in internal.message


# ---------------------------------------------------------------- sampling


def test_greedy_penalties_and_seeded_sampling():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    greedy = Sampler(Sampling(temperature=0.0, n=2), 3, seed=0)
    assert greedy.pick(logits).tokens.tolist() == [1, 2]
    penalised = Sampler(Sampling(temperature=0.0, n=2, frequency_penalty=1.5), 3, seed=0)
    assert penalised.pick(logits).tokens.tolist() == [1, 2]
    assert penalised.pick(logits).tokens.tolist() == [2, 2]  # token 1 was used once: 3 - 1.5 < 2
    presence = Sampler(Sampling(temperature=0.0, n=1, presence_penalty=2.0), 3, seed=0)
    assert [presence.pick(logits[:1]).tokens.item() for _ in range(3)] == [1, 2, 0]

    flat = torch.zeros(4, 50)
    draws = [Sampler(Sampling(n=4), 50, seed=seed).pick(flat).tokens.tolist() for seed in (7, 7, 8)]
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_top_p_keeps_the_smallest_likely_set():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(top_p_filter(probs, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert torch.allclose(top_p_filter(probs, 0.0), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    sampler = Sampler(Sampling(top_p=0.5, n=1), 4, seed=1)
    assert {sampler.pick(torch.log(probs)).tokens.item() for _ in range(50)} == {0}


def test_logprobs_are_the_model_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    pick = Sampler(Sampling(temperature=0.0, logprobs=True, top_logprobs=2), 3, seed=0).pick(logits)
    expected = torch.log_softmax(logits, -1)[0]
    assert torch.allclose(pick.logprobs, expected[:1]) and pick.top_ids.tolist() == [[0, 1]]
    assert torch.allclose(pick.top_logprobs[0], expected[:2])


# ---------------------------------------------------------------- text, stop strings, tools


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer(texts=CORPUS + ["héllo wörld ✓"], vocab_size=300)


def feed(choice: ChoiceText, ids: list[int]) -> list[str]:
    return [choice.add(t) for t in ids]


def test_stream_reassembles_the_decoded_text(tokenizer):
    text = "Hello! héllo wörld ✓ and more"
    ids = tokenizer(text).input_ids
    choice = ChoiceText(tokenizer)
    pieces = feed(choice, ids) + [choice.finish("length")]
    assert "".join(pieces) == tokenizer.decode(ids) and all("\ufffd" not in p for p in pieces)
    assert choice.finish_reason == "length"


def test_stop_string_across_tokens_is_cut_and_never_streamed(tokenizer):
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer(text).input_ids
    choice = ChoiceText(tokenizer, stop=("fox jum", "zzz"))
    streamed = []
    for token in ids:
        streamed.append(choice.add(token))
        if choice.done:
            break
    streamed.append(choice.finish("length"))
    assert "".join(streamed) == "The quick brown " and choice.finish_reason == "stop"
    assert partial_suffix("abc fo", ("fox",)) == 2 and partial_suffix("abc", ("fox",)) == 0


def test_hermes_tool_calls_stream_content_then_calls(tokenizer):
    fmt = ToolFormat("hermes")
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    choice = ChoiceText(tokenizer, tool_format=fmt)
    streamed = "".join(feed(choice, tokenizer(text).input_ids)) + choice.finish("stop")
    assert streamed == "Let me check." and choice.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in choice.calls] == [("get_weather", {"city": "Paris"})]
    two = fmt.parse('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", '
                    '"arguments": "{\\"x\\": 1}"}</tool_call>')
    assert [(c.name, c.arguments) for c in two] == [("a", "{}"), ("b", '{"x": 1}')]
    broken = ChoiceText(tokenizer, tool_format=fmt)
    out = "".join(feed(broken, tokenizer("<tool_call>{not json</tool_call>").input_ids)) + broken.finish("stop")
    assert out == "<tool_call>{not json</tool_call>" and broken.finish_reason == "stop"  # the client sees the text


def test_llama_json_tool_calls(tokenizer):
    fmt = ToolFormat("llama3_json")
    choice = ChoiceText(tokenizer, tool_format=fmt)
    text = ' {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "now", "parameters": {}}'
    assert "".join(feed(choice, tokenizer(text).input_ids)) + choice.finish("stop") == " "
    assert [c.name for c in choice.calls] == ["get_weather", "now"] and choice.finish_reason == "tool_calls"
    prose = ChoiceText(tokenizer, tool_format=fmt)
    assert "".join(feed(prose, tokenizer("It is sunny.").input_ids)) + prose.finish("stop") == "It is sunny."
    assert fmt.parse('{"name": "x"') is None and fmt.parse('{"parameters": {}}') is None


@pytest.mark.parametrize("template, tokens, fmt", [(QWEN_TOOLS_TEMPLATE, QWEN_TOKENS[:2], "hermes"),
                                                   (LLAMA31_TOOLS_TEMPLATE, LLAMA_TOKENS, "llama3_json")])
def test_templates_render_tools_and_calls(template, tokens, fmt):
    tokenizer = make_tiny_tokenizer(texts=CORPUS, chat_template=template, extra_special_tokens=tokens)
    assert detect_format(template) == ToolFormat(fmt)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"t": 21}'}]
    text = tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False)
    assert '"get_weather"' in text and '"city": "Paris"' in text and '{"t": 21}' in text
    assert '"description": "The weather in a city now"' in text
    assert detect_format("{{ messages }}") is None and detect_format(None) is None


# ---------------------------------------------------------------- the staged local passes


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "bloom"])
def test_staged_passes_equal_the_local_model(model_type, tmp_path):
    """embed -> (the blocks, run locally here) -> head gives the full model's logits (Gemma2: scaled
    embeddings and soft-capping; Bloom: embedding layernorm and alibi); tolerance 1e-5."""
    from transformers import AutoModelForCausalLM

    from client.model import AutoDistributedModelForCausalLM
    from swarm.tiny import make_tiny_model

    path = make_tiny_model(str(tmp_path / model_type), model_type, num_hidden_layers=2)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    local = LocalModel(AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/"
                                                                                            "QmNoPeerHere"]))
    layers = full.transformer.h if model_type == "bloom" else full.model.layers
    ids = torch.randint(3, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    hidden = local.embed(ids, 0)

    captured = {}

    def hook(module, args, kwargs):
        captured.setdefault("input", args[0] if args else kwargs["hidden_states"])

    def keep_output(module, args, output):
        captured["output"] = output[0] if isinstance(output, tuple) else output

    handles = [layers[0].register_forward_pre_hook(hook, with_kwargs=True), layers[-1].register_forward_hook(keep_output)]
    with torch.no_grad():
        expected = full(ids).logits[:, -1]
    for handle in handles:
        handle.remove()
    assert (hidden - captured["input"]).abs().max().item() <= 1e-5
    logits = local.last_logits(ids, 0, captured["output"])
    assert (logits - expected).abs().max().item() <= 1e-5
