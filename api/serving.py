"""What a request does, apart from HTTP: prompts, limits, the generation slot, responses and chunks.

:class:`ApiService` owns the API's DHT peer, the model catalog, the compute executor, the
``--max-concurrent`` slots and the metrics (``async with ApiService(config) as service``).
:meth:`ApiService.prepare` checks a request against the model and the swarm's limits before anything
runs (404, 400, 503 come from here); :meth:`Job.events` then runs the generation in a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from swarm.command_config import ApiConfig
from swarm.dht import NetworkConfig, Peer

from api.catalog import Catalog, Served
from api.errors import ApiError, invalid
from api.generation import ChoiceEvent, choice_events, token_steps
from api.metrics import ApiMetrics
from api.schemas import ChatRequest, CompletionRequest, ModelCard, Sampling

logger = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclasses.dataclass
class Job:
    """A checked request, ready to generate: ``async for events in job.events(): ...``."""

    service: "ApiService"
    served: Served
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    arrived: float  # time.perf_counter() when the request arrived
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0
    tools: tuple[dict[str, Any], ...] = ()  # the request's tools: output is read for tool calls

    @property
    def model(self) -> str:
        return self.served.entry.id

    async def events(self) -> AsyncIterator[list[ChoiceEvent]]:
        """Per-step events of every choice; waits for a free slot first. Closing or cancelling it ends the
        generation and its inference session at once."""
        service, metrics = self.service, self.service.metrics
        metrics.waiting.inc()
        try:
            await service.slots.acquire()
        finally:
            metrics.waiting.dec()
        metrics.active.inc()
        first: float | None = None
        steps = token_steps(self.served.local, self.served.sequence, self.prompt, self.sampling, self.max_tokens,
                            service.executor)
        try:
            async with contextlib.aclosing(steps):
                events = choice_events(steps, self.served.tokenizer, self.served.eos_ids,
                                       self.sampling, self.served.tool_format if self.tools else None)
                async with contextlib.aclosing(events):
                    async for step in events:
                        if first is None:
                            first = time.perf_counter()
                            metrics.ttft.labels(self.model).observe(first - self.arrived)
                        self.completion_tokens += sum(event.generated for event in step)
                        yield step
        finally:
            service.slots.release()
            metrics.active.dec()
            metrics.prompt.labels(self.model).inc(len(self.prompt) * self.sampling.n)
            metrics.generated.labels(self.model).inc(self.completion_tokens)
            if first is not None and self.completion_tokens > self.sampling.n:
                elapsed = time.perf_counter() - first
                if elapsed > 0:
                    metrics.rate.labels(self.model).observe((self.completion_tokens - self.sampling.n) / elapsed)


class ApiService:
    def __init__(self, config: ApiConfig):
        self.config = config
        self.metrics = ApiMetrics()
        self.slots = asyncio.Semaphore(config.max_concurrent)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="swarm-api-compute")
        self.peer: Peer | None = None
        self.catalog: Catalog | None = None

    async def __aenter__(self) -> "ApiService":
        self.peer = await Peer.start(NetworkConfig(initial_peers=self.config.initial_peers,
                                                   host_maddrs=self.config.host_maddrs, client_mode=True,
                                                   swarm_key=self.config.swarm_key))
        self.catalog = Catalog(self.config, self.peer, self.executor)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            if self.catalog is not None:
                await self.catalog.close()
        finally:
            if self.peer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.peer.shutdown(), 10)
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def models(self) -> list[ModelCard]:
        entries = await self.catalog.entries()
        return [ModelCard(id=e.id, created=e.created, owned_by="swarm", complete=e.complete,
                          parent=e.base if e.id != e.base else None) for e in entries.values()]

    async def prepare_chat(self, request: ChatRequest, arrived: float) -> Job:
        served = await self.catalog.served(request.model)
        template = served.chat_template
        if not template:
            raise invalid("model", f"{request.model!r} has no chat template; use /v1/completions with a plain prompt")
        if request.tools and served.tool_format is None:
            raise invalid("tools", f"the chat template of {request.model!r} defines no tool-call format this API "
                                   "reads (Qwen2.5/Qwen3 <tool_call> or Llama 3.1 JSON)")
        try:
            text = served.tokenizer.apply_chat_template(list(request.messages), tools=list(request.tools) or None,
                                                        add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template's own checks (role order, ...) raise; the messages are at fault
            raise invalid("messages", f"the model's chat template refused them: {e}") from None
        prompt = served.tokenizer(text, add_special_tokens=False).input_ids
        job = await self._job(served, prompt, request.sampling, self.config.default_max_tokens, arrived)
        job.tools = request.tools
        return job

    async def prepare_completion(self, request: CompletionRequest, arrived: float) -> Job:
        served = await self.catalog.served(request.model)
        if isinstance(request.prompt, str):
            prompt = served.tokenizer(request.prompt).input_ids
        else:
            prompt = list(request.prompt)
            vocab = served.local.vocab_size
            if max(prompt) >= vocab:
                raise invalid("prompt", f"token id {max(prompt)} is outside this model's vocabulary (0..{vocab - 1})")
        if not prompt:
            raise invalid("prompt", "is empty after tokenization")
        return await self._job(served, prompt, request.sampling, COMPLETIONS_DEFAULT_MAX_TOKENS, arrived)

    async def _job(self, served: Served, prompt: list[int], sampling: Sampling, default_max: int,
                   arrived: float) -> Job:
        limit, reason = await self.catalog.max_total_tokens(served)
        if len(prompt) >= limit:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; at most {limit - 1} fit with one token to "
                                f"generate ({limit} tokens in all, set by {reason})", param="messages",
                           code="context_length_exceeded")
        max_tokens = sampling.max_tokens
        if max_tokens is None:
            max_tokens = min(default_max, limit - len(prompt))
        elif len(prompt) + max_tokens > limit:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) is "
                                f"{len(prompt) + max_tokens} tokens; at most {limit} fit ({reason}); lower max_tokens "
                                f"to {limit - len(prompt)} or shorten the prompt", param="max_tokens",
                           code="context_length_exceeded")
        return Job(self, served, prompt, sampling, max_tokens, arrived)
