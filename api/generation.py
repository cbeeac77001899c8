"""One request's generation: local embeddings and head, the remote blocks through one inference session.

The model's own transformers class runs both local ends, so embedding scaling, final norm,
soft-capping and tied heads come from transformers as in ``model.generate``. Its decoder layers are
replaced by :class:`StagedLayers`, which runs a local pass in one of two stages: *embed* stops at
the layers and hands back their input; *head* feeds the blocks' output (computed by the swarm) to
the rest of the model and returns the logits. Between the two, ``session.astep`` sends the states
through the servers. Local passes run on one executor thread, so the event loop never waits on
torch; every step is one ``astep`` plus one executor hop (head, sampling and the next embedding).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from swarm.models import causal_lm_class, family_of

from client.inference_session import InferenceSession
from client.remote_sequence import RemoteSequence

from api.sampling import Pick, Sampler, request_seed
from api.schemas import Sampling
from api.text import ChoiceText
from api.tools import ParsedCall, ToolFormat

_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")  # what base models call the cache they pass layers


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor):
        super().__init__("hidden states captured")
        self.hidden = hidden


class _StageLayer(DynamicLayer):
    """Reports the session's length to the base model (positions, mask sizes); holds nothing."""

    is_compileable = False

    def __init__(self, position: int):
        super().__init__()
        self.position = position

    def get_seq_length(self) -> int:
        return self.position

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.position + query_length, 0


class Stage(Cache):
    """The cache object of one local pass: where the session is and, for the head stage, the blocks' output."""

    def __init__(self, position: int, output: torch.Tensor | None = None):
        super().__init__(layers=[_StageLayer(position)])
        self.output = output  # [n, new tokens, hidden] from the remote blocks; None: the embed stage


class StagedLayers(torch.nn.Module):
    """Stands where the decoder layers were: captures their input, or returns the swarm's output."""

    attention_type = "full_attention"

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        stage = next((kwargs[k] for k in _CACHE_KWARGS if isinstance(kwargs.get(k), Stage)), None)
        if stage is None:
            raise RuntimeError("StagedLayers runs only inside LocalModel passes")
        if stage.output is None:
            raise _Captured(hidden_states)
        return (stage.output, None) if self.returns_tuple else stage.output


class LocalModel:
    """The local part of a model (from ``AutoDistributedModelForCausalLM``) with staged layers."""

    def __init__(self, model: Any):
        config = model.config
        family = family_of(config)
        base = getattr(model, family.base_model_attr)
        setattr(base, family.layers_attr, torch.nn.ModuleList([StagedLayers(family.layer_returns_tuple)]))
        params = inspect.signature(causal_lm_class(config).forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.model = model
        self.vocab_size = model.get_output_embeddings().weight.shape[0]

    def _pass(self, ids: torch.Tensor, stage: Stage, **extra: Any) -> Any:
        mask = torch.ones(ids.shape[0], stage.layers[0].position + ids.shape[1], dtype=torch.long)
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=mask, use_cache=True, **{self.cache_kwarg: stage},
                              **extra)

    def embed(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """[n, new] token ids at ``position`` -> [n, new, hidden]: what the first block takes."""
        try:
            self._pass(ids, Stage(position))
        except _Captured as captured:
            return captured.hidden
        raise RuntimeError("the model's forward pass never reached its decoder layers")

    def last_logits(self, ids: torch.Tensor, position: int, output: torch.Tensor) -> torch.Tensor:
        """The blocks' ``output`` [n, new, hidden] for ``ids`` -> logits [n, vocab] of the last position."""
        return self._pass(ids, Stage(position, output), **self.keep_last).logits[:, -1]

    def step(self, ids: torch.Tensor, position: int, output: torch.Tensor, sampler: Sampler,
             embed_next: bool) -> tuple[Pick, torch.Tensor | None]:
        """Head, sampling and (if ``embed_next``) the chosen tokens' embeddings, in one executor hop."""
        pick = sampler.pick(self.last_logits(ids, position, output))
        hidden = self.embed(pick.tokens[:, None], position + ids.shape[1]) if embed_next else None
        return pick, hidden


async def token_steps(local: LocalModel, sequence: RemoteSequence, prompt: list[int], sampling: Sampling,
                      max_tokens: int, executor: Executor) -> AsyncIterator[Pick]:
    """Yields each step's :class:`Pick` for the ``n`` choices, at most ``max_tokens`` of them.

    The session is opened by the first step and closed when the iteration ends, however it ends
    (finished, abandoned, cancelled because the HTTP client left): the servers free its cache then.
    """
    loop = asyncio.get_running_loop()
    sampler = Sampler(sampling, local.vocab_size, request_seed(sampling.seed))
    ids = torch.tensor([prompt] * sampling.n, dtype=torch.long)  # [n, prompt]
    session = InferenceSession(sequence, len(prompt) + max_tokens)
    try:
        hidden = await loop.run_in_executor(executor, local.embed, ids, 0)
        position = 0
        for step in range(max_tokens):
            output = await session.astep(hidden)  # [n, new, hidden] through every block
            pick, hidden = await loop.run_in_executor(executor, local.step, ids, position, output, sampler,
                                                      step + 1 < max_tokens)
            position += ids.shape[1]
            ids = pick.tokens[:, None]
            yield pick
    finally:
        await session.aclose()


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """A generated token as logprobs report it."""

    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclasses.dataclass
class ChoiceEvent:
    """What one step adds to one choice."""

    index: int
    text: str = ""
    tokens: list[TokenInfo] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    calls: list[ParsedCall] | None = None
    generated: int = 0  # tokens this event stands for (1 for a step, 0 for the final flush)


async def choice_events(steps: AsyncIterator[Pick], tokenizer: Any, eos_ids: set[int], sampling: Sampling,
                        tool_format: ToolFormat | None = None) -> AsyncIterator[list[ChoiceEvent]]:
    """Turns token steps into per-choice text events; ends when every choice finished or tokens ran out.

    A choice ends at an end-of-sequence token or a stop string (``stop``), or when ``max_tokens``
    ran out (``length``); with a tool format, well-formed calls end it as ``tool_calls``.
    """
    choices = [ChoiceText(tokenizer, sampling.stop, tool_format) for _ in range(sampling.n)]
    finished = [False] * sampling.n
    async for pick in steps:
        events = []
        for i, choice in enumerate(choices):
            if finished[i]:
                continue
            token = int(pick.tokens[i])
            event = ChoiceEvent(i, generated=1)
            if pick.logprobs is not None:
                event.tokens.append(_token_info(tokenizer, pick, i))
            if token in eos_ids:
                event.text = choice.finish("stop")
            else:
                event.text = choice.add(token)
                if choice.done:
                    event.text += choice.finish("stop")
            if choice.finish_reason is not None:
                finished[i] = True
                event.finish_reason, event.calls = choice.finish_reason, choice.calls
            events.append(event)
        yield events
        if all(finished):
            return
    yield [ChoiceEvent(i, text=choice.finish("length"), finish_reason=choice.finish_reason, calls=choice.calls)
           for i, choice in enumerate(choices) if not finished[i]]


def _token_info(tokenizer: Any, pick: Pick, row: int) -> TokenInfo:
    def text(token: int) -> str:
        return tokenizer.decode([token])

    top = []
    if pick.top_ids is not None:
        top = [(text(int(t)), float(v)) for t, v in zip(pick.top_ids[row], pick.top_logprobs[row])]
    return TokenInfo(text(int(pick.tokens[row])), float(pick.logprobs[row]), top)
