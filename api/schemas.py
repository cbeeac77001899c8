"""Requests and responses of the API as declared dataclasses, and the parsing that names the bad field.

A request body is checked whole before anything runs: a value of the wrong JSON type is a 422, a
value out of range or a feature this API does not offer is a 400, each naming its field (``param``).
Unknown fields are ignored, as OpenAI's clients send some this API does not use (``user``,
``metadata``). Responses are dataclasses too; :func:`to_json` turns them into the JSON OpenAI's
clients read.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from api.errors import ApiError, invalid

MAX_N = 16  # choices per request (each is a row of the session's batch)
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool")
MISSING = object()


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How tokens are chosen; shared by chat and plain completions."""

    max_tokens: int | None = None  # None: the API's --default-max-tokens (chat) or 16 (completions)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[dict[str, Any], ...]  # role, content (text), and tool_calls / tool_call_id / name as given
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    tools: tuple[dict[str, Any], ...] = ()  # OpenAI's {"type": "function", "function": {...}} entries


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | tuple[int, ...]  # text, or token ids
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclasses.dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str
    function: dict[str, str]  # {"name": ..., "arguments": JSON text}
    type: str = "function"


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    content: str | None
    role: str = "assistant"
    tool_calls: list[ToolCall] | None = None
    refusal: None = None


@dataclasses.dataclass(frozen=True)
class ChatChoice:
    index: int
    message: ChatMessage
    finish_reason: str
    logprobs: dict[str, list[TokenLogprob]] | None = None


@dataclasses.dataclass(frozen=True)
class ChatCompletion:
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


@dataclasses.dataclass(frozen=True)
class ChunkChoice:
    index: int
    delta: dict[str, Any]  # role / content / tool_calls, only what this chunk adds
    finish_reason: str | None = None
    logprobs: dict[str, list[TokenLogprob]] | None = None


@dataclasses.dataclass(frozen=True)
class ChatChunk:
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


@dataclasses.dataclass(frozen=True)
class CompletionLogprobs:
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


@dataclasses.dataclass(frozen=True)
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


@dataclasses.dataclass(frozen=True)
class Completion:
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


@dataclasses.dataclass(frozen=True)
class ModelCard:
    id: str
    created: int
    owned_by: str
    complete: bool  # every block has an online server now
    parent: str | None = None  # the base model of an adapter
    object: str = "model"


def to_json(value: Any) -> Any:
    """A response dataclass (or anything holding them) as plain JSON values."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- parsing


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any, what: str) -> Any:
    value = body.get(name, MISSING)
    if value is MISSING or value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise invalid(name, f"must be {what}, got {type(value).__name__} {json.dumps(value)[:80]}", status=422)
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = float(_get(body, name, (int, float), default, "a number"))
    if not low <= value <= high:
        raise invalid(name, f"{value} is outside {low}..{high}")
    return value


def _int(body: dict[str, Any], name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = _get(body, name, (int,), default, "an integer")
    if value is not None and (value < low or (high is not None and value > high)):
        raise invalid(name, f"{value} is outside {low}..{high if high is not None else 'inf'}")
    return value


def _sampling(body: dict[str, Any], chat: bool) -> Sampling:
    max_tokens = _int(body, "max_tokens", None, 1)
    if chat:
        max_tokens = _int(body, "max_completion_tokens", max_tokens, 1)
    stop = _get(body, "stop", (str, list), (), "a string or a list of strings")
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise invalid("stop", f"must be at most {MAX_STOP} non-empty strings")
    if chat:
        logprobs = _get(body, "logprobs", (bool,), False, "a boolean")
        top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top and not logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
    else:  # legacy completions: logprobs is the number of top alternatives (0..5)
        top = _int(body, "logprobs", None, 0, 5)
        logprobs, top = top is not None, top or 0
    seed = _get(body, "seed", (int,), None, "an integer")
    return Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0), stop=stop, seed=seed,
                    n=_int(body, "n", 1, 1, MAX_N), logprobs=logprobs, top_logprobs=top,
                    presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
                    frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0))


def _model(body: dict[str, Any]) -> str:
    model = _get(body, "model", (str,), "", "a string")
    if not model:
        raise invalid("model", "is required: a model id from GET /v1/models")
    return model


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _get(body, "stream", (bool,), False, "a boolean")
    options = _get(body, "stream_options", (dict,), {}, "an object")
    if options and not stream:
        raise invalid("stream_options", "is only allowed with stream: true")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise invalid("stream_options.include_usage", "must be a boolean", status=422)
    return stream, include


def _refuse(body: dict[str, Any], name: str, reason: str, allowed: Any = None) -> None:
    value = body.get(name)
    if value not in (None, allowed) and value != {} and value != []:
        raise invalid(name, reason)


def _content(value: Any, param: str) -> str | None:
    """Message content: text, or a list of text parts (joined); images and audio are refused."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(param, f"must be a string or a list of content parts, got {type(value).__name__}", 422)
    texts = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise invalid(f"{param}[{i}]", f"only text parts are supported, got {kind!r}")
        texts.append(part["text"])
    return "".join(texts)


def _messages(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    messages = _get(body, "messages", (list,), None, "a list of messages")
    if not messages:
        raise invalid("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(param, f"must be an object, got {type(message).__name__}", 422)
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{param}.role", f"{role!r} is not one of {', '.join(ROLES)}")
        parsed: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                  "content": _content(message.get("content"), f"{param}.content")}
        if parsed["content"] is None and not (role == "assistant" and message.get("tool_calls")):
            raise invalid(f"{param}.content", "is required")
        if role == "assistant" and message.get("tool_calls"):
            parsed["tool_calls"] = _tool_calls(message["tool_calls"], f"{param}.tool_calls")
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                parsed[key] = message[key]
        out.append(parsed)
    return tuple(out)


def _tool_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    """An assistant message's earlier tool calls, with arguments as objects (what chat templates render)."""
    if not isinstance(calls, list):
        raise invalid(param, "must be a list", 422)
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid(f"{param}[{i}].function", "must be an object with a name and arguments")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                raise invalid(f"{param}[{i}].function.arguments", "must be a JSON object text") from None
        out.append({"id": call.get("id", ""), "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}})
    return out


def _tools(body: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    tools = _get(body, "tools", (list,), [], "a list of tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise invalid(f"tools[{i}]", 'must be {"type": "function", "function": {"name": ..., "parameters": ...}}')
        if not isinstance(function.get("parameters", {}), dict):
            raise invalid(f"tools[{i}].function.parameters", "must be a JSON Schema object", 422)
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise invalid("tool_choice", "only 'auto' and 'none' are supported: this API cannot force a tool call")
    return () if choice == "none" else tuple(tools)


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    format_type = body.get("response_format", {}).get("type") if isinstance(body.get("response_format"), dict) \
        else body.get("response_format")
    if format_type not in (None, "text"):
        raise invalid("response_format", f"{format_type!r} is not supported: this API has no constrained "
                                         "decoding, so it cannot guarantee JSON output; ask for JSON in the prompt")
    for name in ("functions", "function_call"):
        _refuse(body, name, "the deprecated functions API is not supported; use tools")
    _refuse(body, "logit_bias", "is not supported")
    _refuse(body, "audio", "audio output is not supported")
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise invalid("modalities", "only ['text'] is supported")
    model, messages, sampling = _model(body), _messages(body), _sampling(body, chat=True)
    stream, include = _stream(body)
    return ChatRequest(model=model, messages=messages, sampling=sampling, stream=stream, include_usage=include,
                       tools=_tools(body))


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if min(prompt) < 0:
            raise invalid("prompt", "token ids must be non-negative")
        prompt = tuple(prompt)
    elif not isinstance(prompt, str) or not prompt:
        raise invalid("prompt", "must be a non-empty string or a list of token ids (one prompt per request)")
    for name, allowed in (("echo", False), ("suffix", ""), ("best_of", 1)):
        _refuse(body, name, "is not supported", allowed)
    _refuse(body, "logit_bias", "is not supported")
    sampling = _sampling(body, chat=False)
    stream, include = _stream(body)
    return CompletionRequest(model=_model(body), prompt=prompt, sampling=sampling, stream=stream,
                             include_usage=include)
