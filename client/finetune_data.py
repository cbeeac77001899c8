"""Instruction data for ``swarm finetune``: files -> chat messages -> token ids with loss labels.

Three formats are recognised per example (docs/finetune.md):

- **alpaca**: ``{"instruction", "input" (optional), "output"}`` -> user = instruction (+ "\\n\\n" + input),
  assistant = output;
- **sharegpt**: ``{"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"system", "value"}, ...]}``;
- **messages**: ``{"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}`` (OpenAI/TRL).

A conversation is rendered with the tokenizer's chat template and tokenized once; the loss is computed
only on the assistant turns (the template's text from where a generation prompt ends to the end of
the turn, end-of-turn tokens included). Everything here is pure: no model, no network.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
from typing import Any

from swarm.errors import ConfigError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels HF's causal LM loss skips

# For a tokenizer with no chat template of its own: plain markdown-ish turns, the tokenizer's eos
# after each assistant turn (so the model learns to stop), bos first if the tokenizer has one.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token or '' }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGE_ROLES = ("system", "user", "assistant")
TURN_FIELDS = {"sharegpt": ("conversations", "from", "value"), "messages": ("messages", "role", "content")}
EXPECTED_FIELDS = ('alpaca {"instruction": str, "input": str (optional), "output": str}, '
                   'sharegpt {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]} or '
                   'messages {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}')

Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Record:
    """One example as read from the file; ``where`` names it in errors (``example 3 (line 4)``)."""

    data: Any
    where: str


@dataclasses.dataclass(frozen=True)
class Example:
    """A tokenized conversation: ``labels[i]`` is ``input_ids[i]`` on assistant tokens, else -100."""

    input_ids: list[int]  # [seq]
    labels: list[int]  # [seq]
    truncated: bool = False


@dataclasses.dataclass(frozen=True)
class DatasetStats:
    formats: dict[str, int]  # format name -> examples
    truncated: int  # examples cut at --max-length
    skipped: int  # examples left with no assistant token (after truncation)
    tokens: int  # tokens of the kept examples
    trained_tokens: int  # of which carry a label

    def describe(self) -> str:
        formats = ", ".join(f"{n} {name}" for name, n in sorted(self.formats.items()))
        return (f"{formats}; {self.tokens} tokens, {self.trained_tokens} of them in assistant turns; "
                f"{self.truncated} cut at --max-length, {self.skipped} skipped (no assistant tokens left)")


# ---------------------------------------------------------------- files


def load_records(path: str) -> list[Record]:
    """A JSON file holding a list of examples, or a JSONL file with one example per line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--data {path}: cannot read it ({e})") from e
    body = text.lstrip()
    if not body:
        raise ConfigError(f"--data {path} is empty; it needs a JSON list of examples or one JSON example per line")
    if body.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--data {path} is not valid JSON: {e}") from e
        records = [Record(item, f"example {i}") for i, item in enumerate(data)]
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--data {path}: line {lineno} is not valid JSON ({e}); a .json file holds a "
                                  "list of examples, a .jsonl file one example per line") from e
            records.append(Record(item, f"example {len(records)} (line {lineno})"))
    if not records:
        raise ConfigError(f"--data {path} holds no examples")
    for record in records:
        if not isinstance(record.data, dict):
            raise ConfigError(f"--data {path}: {record.where} is a {type(record.data).__name__}, not an object; "
                              f"expected {EXPECTED_FIELDS}")
    return records


# ---------------------------------------------------------------- formats -> messages


def detect_format(item: dict, where: str) -> str:
    """``"alpaca"``, ``"sharegpt"`` or ``"messages"``; raises naming the expected fields."""
    if "conversations" in item:
        return "sharegpt"
    if "messages" in item:
        return "messages"
    if "instruction" in item and "output" in item:
        return "alpaca"
    raise ConfigError(f"{where} has fields {sorted(item)}; expected {EXPECTED_FIELDS}")


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {field} must be a string, got {type(value).__name__}")
    return value


def to_messages(item: dict, where: str) -> tuple[str, Messages]:
    """(format, chat messages ``[{"role", "content"}]``) of one example."""
    kind = detect_format(item, where)
    if kind == "alpaca":
        user = _text(item["instruction"], where, '"instruction"')
        extra = _text(item.get("input") or "", where, '"input"')
        if extra:
            user = f"{user}\n\n{extra}"
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _text(item["output"], where, '"output"')}]
    else:
        field, role_key, content_key = TURN_FIELDS[kind]
        turns = item[field]
        if not isinstance(turns, list) or not turns:
            raise ConfigError(f"{where}: {field!r} must be a non-empty list of turns; expected {EXPECTED_FIELDS}")
        messages = []
        for t, turn in enumerate(turns):
            if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
                raise ConfigError(f"{where}: turn {t} of {field!r} needs {role_key!r} and {content_key!r}; "
                                  f"expected {EXPECTED_FIELDS}")
            speaker = turn[role_key]
            role = SHAREGPT_ROLES.get(speaker) if kind == "sharegpt" else (speaker if speaker in MESSAGE_ROLES
                                                                             else None)
            if role is None:
                known = sorted(SHAREGPT_ROLES) if kind == "sharegpt" else list(MESSAGE_ROLES)
                raise ConfigError(f"{where}: turn {t} has {role_key} {speaker!r}; known: {', '.join(known)}")
            messages.append({"role": role, "content": _text(turn[content_key], where, f"turn {t} {content_key!r}")})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where} has no assistant turn to learn from")
    return kind, messages


# ---------------------------------------------------------------- chat template and labels


def set_chat_template(tokenizer: Any, template_path: str | None = None) -> str:
    """Gives ``tokenizer`` the template to train with; returns where it came from: ``file``,
    ``tokenizer`` or ``fallback`` (:data:`FALLBACK_CHAT_TEMPLATE`)."""
    if template_path is not None:
        try:
            with open(template_path, encoding="utf-8") as f:
                tokenizer.chat_template = f.read()
        except OSError as e:
            raise ConfigError(f"--chat-template {template_path}: cannot read it ({e})") from e
        return "file"
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return "fallback"


def _render(tokenizer: Any, messages: Messages, where: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's TemplateError, raise_exception() of strict templates
        raise ConfigError(f"{where}: the chat template refused this conversation ({type(e).__name__}: {e}); "
                          "fix the example or pass --chat-template FILE") from e


def assistant_char_spans(tokenizer: Any, messages: Messages, where: str) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [start, end) character ranges of its assistant turns).

    A turn's range runs from the end of the rendering of the turns before it with a generation
    prompt to the end of the rendering that includes it. Both renderings must be prefixes of the
    whole conversation's: templates that render a turn differently depending on what follows it
    are refused (the labels would be wrong).
    """
    text = _render(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], where, generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], where)
        if not (text.startswith(before) and text.startswith(upto) and len(before) <= len(upto)):
            raise ConfigError(f"{where}: the chat template renders turn {i} differently when more turns follow, so "
                              "the assistant's tokens cannot be found; pass --chat-template FILE with a template "
                              "whose rendering of a conversation starts with the rendering of its first turns")
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_conversation(tokenizer: Any, messages: Messages, max_length: int, where: str = "example",
                          use_offsets: bool | None = None) -> Example | None:
    """Token ids and labels (-100 outside assistant turns), cut to ``max_length``; None if no
    assistant token is left. Fast tokenizers place tokens by character offsets; others (or
    ``use_offsets=False``) by tokenizing the prefixes that end where each assistant turn starts/ends."""
    text, spans = assistant_char_spans(tokenizer, messages, where)
    if use_offsets is None:
        use_offsets = bool(getattr(tokenizer, "is_fast", False))
    if use_offsets:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        trained = [any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]
    else:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        trained = [False] * len(ids)
        for a, b in spans:
            lo = len(tokenizer(text[:a], add_special_tokens=False)["input_ids"])
            hi = len(tokenizer(text[:b], add_special_tokens=False)["input_ids"])
            trained[lo:hi] = [True] * (min(hi, len(ids)) - lo)
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, trained)]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return Example(ids, labels, truncated)


def build_dataset(records: list[Record], tokenizer: Any, max_length: int) -> tuple[list[Example], DatasetStats]:
    """Every record -> an :class:`Example`; those left without assistant tokens are skipped (counted)."""
    formats: collections.Counter[str] = collections.Counter()
    examples: list[Example] = []
    skipped = truncated = 0
    for record in records:
        kind, messages = to_messages(record.data, record.where)
        formats[kind] += 1
        example = tokenize_conversation(tokenizer, messages, max_length, record.where)
        if example is None:
            skipped += 1
            continue
        truncated += example.truncated
        examples.append(example)
    stats = DatasetStats(dict(formats), truncated, skipped, sum(len(e.input_ids) for e in examples),
                         sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples))
    return examples, stats
