"""Verification: is what a server computed what another server computes from the same inputs?

A client (``ClientConfig.verify_rate``) or a volunteer checker (``swarm verify``) re-runs a span's
work on a second server and compares the two outputs with :func:`disagreement`: the largest, over
the rows (tokens), of the relative error ``‖a - b‖ / ‖b‖``. Servers differ honestly by their
kernels, hardware and dtype, so the tolerance depends on what the two servers run
(:func:`tolerance`), and both numbers are measured:

- float32 against float32: a session's incremental steps against a forward pass over the same
  inputs differ by ~1.3e-6 (SmolLM2-135M, 29 blocks), 1 against 2 CPU threads by 0; TF32 matmuls
  (never enabled by Swarm) would reach ~1e-3. :data:`FLOAT32_TOLERANCE` is 5e-3, so a server whose
  outputs are off by 1e-2 is caught, with room for both;
- any half precision (bfloat16/float16) or quantized server in the pair: a bfloat16 span differs
  from a float32 one by ~1e-2 per row (median) and up to 4.4e-2 (SmolLM2-135M, spans of 1 to 29
  blocks): the size of the errors one would want to catch. :data:`HALF_TOLERANCE` is 0.15: such
  servers are checked for gross errors only (garbage, a wrong model, wrong positions);
- different quantization schemes are not compared at all (:func:`tolerance` is None).

No I/O; the records come from the caller.
"""

from __future__ import annotations

import dataclasses

import torch

from swarm.records import ServerRecord

FLOAT32_TOLERANCE = 5e-3
HALF_TOLERANCE = 0.15


def tolerance(*records: ServerRecord) -> float | None:
    """The largest honest :func:`disagreement` between servers announcing ``records``, or None if their
    quantization schemes differ (their outputs are not expected to match)."""
    if len({record.quant for record in records}) > 1:
        return None
    exact = all(record.dtype == "float32" and record.quant == "none" for record in records)
    return FLOAT32_TOLERANCE if exact else HALF_TOLERANCE


def disagreement(claimed: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest relative error of a row of ``claimed`` against ``reference`` (both [..., hidden]); infinite
    if ``claimed`` is not finite or the shapes differ."""
    if claimed.shape != reference.shape:
        return float("inf")
    if claimed.numel() == 0:
        return 0.0
    claimed, reference = claimed.float(), reference.float()
    error = (claimed - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-12)
    worst = float(error.max())
    return worst if worst == worst else float("inf")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a check found: the largest disagreement, the tolerance it was held to, and whom to blame."""

    error: float
    tolerance: float
    wrong: tuple[str, ...] = ()  # peer ids whose outputs are wrong
    inconclusive: bool = False  # three different answers: nobody can be blamed

    @property
    def agrees(self) -> bool:
        return not self.wrong and not self.inconclusive


def judge(claimed: torch.Tensor, first: torch.Tensor, tol: float, checked: str, checkers: tuple[str, ...],
          second: torch.Tensor | None = None, second_tol: float | None = None) -> Verdict:
    """Who is wrong, given the checked server's ``claimed`` output, a first (finite) recomputation by
    ``checkers`` and, if they disagreed, a second one by others. Non-finite outputs (or outputs of the wrong
    shape) are wrong whatever others say. Otherwise two servers that disagree need a third to decide: if the
    second recomputation sides with exactly one of them (within ``second_tol``), the other is wrong. With no
    second opinion, or one that agrees with both (too coarse, e.g. a bfloat16 server judging a 1e-2 error)
    or with neither, nobody is blamed: either side may be the liar, and an honest server must not be banned
    on a hostile checker's word."""
    error = disagreement(claimed, first)
    if error <= tol:
        return Verdict(error, tol)
    if error == float("inf"):
        return Verdict(error, tol, (checked,))
    if second is None or second_tol is None:
        return Verdict(error, tol, inconclusive=True)
    sides_with_claimed = disagreement(claimed, second) <= second_tol
    sides_with_first = disagreement(first, second) <= max(tol, second_tol)
    if sides_with_claimed and not sides_with_first:
        return Verdict(error, tol, checkers)
    if sides_with_first and not sides_with_claimed:
        return Verdict(error, tol, (checked,))
    return Verdict(error, tol, inconclusive=True)
