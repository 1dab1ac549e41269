"""Independent sampling: ``n`` completions per prompt (a GRPO group is a depth-1 tree).

The prompt is prefilled once and its KV cache forked ``n`` ways by the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..engine.base import RolloutEngine, release
from ..tree import FinishReason, RolloutTree


def sample_groups(engine: RolloutEngine, trees: Sequence[RolloutTree], n: int, max_new_tokens: int) -> None:
    """Grow ``n`` leaves of up to ``max_new_tokens`` tokens under each root, in one engine call.

    Leaves that hit the token limit are marked ``length`` (truncated).
    """
    engine.extend([(t, 0) for t in trees], max_new_tokens, n)
    for t in trees:
        for leaf in t.leaves():
            if t[leaf].finish_reason == FinishReason.SEGMENT:
                t[leaf].finish_reason = FinishReason.LENGTH
    release(trees)


class GroupSampler:
    """``n`` independent completions per prompt (the GRPO group), as a sampler object.

    Args:
        num_generations: completions per prompt.
        max_completion_length: token limit of a completion.
    """

    def __init__(self, num_generations: int, max_completion_length: int):
        self.n, self.max_len = num_generations, max_completion_length

    def sample(self, engine: RolloutEngine, trees: Sequence[RolloutTree], progress: float | None = None) -> dict[str, float]:
        """Grow the groups (no scoring); no sampler metrics."""
        sample_groups(engine, trees, self.n, self.max_len)
        return {}

    def __call__(self, engine: RolloutEngine, trees: Sequence[RolloutTree]) -> None:
        self.sample(engine, trees)
