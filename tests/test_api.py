"""``swarm api`` end to end: real ``swarm serve`` processes, a real ``swarm api`` process, OpenAI's own
Python client, and the chat page in headless Chromium.

The swarm (one for the module): a DHT peer; the random ``chat`` model (Qwen2, 4 blocks) on a server
that preloads the LoRA adapter ``tuned``; the rigged Qwen-format tool model (tests/api_models.py) on
another; and a record the test announces for ``broken`` (a copy of
a tool model) whose blocks 1:2 have no server. The API runs with ``--api-key``, the same adapter
client-side as ``mine`` and ``--max-concurrent 8``.

Tolerances: greedy tokens identical to ``model.generate`` through the Python client; logprobs within
1e-4 of the log-softmax of its scores (float32 everywhere).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest
import torch

from swarm import aio
from swarm.dht import NetworkConfig, Peer, declare_server, fetch_servers
from swarm.local_swarm import LOOPBACK, LocalSwarm, api_url
from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.transport import call
from swarm.wire import InfoRequest, InfoResponse

from api_models import WEATHER_TOOL, make_chat_model, make_rigged_tool_model
from cdp import Browser
from test_health import find_chromium

pytestmark = pytest.mark.integration

KEY = "sk-swarm-test"
LOGPROB_ATOL = 1e-4
HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


class Api:
    def __init__(self, url: str, swarm: LocalSwarm, models: dict[str, str], adapter: str):
        self.url, self.swarm, self.models, self.adapter = url, swarm, models, adapter
        self.client = openai.OpenAI(base_url=url + "v1", api_key=KEY, max_retries=0, timeout=120)

    def raw(self, method: str, path: str, body: Any = None, key: str | None = KEY) -> tuple[int, str]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


def _make_adapter(model_path: str, path: str, peers: list[str]) -> str:
    """A LoRA adapter with non-zero weights for the chat model, saved as `swarm finetune` saves one."""
    from peft import LoraConfig

    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        model_path, initial_peers=peers, lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for b in model.tuning.lora.lora_B:
            b.normal_(0, 0.5)
    model.save_adapter(path)
    return path


async def _announce_broken(peers: list[str], name: str) -> None:
    """Announces a 2-block model whose only server holds block 0 (so blocks 1:2 have none)."""
    peer = await Peer.start(NetworkConfig(initial_peers=tuple(peers), host_maddrs=(LOOPBACK,), client_mode=False))
    try:
        record = ServerRecord(state=ServerState.ONLINE, start=0, end=1, throughput=1.0, max_session_length=8192,
                              cache_tokens_left=8192)
        assert await declare_server(peer, "broken", record, 600, model=ModelRecord("broken", name, 2, "qwen2"))
    finally:
        await peer.shutdown()


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Api:
    root = tmp_path_factory.mktemp("api-models")
    chat = make_chat_model(str(root / "chat"))
    tools = make_rigged_tool_model(str(root / "tools-qwen"), "qwen")
    broken = str(root / "broken")
    shutil.copytree(tools, broken)
    with LocalSwarm(log_dir=str(tmp_path_factory.mktemp("api-swarm"))) as swarm:
        swarm.start_dht()
        adapter = _make_adapter(chat, str(root / "adapter"), swarm.initial_peers)
        common = ("--num-threads", "1", "--throughput", "100")
        servers = [swarm.start_server(chat, None, *common, "--adapters", f"tuned={adapter}", wait=False),
                   swarm.start_server(tools, None, *common, wait=False)]
        api_proc = swarm.start_api("--api-key", KEY, "--adapter", f"mine={adapter}", "--max-concurrent", "8")
        aio.run(_announce_broken(swarm.initial_peers, broken))
        for proc in servers:
            proc.wait_for("Server ONLINE", 180)
        url = api_url(api_proc)
        yield Api(url, swarm, {"chat": chat, "qwen": tools, "broken": broken}, adapter)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # stop them at once (each takes ~2 s)
            list(pool.map(swarm.stop, [api_proc, *servers]))  # (stopping from other threads is safe)


@pytest.fixture(scope="module")
def python_client(api):
    from swarm import AutoDistributedModelForCausalLM

    models = {}

    def get(adapter: str | None = None):
        if adapter not in models:
            models[adapter] = AutoDistributedModelForCausalLM.from_pretrained(
                api.models["chat"], initial_peers=api.swarm.initial_peers, adapter=adapter)
        return models[adapter]

    yield get
    for model in models.values():
        model.shutdown()


def _prompt_ids(api: Api, messages: list[dict]) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(api.models["chat"])
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids, tokenizer


def wait_until(check, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} did not happen within {timeout:.0f}s")


# ---------------------------------------------------------------- models, chat, completions


def test_models_lists_bases_adapters_and_completeness(api):
    cards = {m.id: m for m in api.client.models.list().data}
    chat = api.models["chat"]
    assert {chat, api.models["qwen"], api.models["broken"], f"{chat}:tuned", "mine"} <= set(cards)
    assert cards[chat].model_extra["complete"] and cards[f"{chat}:tuned"].model_extra["complete"]
    assert not cards[api.models["broken"]].model_extra["complete"]
    assert cards["mine"].model_extra["parent"] == chat and cards[f"{chat}:tuned"].model_extra["parent"] == chat
    assert api.client.models.retrieve("mine").id == "mine"


def test_greedy_chat_equals_python_client_generate(api, python_client):
    ids, tokenizer = _prompt_ids(api, HELLO)
    model = python_client()
    out = model.generate(ids, max_new_tokens=16, do_sample=False, output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    response = api.client.chat.completions.create(model=api.models["chat"], messages=HELLO, max_tokens=16,
                                                  temperature=0, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    eos = tokenizer.eos_token_id
    expected_ids = new[: new.index(eos) + 1] if eos in new else new
    assert [t.token for t in choice.logprobs.content] == [tokenizer.decode([t]) for t in expected_ids]
    assert choice.message.content == tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert response.usage.prompt_tokens == ids.shape[1] and response.usage.completion_tokens == len(expected_ids)
    for step, (token, entry) in enumerate(zip(expected_ids, choice.logprobs.content)):
        local = torch.log_softmax(out.scores[step][0].float(), dim=-1)
        assert abs(entry.logprob - local[token].item()) <= LOGPROB_ATOL
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([t]) for t in local.topk(3).indices]

    streamed = api.client.chat.completions.create(model=api.models["chat"], messages=HELLO, max_tokens=16,
                                                  temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected_ids)


@pytest.mark.parametrize("model_id", ["mine", "tuned"])
def test_adapters_equal_python_client_with_the_adapter(api, python_client, model_id):
    model_id = f"{api.models['chat']}:tuned" if model_id == "tuned" else model_id
    ids, tokenizer = _prompt_ids(api, HELLO)
    expected = python_client(api.adapter).generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:]
    base = api.client.chat.completions.create(model=api.models["chat"], messages=HELLO, max_tokens=10, temperature=0)
    tuned = api.client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=10, temperature=0)
    assert tuned.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert tuned.choices[0].message.content != base.choices[0].message.content  # the adapter changes the output


def test_stop_sequences_cut_the_text(api):
    kwargs = dict(model=api.models["chat"], messages=HELLO, max_tokens=24, temperature=0)
    full = api.client.chat.completions.create(**kwargs).choices[0].message.content
    assert len(full) >= 8, full
    stop = full[5:7]
    cut = api.client.chat.completions.create(**kwargs, stop=[stop, "never appears"]).choices[0]
    assert cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in api.client.chat.completions.create(
        **kwargs, stop=stop, stream=True) if c.choices)
    assert streamed == cut.message.content


def test_n_choices_and_seed_reproducibility(api):
    kwargs = dict(model=api.models["chat"], messages=HELLO, max_tokens=12, temperature=1.0, top_p=0.9, n=3)
    first = api.client.chat.completions.create(**kwargs, seed=7)
    again = api.client.chat.completions.create(**kwargs, seed=7)
    other = api.client.chat.completions.create(**kwargs, seed=8)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert texts != [c.message.content for c in other.choices]
    assert len(set(texts)) > 1  # the choices are sampled independently
    streamed = api.client.chat.completions.create(**kwargs, seed=7, stream=True)
    by_choice = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            by_choice[c.index] += c.delta.content or ""
    assert by_choice == texts


def test_completions_prompt_text_and_token_ids(api):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(api.models["chat"])
    text = "The quick brown fox"
    ids = tokenizer(text).input_ids
    by_text = api.client.completions.create(model=api.models["chat"], prompt=text, max_tokens=8, temperature=0,
                                            logprobs=2)
    by_ids = api.client.completions.create(model=api.models["chat"], prompt=ids, max_tokens=8, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids)
    logprobs = by_text.choices[0].logprobs
    assert len(logprobs.tokens) == by_text.usage.completion_tokens == len(logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    two = api.client.completions.create(model=api.models["chat"], prompt=text, max_tokens=5, n=2, seed=1, logprobs=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in two.choices)


# ---------------------------------------------------------------- tool calls


def test_tool_calls_are_parsed(api):
    """The Qwen2.5 format on real peers; the Llama 3.1 format takes the same path (tests/test_api_units.py)."""
    style = "qwen"
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    response = api.client.chat.completions.create(model=api.models[style], messages=messages, tools=[WEATHER_TOOL],
                                                  temperature=0, max_tokens=10)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "get_weather" and json.loads(tool_call.function.arguments) == {"city": "Paris"}
    assert tool_call.id.startswith("call_") and not choice.message.content

    chunks = list(api.client.chat.completions.create(model=api.models[style], messages=messages, tools=[WEATHER_TOOL],
                                                     temperature=0, max_tokens=10, stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the call and its result go back through the template
    follow = messages + [{"role": "assistant", "content": None, "tool_calls": [tool_call.model_dump()]},
                         {"role": "tool", "tool_call_id": tool_call.id, "content": '{"temperature": 21}'}]
    again = api.client.chat.completions.create(model=api.models[style], messages=follow, tools=[WEATHER_TOOL],
                                               temperature=0, max_tokens=10)
    assert again.choices[0].message.tool_calls  # the rigged model always calls; what matters: the request rendered

    plain = api.client.chat.completions.create(model=api.models[style], messages=messages, temperature=0,
                                               max_tokens=10, tool_choice="none", tools=[WEATHER_TOOL])
    assert plain.choices[0].message.tool_calls is None  # without tools, the text stays content


# ---------------------------------------------------------------- errors


def test_errors_have_openai_shape_and_status(api):
    chat = api.models["chat"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        api.client.chat.completions.create(model="no/such-model", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="at most 2048 fit"):
        api.client.chat.completions.create(model=chat, messages=HELLO, max_tokens=5000)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        api.client.chat.completions.create(model=chat, messages=HELLO, temperature="hot")
    assert e.value.body["param"] == "temperature"
    for kwargs, param in ((dict(n=0), "n"), (dict(top_p=1.5), "top_p"),
                          (dict(response_format={"type": "json_object"}), "response_format"),
                          (dict(tool_choice="required", tools=[WEATHER_TOOL]), "tool_choice"),
                          (dict(top_logprobs=3), "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            api.client.chat.completions.create(model=chat, messages=HELLO, **kwargs)
        assert e.value.body["param"] == param, kwargs
    with pytest.raises(openai.BadRequestError) as e:
        api.client.chat.completions.create(model=chat, messages=[{"role": "robot", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.InternalServerError, match=r"blocks 1:2 .* have no online server") as e:
        api.client.chat.completions.create(model=api.models["broken"], messages=HELLO, max_tokens=4)
    assert e.value.status_code == 503
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api.url + "v1", api_key="wrong", max_retries=0).models.list()
    for status, body in (api.raw("GET", "v1/models", key=None),
                         api.raw("POST", "v1/chat/completions", b"{not json"),
                         api.raw("POST", "v1/completions", {"model": chat, "prompt": "x", "echo": True}),
                         api.raw("POST", "v1/completions", {"model": chat, "prompt": [10 ** 9]}),
                         api.raw("GET", "v1/chat/completions"), api.raw("GET", "v1/nothing"),
                         api.raw("POST", "v1/completions", b" " * (17 << 20))):
        assert status in (400, 401, 404, 405, 413), body
        error = json.loads(body)["error"]
        assert error["message"] and error["type"] and "Traceback" not in body


def test_streamed_errors_before_output_keep_their_status(api):
    status, body = api.raw("POST", "v1/chat/completions", {"model": api.models["broken"], "messages": HELLO,
                                                             "stream": True})
    assert status == 503 and "have no online server" in json.loads(body)["error"]["message"]


# ---------------------------------------------------------------- concurrency and disconnects


def test_two_dozen_concurrent_streams(api):
    prompts = [[{"role": "user", "content": f"Question number {i % 3}?"}] for i in range(24)]
    expected = {i: api.client.chat.completions.create(model=api.models["chat"], messages=prompts[i], max_tokens=8,
                                                      temperature=0).choices[0].message.content for i in range(3)}

    def stream(i: int) -> str:
        chunks = api.client.chat.completions.create(model=api.models["chat"], messages=prompts[i], max_tokens=8,
                                                    temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        results = list(pool.map(stream, range(24)))
    assert results == [expected[i % 3] for i in range(24)]
    print(f"24 concurrent streams of 8 tokens: {time.perf_counter() - started:.2f}s")


async def _tokens_left(peer: Peer, server_ids: list[str]) -> list[int]:
    infos = [await call(peer.p2p, s, "info", InfoRequest(), InfoResponse, 10, 10) for s in server_ids]
    return [info.cache_tokens_left for info in infos]


def test_disconnect_mid_stream_frees_the_session(api):
    async def scenario() -> None:
        peer = await Peer.start(NetworkConfig(initial_peers=tuple(api.swarm.initial_peers), host_maddrs=(LOOPBACK,),
                                              client_mode=True))
        try:
            servers = await fetch_servers(peer, os.path.basename(api.models["chat"]), [0])
            ids = sorted({p for by_peer in servers.values() for p in by_peer})
            assert len(ids) == 1
            before = await _tokens_left(peer, ids)

            def start() -> Any:
                stream = api.client.completions.create(model=api.models["chat"], prompt="The quick brown fox",
                                                       max_tokens=1500, temperature=0, stream=True)
                for _ in range(3):
                    next(iter(stream))
                return stream

            stream = await asyncio.to_thread(start)
            during = await _tokens_left(peer, ids)
            # the session holds pages of the servers' caches for what it has cached so far
            assert all(d < b for d, b in zip(during, before)), (before, during)
            await asyncio.to_thread(stream.close)
            for _ in range(100):  # bounded: the API cancels, the servers see the streams close
                if await _tokens_left(peer, ids) == before:
                    break
                await asyncio.sleep(0.05)
            assert await _tokens_left(peer, ids) == before
        finally:
            await peer.shutdown()

    aio.run(scenario())
    wait_until(lambda: "swarm_api_active_generations 0.0" in api.raw("GET", "metrics")[1], "the slot's release")
    assert 'swarm_api_requests_total{endpoint="completions",status="499"}' in api.raw("GET", "metrics")[1]


# ---------------------------------------------------------------- health, metrics, the page


def test_health_and_metrics(api):
    status, body = api.raw("GET", "health", key=None)
    assert status == 200 and json.loads(body)["status"] == "ok"
    api.client.chat.completions.create(model=api.models["chat"], messages=HELLO, max_tokens=3)
    status, text = api.raw("GET", "metrics", key=None)
    assert status == 200
    for name in ("swarm_api_requests_total", "swarm_api_errors_total", "swarm_api_time_to_first_token_seconds_count",
                 "swarm_api_tokens_per_second_bucket", "swarm_api_generated_tokens_total"):
        assert name in text, name
    assert 'swarm_api_requests_total{endpoint="chat.completions",status="200"}' in text


def test_chat_page_in_a_real_browser(api, tmp_path):
    binary = find_chromium()
    expected = api.client.chat.completions.create(model=api.models["chat"], messages=HELLO, max_tokens=8,
                                                  temperature=0).choices[0].message.content
    browser = Browser(binary, str(tmp_path / "profile"))
    try:
        browser.navigate(api.url)
        browser.wait_for("document.body.dataset.state === 'error'", what="the key error before a key is given")
        browser.evaluate("document.getElementById('api-key').focus()")
        browser.type_text(KEY)
        browser.evaluate("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        browser.wait_for("document.body.dataset.state === 'idle'", what="the model list")
        options = browser.evaluate("[...document.querySelectorAll('#model option')].map(o => o.value)")
        assert api.models["chat"] in options and "mine" in options
        browser.evaluate(f"document.getElementById('model').value = {json.dumps(api.models['chat'])};"
                         "document.getElementById('temperature').value = '0';"
                         "document.getElementById('max-tokens').value = '8';"
                         "document.getElementById('prompt').focus()")
        browser.type_text(HELLO[0]["content"])
        browser.evaluate("document.getElementById('send').click()")
        browser.wait_for("document.querySelector('.message.assistant') && "
                         "document.querySelector('.message.assistant').dataset.finish", what="the answer")
        answer = browser.evaluate("document.querySelector('.message.assistant').firstChild.textContent")
        assert answer == expected
        assert browser.evaluate("document.querySelector('.message.user').textContent") == HELLO[0]["content"]
        browser.screenshot(str(tmp_path / "chat.png"))
        assert (tmp_path / "chat.png").stat().st_size > 5000
    finally:
        browser.close()
