"""One choice's text as its tokens arrive: incremental decoding, stop strings, tool-call sections.

Decoding is incremental over a short window of tokens (a token that ends inside a UTF-8 character
waits for the next one). Stop strings are searched in the decoded text, so a stop string split
across tokens is still found; the text from the stop string on is dropped. What is handed out as
content never includes text that might still become a stop string or the start of a tool-call
section: that is held back until it is known.
"""

from __future__ import annotations

from typing import Any

from api.tools import ParsedCall, ToolFormat, partial_suffix


class ChoiceText:
    """``add(token)`` returns content that is now safe to send; ``finish(reason)`` returns the rest."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), tool_format: ToolFormat | None = None):
        self.tokenizer, self.stop, self.tool_format = tokenizer, stop, tool_format
        self.ids: list[int] = []
        self.offsets: list[int] = []  # where each token's text starts in self.text
        self.text = ""  # decoded so far (cut at a stop string)
        self.sent = 0  # characters of self.text handed out as content
        self.section: int | None = None  # where a tool-call section starts in self.text
        self.finish_reason: str | None = None
        self.calls: list[ParsedCall] | None = None
        self._prefix = 0  # decoding window: ids[_prefix:_read] are already in self.text
        self._read = 0

    def add(self, token: int) -> str:
        """Adds a generated token (not an end-of-sequence one); returns newly safe content."""
        self.offsets.append(len(self.text))
        self.ids.append(token)
        self._decode(final=False)
        return self._emit(final=False)

    def finish(self, reason: str) -> str:
        """Ends the choice (``stop``, ``length``); returns the remaining content. A stop string found
        earlier keeps its reason; parsed tool calls make it ``tool_calls``."""
        if self.finish_reason is None:
            self._decode(final=True)
        rest = self._emit(final=True)
        if self.finish_reason is None:
            self.finish_reason = reason
        if self.section is not None:
            self.calls = self.tool_format.parse(self.text[self.section:])
            if self.calls:
                self.finish_reason = "tool_calls"
            else:  # not well-formed calls: the client gets the text as it is
                rest += self.text[self.section:]
        return rest

    @property
    def content(self) -> str:
        """All content so far (the text before any tool-call section)."""
        return self.text[: self.section] if self.section is not None else self.text

    def _decode(self, final: bool) -> None:
        if self.finish_reason is not None:
            return
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        now = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if not final and (len(now) <= len(before) or now.endswith("\ufffd")):
            return  # nothing new yet, or a character split across tokens
        old = len(self.text)
        self.text += now[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        if self.stop:
            start = max(0, old - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish_reason = "stop"

    def _emit(self, final: bool) -> str:
        limit = len(self.text)
        if self.tool_format is not None:
            if self.section is None:
                self.section = self.tool_format.section_start(self.text)
            if self.section is not None:
                limit = self.section
            elif not final and self.finish_reason is None:
                limit -= self.tool_format.holdback(self.text)
        if not final and self.finish_reason is None and self.stop:
            limit -= partial_suffix(self.text[:limit], self.stop)
        if limit <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:limit], limit
        return out

    @property
    def done(self) -> bool:
        """A stop string ended this choice."""
        return self.finish_reason is not None
