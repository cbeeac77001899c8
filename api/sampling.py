"""Choosing each choice's next token from one step's logits: pure torch, no I/O.

Order (OpenAI's): presence/frequency penalties on the tokens a choice generated so far, then
temperature (0 is greedy: argmax), then top-p, then one draw per choice from a ``torch.Generator``
seeded by the request's ``seed``, so the same seed, prompt and parameters give the same output.
Logprobs are the model's own distribution (log-softmax of the raw logits), as vLLM reports them.
"""

from __future__ import annotations

import dataclasses
import random

import torch

from api.schemas import Sampling


@dataclasses.dataclass(frozen=True)
class Pick:
    """What one step chose for each of the ``n`` choices."""

    tokens: torch.Tensor  # [n] int64
    logprobs: torch.Tensor | None  # [n] float32: log p of each chosen token (None unless asked)
    top_ids: torch.Tensor | None  # [n, top_logprobs] int64, most likely first
    top_logprobs: torch.Tensor | None  # [n, top_logprobs] float32


def request_seed(seed: int | None) -> int:
    """The generator seed of a request: its own ``seed``, or a fresh random one."""
    return random.SystemRandom().getrandbits(63) if seed is None else seed % 2**64


class Sampler:
    """One request's sampling state: its generator and, with penalties, each choice's token counts."""

    def __init__(self, sampling: Sampling, vocab_size: int, seed: int):
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(seed)
        penalised = sampling.presence_penalty != 0.0 or sampling.frequency_penalty != 0.0
        self.counts = torch.zeros(sampling.n, vocab_size) if penalised else None  # [n, vocab]

    def pick(self, logits: torch.Tensor) -> Pick:
        """``logits``: [n, vocab] of the last position -> the next token of every choice."""
        logits = logits.float()
        s = self.sampling
        scores = logits
        if self.counts is not None:
            counts = self.counts[:, : logits.shape[-1]]
            scores = logits - counts * s.frequency_penalty - (counts > 0).float() * s.presence_penalty
        if s.temperature == 0.0:
            tokens = scores.argmax(dim=-1)
        else:
            probs = torch.softmax(scores / s.temperature, dim=-1)
            if s.top_p < 1.0:
                probs = top_p_filter(probs, s.top_p)
            tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        if self.counts is not None:
            self.counts[torch.arange(tokens.shape[0]), tokens] += 1
        if not s.logprobs:
            return Pick(tokens, None, None, None)
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        top = torch.topk(logprobs, s.top_logprobs, dim=-1) if s.top_logprobs else None
        return Pick(tokens, chosen, top.indices if top else None, top.values if top else None)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the most likely tokens whose probabilities sum to ``top_p`` (at least one), renormalised."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # tokens whose predecessors already reach top_p
    drop[..., 0] = False
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)
