"""SPO-tree sampling: a tree of fixed-length segments per prompt.

Paper: Guo et al., *Segment Policy Optimization*, arXiv 2505.23564, Sec. 5 (SPO-tree);
reference ``HybridInferenceStrategy._construct_tree``.

Depth ``d`` (root = the prompt, ``d = 0``) is expanded into ``branch_factors[d]`` children
of at most ``segment_length`` (M) new tokens each, with one :meth:`Engine.extend` call per
depth for the whole batch: a node's KV cache is forked ``b`` ways, so each shared prefix
is decoded (and the prompt prefilled) exactly once. The last depth runs until EOS/stop or
``max_completion_length`` when ``last_segment_unbounded`` (the paper's default).

Finish reasons: a child that ends by itself (EOS/stop) is a leaf; one that reaches
``max_completion_length`` is a truncated leaf (``length``); one that fills its M tokens at
the last depth (bounded last depth) is a truncated leaf (``depth``), graded on its whole
completion; any other child that filled its M tokens is expanded at the next depth.

The sampler only samples: the algorithm scores the leaves and computes the values
(:func:`segrl.algos.spo.spo_tree_estimate`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..engine.base import RolloutEngine, release
from ..tree import FinishReason, RolloutTree


def tree_size(branch_factors: Sequence[int]) -> tuple[int, int]:
    """``(leaves, segments)`` of a full tree: ``prod(b)`` leaves and ``sum_d prod(b[:d+1])``
    segments (6-6-6: 216 leaves, 258 segments)."""
    leaves, nodes, width = 1, 0, 1
    for b in branch_factors:
        width *= b
        nodes += width
    leaves = width
    return leaves, nodes


class SPOTreeSampler:
    """Builds SPO trees level by level (see the module docstring).

    Args:
        branch_factors: children per node at each depth (``[6, 6, 6]`` in the paper).
        segment_length: M, tokens per segment at every depth but the last.
        max_completion_length: token limit of a root-to-leaf completion.
        last_segment_unbounded: the last depth is not limited to M tokens.
    """

    def __init__(self, branch_factors: Sequence[int], segment_length: int, max_completion_length: int, last_segment_unbounded: bool = True):
        self.branch = list(branch_factors)
        self.m = segment_length
        self.max_len = max_completion_length
        self.unbounded = last_segment_unbounded

    def grow(self, engine: RolloutEngine, trees: Sequence[RolloutTree]) -> list[tuple[RolloutTree, int]]:
        """Build the trees; returns their leaves (all of them are trajectories)."""
        frontier = [(t, 0) for t in trees]
        leaves: list[tuple[RolloutTree, int]] = []
        D = len(self.branch)
        for d, b in enumerate(self.branch):
            if not frontier:
                break
            last = d == D - 1
            limits = []
            for t, n in frontier:
                room = self.max_len - t.completion_len(n)
                limits.append(room if (last and self.unbounded) else min(self.m, room))
            kids = engine.extend(frontier, limits, b)
            frontier = []
            for group in kids:
                for t, c in group:
                    node = t[c]
                    if node.finish_reason != FinishReason.SEGMENT:
                        leaves.append((t, c))
                    elif t.completion_len(c) >= self.max_len:
                        node.finish_reason = FinishReason.LENGTH
                        leaves.append((t, c))
                    elif last:
                        node.finish_reason = FinishReason.DEPTH
                        leaves.append((t, c))
                    else:
                        frontier.append((t, c))
        release(trees)
        return leaves

    def sample(self, engine: RolloutEngine, trees: Sequence[RolloutTree], progress: float | None = None) -> dict[str, float]:
        """Grow the trees (no scoring: the algorithm scores the leaves and computes the
        values); returns ``tree/*`` and ``segments/*`` metrics."""
        decoded0 = engine.stats.decode_tokens
        leaves = self.grow(engine, trees)
        segs = [n for t in trees for n in t.nodes[1:]]
        indep = sum(t.independent_equivalent_tokens() for t in trees)
        decoded = engine.stats.decode_tokens - decoded0
        return {
            "tree/leaves": len(leaves) / max(len(trees), 1),
            "tree/segments": len(segs) / max(len(trees), 1),
            "tree/decoded_tokens": float(decoded),
            "tree/independent_equivalent_tokens": float(indep),
            "tree/sharing_savings": 1.0 - decoded / max(indep, 1),
            "tree/depth_leaf_fraction_early": sum(t[l].depth < len(self.branch) for t, l in leaves) / max(len(leaves), 1),
            "segments/mean_count": len(segs) / max(len(trees), 1),
            "segments/mean_length": sum(len(n.token_ids) for n in segs) / max(len(segs), 1),
        }
