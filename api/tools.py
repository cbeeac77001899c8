"""Tool calls in model output, in the formats chat templates define.

The format is read from the model's chat template, not from its family, so any model whose template
speaks one of these works:

- ``hermes`` (Qwen2.5, Qwen3 and others): each call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
  text before the first call is the message's content.
- ``llama3_json`` (Llama 3.1/3.2/3.3 custom tools): the whole message is one or more
  ``{"name": ..., "parameters": {...}}`` objects (after the ``<|python_tag|>`` token, which decoding drops),
  separated by ``;`` or newlines.

A section that does not parse as calls stays content: the client sees what the model wrote.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES_CALL = re.compile(re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|\Z)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI's tool_calls carry it


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    name: str  # "hermes" or "llama3_json"

    def section_start(self, text: str) -> int | None:
        """Where the tool-call section of ``text`` begins, or None if it has not (yet)."""
        if self.name == "hermes":
            index = text.find(HERMES_OPEN)
            return None if index < 0 else index
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("{") else None

    def holdback(self, text: str) -> int:
        """How many trailing characters of ``text`` might still turn out to start a section."""
        if self.name == "hermes":
            return partial_suffix(text, (HERMES_OPEN,))
        return len(text) if not text.strip() else 0  # the message is a call only if it starts with one

    def parse(self, section: str) -> list[ParsedCall] | None:
        """The calls in a section, or None if it is not entirely well-formed calls."""
        objects = _hermes_objects(section) if self.name == "hermes" else _json_objects(section)
        if not objects:
            return None
        calls = []
        for obj in objects:
            arguments = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else None
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return None
            if not isinstance(obj.get("name"), str) or not isinstance(arguments, dict):
                return None
            calls.append(ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False)))
        return calls


def detect_format(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template defines, or None if it defines none."""
    if not chat_template or "tools" not in chat_template:
        return None
    if HERMES_OPEN in chat_template:
        return ToolFormat("hermes")
    if "<|python_tag|>" in chat_template or '"parameters"' in chat_template:
        return ToolFormat("llama3_json")
    return None


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of one of ``markers``."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-size:]):
                best = size
                break
    return best


def _hermes_objects(section: str) -> list[Any] | None:
    bodies = [m.group(1).strip() for m in _HERMES_CALL.finditer(section)]
    rest = _HERMES_CALL.sub("", section).strip()
    if rest or not bodies:
        return None
    try:
        return [json.loads(body) for body in bodies]
    except ValueError:
        return None


def _json_objects(section: str) -> list[Any] | None:
    decoder, objects, i = json.JSONDecoder(), [], 0
    text = section.strip()
    while i < len(text):
        try:
            obj, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        objects.append(obj)
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
    return objects
