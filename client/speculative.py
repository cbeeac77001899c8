"""Speculative decoding through the swarm: ``model.generate(ids, assistant_model=draft)``.

A small local *draft* model (same tokenizer, e.g. a few layers of the same family) proposes ``k``
tokens; the swarm checks all of them in one inference step of ``k + 1`` tokens through the chain,
so one round trip over the network yields up to ``k + 1`` tokens instead of one. Transformers'
assisted generation does the checking: greedy keeps the draft's tokens up to the first one the
swarm's model would not have picked, plus the model's own next token (so the output is plain
greedy's); sampling uses speculative sampling's acceptance rule (Leviathan et al., 2023), so tokens
keep the model's distribution. After each step the session rolls its servers' caches back to the
accepted length (the next step's ``start_position``; :class:`client.model.RemoteCache` ``crop``).

What the swarm adds is the draft length. Over a WAN a verifying step costs a round trip through
the chain (tens to hundreds of ms) while a draft token costs a local forward (~1 ms), so the best
``k`` depends on both and on how often the draft is right. :class:`SwarmDraft` measures the three
(moving averages) and sets ``k`` for the next step by :func:`best_draft_length`; the session's
``speculation`` (:class:`SpeculationStats`) counts what was drafted and accepted. The draft model's
``generation_config.num_assistant_tokens`` caps ``k`` (transformers' default: 20).
"""

from __future__ import annotations

import time

import torch
from transformers.generation.candidate_generator import AssistedCandidateGenerator

FIRST_DRAFT_LENGTH = 4  # k before anything was measured
SMOOTHING = 0.3  # weight of a new measurement in the moving averages


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens one verifying step yields when each draft token is accepted with probability ``acceptance``
    (independently) until the first rejection: accepted drafts plus the model's own next token,
    ``1 + a + a^2 + ... + a^k``."""
    return float(sum(acceptance ** i for i in range(k + 1)))


def best_draft_length(acceptance: float, step_s: float, draft_token_s: float, max_k: int) -> int:
    """The ``k`` in ``1..max_k`` with the most tokens per second: :func:`expected_tokens` over the time of one
    round, ``step_s`` (a verifying step through the swarm, and any fixed cost per round) + ``k *
    draft_token_s`` (drafting). Ties go to the smaller ``k``."""
    best_k, best_rate = 1, -1.0
    for k in range(1, max(1, max_k) + 1):
        rate = expected_tokens(acceptance, k) / (step_s + k * draft_token_s)
        if rate > best_rate * (1 + 1e-9):
            best_k, best_rate = k, rate
    return best_k


class SpeculationStats:
    """What a session's speculative steps did: rounds, draft tokens proposed and accepted, and rejections
    (rounds in which the model turned a draft token down)."""

    def __init__(self) -> None:
        self.rounds = 0
        self.drafted = 0
        self.accepted = 0
        self.rejections = 0

    @property
    def acceptance(self) -> float:
        """Accepted share of the drafted tokens (0 before any): drafts after a rejected one count as lost."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def agreement(self) -> float:
        """How often the model keeps a draft token it checks, ``accepted / (accepted + rejections)``: the
        draft's agreement rate with the model, whatever the draft length."""
        checked = self.accepted + self.rejections
        return self.accepted / checked if checked else 0.0


class SwarmDraft(AssistedCandidateGenerator):
    """Transformers' draft-model candidate generator with a draft length chosen from measured costs.

    Per round it measures the verifying step's seconds (from the end of :meth:`get_candidates` to
    :meth:`update_candidate_strategy`, which transformers calls right after the step), the draft
    model's seconds per forward (hooks on the draft model, removed by :meth:`close`) and the rest of a
    draft call (transformers' ``generate`` set-up, paid once per round), and counts accepted drafts.
    The acceptance rate is ``(accepted + 1) / (accepted + rejections + 2)``, a rejection being a round
    that stopped before the end of its draft. The first round (it carries the prompt) is not timed.
    """

    def __init__(self, *args, stats: SpeculationStats | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_k = max(1, int(self.num_assistant_tokens or 1))
        self.num_assistant_tokens = min(FIRST_DRAFT_LENGTH, self.max_k)
        # drafts stop at the length chosen here, not when the draft model is unsure (transformers' default
        # threshold stops a random-weight or unfamiliar draft after one token every time)
        self.assistant_confidence_threshold = 0.0
        self.assistant_generation_config.assistant_confidence_threshold = 0.0
        self.generation_config.assistant_confidence_threshold = 0.0
        self.stats = stats or SpeculationStats()
        self.step_s: float | None = None  # a verifying step through the swarm
        self.forward_s: float | None = None  # one forward of the draft model
        self.call_s: float | None = None  # the rest of one draft call
        self._accepted = self._rejected = 0
        self._drafted_at = 0.0
        self._first = True
        self._forwards: list[float] = []
        self._started = 0.0
        self._hooks = [self.assistant_model.register_forward_pre_hook(self._forward_starts),
                       self.assistant_model.register_forward_hook(self._forward_ends)]

    def _forward_starts(self, *_) -> None:
        self._started = time.perf_counter()

    def _forward_ends(self, *_) -> None:
        self._forwards.append(time.perf_counter() - self._started)

    def close(self) -> None:
        """Removes the timing hooks from the draft model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs):
        started = time.perf_counter()
        self._forwards.clear()
        candidates, logits = super().get_candidates(input_ids, **kwargs)
        self._drafted_at = time.perf_counter()
        if self._forwards and not self._first:
            forwards = sum(self._forwards)
            self.forward_s = _smooth(self.forward_s, forwards / len(self._forwards))
            self.call_s = _smooth(self.call_s, max(0.0, self._drafted_at - started - forwards))
        return candidates, logits

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int):
        step_s = time.perf_counter() - self._drafted_at
        drafted = scores.shape[1] - 1
        matches = int(num_matches)
        self.stats.rounds += 1
        self.stats.drafted += drafted
        self.stats.accepted += matches
        self.stats.rejections += int(matches < drafted)
        self._accepted += matches
        self._rejected += int(matches < drafted)
        if self._first:
            self._first = False
        else:
            self.step_s = _smooth(self.step_s, step_s)
        if None not in (self.step_s, self.forward_s, self.call_s):
            acceptance = (self._accepted + 1) / (self._accepted + self._rejected + 2)
            self.num_assistant_tokens = best_draft_length(acceptance, self.step_s + self.call_s, self.forward_s,
                                                          self.max_k)


def _smooth(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * value
