"""A job's events as OpenAI's responses: whole completions, or the chunks of a stream.

Usage counts the prompt once (as OpenAI does for ``n`` > 1) and every generated token of every
choice, the end-of-sequence token included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from api.generation import ChoiceEvent, TokenInfo
from api.schemas import (ChatChoice, ChatChunk, ChatCompletion, ChatMessage, ChunkChoice, Completion,
                         CompletionChoice, CompletionLogprobs, TokenLogprob, ToolCall, TopLogprob, Usage)
from api.serving import Job
from api.tools import ParsedCall, call_id


def usage(job: Job) -> Usage:
    return Usage(prompt_tokens=len(job.prompt), completion_tokens=job.completion_tokens,
                 total_tokens=len(job.prompt) + job.completion_tokens)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(tokens: list[TokenInfo]) -> list[TokenLogprob]:
    return [TokenLogprob(t.text, t.logprob, _bytes(t.text), [TopLogprob(s, v, _bytes(s)) for s, v in t.top])
            for t in tokens]


def _tool_calls(calls: list[ParsedCall]) -> list[ToolCall]:
    return [ToolCall(id=call_id(), function={"name": c.name, "arguments": c.arguments}) for c in calls]


class _Collected:
    """Every choice's text, tokens and ending, gathered from the events."""

    def __init__(self, n: int):
        self.texts = [""] * n
        self.tokens: list[list[TokenInfo]] = [[] for _ in range(n)]
        self.finish: list[str] = ["length"] * n
        self.calls: list[list[ParsedCall] | None] = [None] * n

    def add(self, event: ChoiceEvent) -> None:
        self.texts[event.index] += event.text
        self.tokens[event.index] += event.tokens
        if event.finish_reason is not None:
            self.finish[event.index], self.calls[event.index] = event.finish_reason, event.calls


async def _collect(job: Job) -> _Collected:
    collected = _Collected(job.sampling.n)
    async for step in job.events():
        for event in step:
            collected.add(event)
    return collected


async def chat_completion(job: Job) -> ChatCompletion:
    c = await _collect(job)
    choices = []
    for i in range(job.sampling.n):
        calls = _tool_calls(c.calls[i]) if c.calls[i] else None
        message = ChatMessage(content=c.texts[i] if c.texts[i] or not calls else None, tool_calls=calls)
        logprobs = {"content": chat_logprobs(c.tokens[i])} if job.sampling.logprobs else None
        choices.append(ChatChoice(i, message, c.finish[i], logprobs))
    return ChatCompletion(id=f"chatcmpl-{job.id}", created=job.created, model=job.model, choices=choices,
                          usage=usage(job))


async def chat_chunks(job: Job, include_usage: bool) -> AsyncIterator[ChatChunk]:
    started: set[int] = set()
    async for step in job.events():
        choices = []
        for event in step:
            delta: dict = {}
            if event.index not in started:
                started.add(event.index)
                delta["role"] = "assistant"
            if event.text or "role" in delta:
                delta["content"] = event.text
            if event.calls:
                delta["tool_calls"] = [{"index": k, "id": call.id, "type": "function", "function": call.function}
                                       for k, call in enumerate(_tool_calls(event.calls))]
            logprobs = {"content": chat_logprobs(event.tokens)} if job.sampling.logprobs else None
            if delta or event.finish_reason or event.tokens:
                choices.append(ChunkChoice(event.index, delta, event.finish_reason, logprobs))
        if choices:
            yield ChatChunk(id=f"chatcmpl-{job.id}", created=job.created, model=job.model, choices=choices)
    if include_usage:
        yield ChatChunk(id=f"chatcmpl-{job.id}", created=job.created, model=job.model, choices=[], usage=usage(job))


def completion_logprobs(tokens: list[TokenInfo], offset: int = 0) -> CompletionLogprobs:
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return CompletionLogprobs(tokens=[t.text for t in tokens], token_logprobs=[t.logprob for t in tokens],
                              top_logprobs=[dict(t.top) for t in tokens], text_offset=offsets)


async def completion(job: Job) -> Completion:
    c = await _collect(job)
    choices = [CompletionChoice(i, c.texts[i], c.finish[i],
                                completion_logprobs(c.tokens[i]) if job.sampling.logprobs else None)
               for i in range(job.sampling.n)]
    return Completion(id=f"cmpl-{job.id}", created=job.created, model=job.model, choices=choices, usage=usage(job))


async def completion_chunks(job: Job, include_usage: bool) -> AsyncIterator[Completion]:
    offsets = [0] * job.sampling.n
    async for step in job.events():
        choices = []
        for event in step:
            logprobs = completion_logprobs(event.tokens, offsets[event.index]) if job.sampling.logprobs else None
            offsets[event.index] += sum(len(t.text) for t in event.tokens)
            if event.text or event.finish_reason or event.tokens:
                choices.append(CompletionChoice(event.index, event.text, event.finish_reason, logprobs))
        if choices:
            yield Completion(id=f"cmpl-{job.id}", created=job.created, model=job.model, choices=choices)
    if include_usage:
        yield Completion(id=f"cmpl-{job.id}", created=job.created, model=job.model, choices=[], usage=usage(job))
