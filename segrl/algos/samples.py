"""Training samples: what the loss sees, built from rollout trees and advantages.

A :class:`TrainSample` is one sequence ``context + response`` where only ``response`` tokens
are trained, each with its own advantage. GRPO/TreePO trajectories are root-to-leaf paths
(context = prompt); SPO-tree edges are single segments (context = prompt + ancestors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..tree import FinishReason, RolloutTree


class SampleInfo:
    """The keys of :attr:`TrainSample.info`, declared once."""

    LEAF = "leaf"  # a trajectory sample: the leaf its path ends at
    NODE = "node"  # a segment sample (SPO-tree): the node it trains
    QID = "qid"  # the prompt it belongs to (SPO's per-prompt whitening and replay buffer)


@dataclass
class TrainSample:
    """One trained sequence.

    Attributes:
        context: token ids the response is conditioned on (not trained).
        response: token ids that are trained.
        old_logprobs: sampling log-probs of ``response`` (the PPO "old" policy).
        advantages: one advantage per response token.
        mask: 1 for tokens in the loss, 0 for tokens left out (probability mask, truncation).
        group: prompt index (for metrics).
        info: annotations keyed by :class:`SampleInfo`.
    """

    context: list[int]
    response: list[int]
    old_logprobs: list[float]
    advantages: list[float]
    mask: list[int]
    group: int = 0
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.response)
        if not (len(self.old_logprobs) == len(self.advantages) == len(self.mask) == n):
            raise ValueError(
                f"sample arrays disagree: response {n}, old_logprobs {len(self.old_logprobs)}, "
                f"advantages {len(self.advantages)}, mask {len(self.mask)}"
            )


def prob_mask(logprobs: list[float], rho: float) -> list[int]:
    """SPO's probability mask: 1 where the sampling probability is below ``rho``."""
    return [1 if math.exp(lp) < rho else 0 for lp in logprobs]


def trajectory_sample(
    tree: RolloutTree,
    leaf: int,
    advantage: float | list[float],
    mask_truncated: bool = False,
    rho: float | None = None,
) -> TrainSample:
    """A root-to-leaf trajectory as one sample (context = prompt).

    Args:
        advantage: one value for every token, or one per completion token.
        mask_truncated: give a truncated trajectory (length/depth/repetition) an all-zero mask.
        rho: if set, apply the probability mask with this threshold.
    """
    resp = tree.path_token_ids(leaf, include_prompt=False)
    lps = tree.path_logprobs(leaf)
    adv = [float(advantage)] * len(resp) if isinstance(advantage, (int, float)) else list(advantage)
    mask = prob_mask(lps, rho) if rho is not None else [1] * len(resp)
    if mask_truncated and tree[leaf].finish_reason in FinishReason.TRUNCATED:
        mask = [0] * len(resp)
    return TrainSample(tree.prompt_ids(), resp, lps, adv, mask, group=tree.group, info={SampleInfo.LEAF: leaf})
