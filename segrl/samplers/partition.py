"""Segment partition strategies for SPO-chain (arXiv 2505.23564, Sec. 4.1 / Fig. 5b).

A partition maps one sampled trajectory (its completion tokens and their sampling log-probs)
to its *boundaries*: sorted offsets ``b`` in ``[0, len)``. Boundary ``b`` is the state
``s_b = prompt + y[:b]`` lying just before token ``b``; a segment runs from one boundary to
the next (the last one to the end of the trajectory). ``b = 0`` is the prompt state.

Strategies are interchangeable callables ``partition(token_ids, logprobs) -> list[int]``:

* :class:`CutpointPartition` (SPO-chain): a *cutpoint* is a token whose sampling probability
  is below ``rho``; every ``interval``-th cutpoint (1st, (int+1)-th, ...) opens a segment.
  Tokens before the first boundary belong to no segment (advantage 0; they are all
  high-probability, hence outside the probability mask anyway).
* :class:`FixedPartition`: every ``length`` tokens, or ``num_segments`` equal chunks.
* :class:`NewlinePartition`: one segment per line (VinePPO's reasoning steps).

:func:`cap_boundaries` then limits the count to ``max_segments`` by a documented rule.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence


class Partition(Protocol):
    def __call__(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> list[int]: ...


class CutpointPartition:
    """Boundaries just before every ``interval``-th low-probability token.

    Args:
        rho: a token is a cutpoint when ``exp(logprob) < rho`` (the probability under the
            sampling policy at the sampling temperature; paper: 0.9).
        interval: cutpoints per segment (paper: 5). Boundaries are the cutpoints
            ``L[0], L[interval], L[2 * interval], ...`` of the sorted cutpoint list ``L``.

    A trajectory without cutpoints has no boundary (all its advantages are 0); one whose
    first token is a cutpoint has the prompt state (``0``) as first boundary.
    """

    def __init__(self, rho: float = 0.9, interval: int = 5):
        if not 0 < rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {rho}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.rho, self.interval = rho, interval

    def cutpoints(self, logprobs: Sequence[float]) -> list[int]:
        return [t for t, lp in enumerate(logprobs) if math.exp(lp) < self.rho]

    def __call__(self, token_ids, logprobs):
        return self.cutpoints(logprobs)[:: self.interval]


class FixedPartition:
    """Boundaries at ``0, L, 2L, ...`` (``length`` = L), or ``num_segments`` equal chunks
    (chunk ``i`` starts at ``floor(i * n / num_segments)``; the reference's naive chain
    ablation used 4 chunks). Includes the prompt state 0."""

    def __init__(self, length: int = 10, num_segments: int = 0):
        if length < 1 or num_segments < 0:
            raise ValueError("length must be >= 1 and num_segments >= 0")
        self.length, self.num_segments = length, num_segments

    def __call__(self, token_ids, logprobs):
        n = len(token_ids)
        if n == 0:
            return []
        if self.num_segments > 0:
            return sorted({(i * n) // self.num_segments for i in range(self.num_segments)})
        return list(range(0, n, self.length))


class NewlinePartition:
    """Step-based partition: boundary 0, then one just after every occurrence of
    ``delimiter`` in the completion text (VinePPO; GSM8K steps are lines). A delimiter that
    ends the completion opens no segment.

    Args:
        tokenizer: anything with ``decode(ids)``; each token's text is decoded on its own
            to locate the delimiter (a delimiter spread over tokens cuts after its last one).
    """

    def __init__(self, tokenizer, delimiter: str = "\n"):
        if not delimiter:
            raise ValueError("delimiter must not be empty")
        self.tokenizer, self.delimiter = tokenizer, delimiter

    def __call__(self, token_ids, logprobs):
        n = len(token_ids)
        if n == 0:
            return []
        pieces = [self.tokenizer.decode([int(t)]) for t in token_ids]
        ends, pos = [], 0  # character offset where each token's text ends
        for p in pieces:
            pos += len(p)
            ends.append(pos)
        text = "".join(pieces)
        out = [0]
        start = 0
        while (k := text.find(self.delimiter, start)) >= 0:
            end_char = k + len(self.delimiter)
            tok = next(i for i, e in enumerate(ends) if e >= end_char)  # token holding the delimiter's end
            if tok + 1 < n and tok + 1 > out[-1]:
                out.append(tok + 1)
            start = end_char
        return out


def cap_boundaries(bounds: Sequence[int], max_segments: int, rule: str = "even", logprobs: Sequence[float] | None = None) -> list[int]:
    """Keep at most ``max_segments`` boundaries (``0`` = no cap); the dropped ones merge
    their segment into the previous one.

    Rules:
        ``even``: indices ``floor(i * (n - 1) / (m - 1) + 1/2)`` for ``i < m`` of the ``n``
            sorted candidates: evenly spread, the first and the last always kept (``m = 1``
            keeps the first). Segments stay balanced and, for cutpoints, no low-probability
            token is left before the first boundary.
        ``first``: the first ``m`` boundaries (the last segment runs to the end).
        ``lowest_prob``: the ``m`` boundaries whose opening token ``y_b`` has the lowest
            sampling probability (ties: earlier first), returned in position order.
    """
    bounds = sorted(bounds)
    n, m = len(bounds), max_segments
    if m <= 0 or n <= m:
        return list(bounds)
    if rule == "first":
        return bounds[:m]
    if rule == "even":
        if m == 1:
            return bounds[:1]
        return [bounds[math.floor(i * (n - 1) / (m - 1) + 0.5)] for i in range(m)]
    if rule == "lowest_prob":
        if logprobs is None:
            raise ValueError("cap rule 'lowest_prob' needs the log-probs")
        keep = sorted(range(n), key=lambda i: (logprobs[bounds[i]], i))[:m]
        return [bounds[i] for i in sorted(keep)]
    raise ValueError(f"unknown cap rule {rule!r}; known: even, first, lowest_prob")


def make_partition(spo_cfg, rho: float, tokenizer=None) -> Partition:
    """The partition strategy named by ``spo_cfg.partition`` (an :class:`SPOConfig`)."""
    name = spo_cfg.partition
    if name == "cutpoint":
        return CutpointPartition(rho, spo_cfg.cutpoint_interval)
    if name == "fixed":
        return FixedPartition(spo_cfg.fixed_length, spo_cfg.fixed_num_segments)
    if name == "newline":
        if tokenizer is None:
            raise ValueError("the newline partition needs a tokenizer")
        return NewlinePartition(tokenizer, spo_cfg.newline_delimiter)
    raise ValueError(f"unknown partition {name!r}; known: cutpoint, fixed, newline")
