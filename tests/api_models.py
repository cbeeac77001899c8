"""Tiny models for the API tests: a random chat model, and models whose output is a known tool call.

The two tool-call chat templates are written for these tests from the published formats (no package
ships the real template files): ``QWEN_TOOLS_TEMPLATE`` follows Qwen2.5's (ChatML turns, the tools as
JSON lines inside ``<tools></tools>`` in the system turn, calls as ``<tool_call>{"name", "arguments"}
</tool_call>``, results as ``<tool_response>`` in a user turn); ``LLAMA31_TOOLS_TEMPLATE`` follows Llama
3.1's JSON tool calling (header tokens, ``Environment: ipython``, the functions in the first user turn,
calls as ``{"name", "parameters"}``, results in an ``ipython`` turn).

A *rigged* tool model answers a fixed tool call whatever it is asked: its blocks add nothing to the
residual stream (attention and MLP output projections are zero), so each next token depends on the
current token alone, and its embeddings and head map the prompt's last token to the call's first
token, and so on, to the end-of-turn token. The servers still run every block.
"""

from __future__ import annotations

import torch

from swarm.tiny import make_tiny_chat_model

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello! How are you today? I am fine, thank you.",
          "A swarm of small machines serves a large language model together. What is the weather in Paris?",
          "You are a helpful assistant. Given the following functions, please respond with a JSON."]

QWEN_TOOLS_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful assistant.{% endif %}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% else %}<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA31_TOOLS_TEMPLATE = """\
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}{%- set rest = messages[1:] %}
{%- else %}{%- set system = '' %}{%- set rest = messages %}{%- endif %}
<|start_header_id|>system<|end_header_id|>

{% if tools %}Environment: ipython
{% endif %}Cutting Knowledge Date: December 2023

{{ system }}<|eot_id|>
{%- for message in rest %}
{%- if loop.first and tools and message.role == 'user' %}<|start_header_id|>user<|end_header_id|>

Given the following functions, please respond with a JSON for a function call with its proper arguments that \
best answers the given prompt.

Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. \
Do not use variables.

{% for tool in tools %}{{ tool | tojson(indent=4) }}

{% endfor %}{{ message.content }}<|eot_id|>
{%- elif message.role == 'assistant' and message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{% for call in message.tool_calls %}<|python_tag|>{"name": "{{ call.function.name }}", "parameters": \
{{ call.function.arguments | tojson }}}{% endfor %}<|eom_id|>
{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

QWEN_TOKENS = ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")
LLAMA_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>")

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QWEN_CALL = ("<tool_call>", '{"name": "get_weather", "arguments": {"city": "Paris"}}', "</tool_call>")
LLAMA_CALL = ('{"name": "get_weather", "parameters": {"city": "Paris"}}',)


def make_chat_model(path: str) -> str:
    """A random-weight Qwen2 with the Qwen tool template (4 blocks)."""
    return make_tiny_chat_model(path, "qwen2", texts=CORPUS, vocab_size=400, chat_template=QWEN_TOOLS_TEMPLATE,
                                extra_special_tokens=QWEN_TOKENS[:2], eos_token="<|im_end|>")


def make_rigged_tool_model(path: str, style: str) -> str:
    """A model (2 blocks) that answers any chat with a get_weather(city=Paris) call in ``style``
    (``qwen``: Qwen2 family, hermes format; ``llama``: Llama family, Llama 3.1 JSON format)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    qwen = style == "qwen"
    make_tiny_chat_model(path, "qwen2" if qwen else "llama", texts=CORPUS, vocab_size=400, model_overrides={"num_hidden_layers": 2},
                         chat_template=QWEN_TOOLS_TEMPLATE if qwen else LLAMA31_TOOLS_TEMPLATE,
                         extra_special_tokens=QWEN_TOKENS[:2] if qwen else LLAMA_TOKENS,
                         eos_token="<|im_end|>" if qwen else "<|eot_id|>")
    tokenizer = AutoTokenizer.from_pretrained(path)
    call = QWEN_CALL if qwen else LLAMA_CALL
    tokenizer.add_tokens(list(call))  # each piece of the call is one token, so no token repeats
    tokenizer.save_pretrained(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the weather in Paris?"}],
                                           tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False)
    last = tokenizer(prompt, add_special_tokens=False).input_ids[-1]
    chain = [last, *tokenizer.convert_tokens_to_ids(list(call)), tokenizer.eos_token_id]

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for layer in model.model.layers:  # every block leaves the residual stream as it is
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        for i, (token, following) in enumerate(zip(chain, chain[1:])):
            embed[token] = 0.0
            embed[token, i] = 1.0  # orthogonal directions for the tokens of the chain
            head[following, i] = 50.0
    model.config.tie_word_embeddings = False
    model.save_pretrained(path, safe_serialization=True)
    return path
