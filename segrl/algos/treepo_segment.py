"""TreePO segment-level advantages (``treepo.advantage_level=segment``; arXiv 2508.17445).

Two variants, selected by ``treepo.segment_values``:

* ``leaf_mean`` (this library's, :func:`~segrl.algos.treepo.treepo_segment_advantages`):
  ``V(node)`` = mean reward of the leaves below it, ``A(node) = V(node) - V(parent)``.
* ``code`` (the released ``tree_segment_reinforce_plus_plus_baseline``,
  ``compute_tree_rfpp_progress_outcome_advantage`` in the TreePO repository), three steps:

  1. every leaf reward is replaced by its size-weighted sub-group advantage over *every*
     node of its path, root and the leaf's own singleton group included (its term is 0 but
     its weight 1 counts): ``R'_i = sum_a |G_a| (R_i - mean(R over G_a)) / sum_a |G_a|``;
  2. ``V(leaf) = R'``, an internal node's ``V`` is the mean of its children's ``V`` (a
     recursive mean), and ``V(root) = 0``;
  3. the segment of node ``n`` at depth ``d`` on the path of a leaf at depth ``D`` gets
     ``V(n) - eta^(D + 1 - d) V(parent)`` with the discount ``eta`` (``segtree_adv_eta``;
     off, i.e. ``V(n) - V(parent)``, unless ``eta > 0``, as in the released script).

Worked example (q -> {A, B} -> {A1, A2, B1, B2} -> 2 leaves each, rewards A1 (+1, -1),
A2 (-1, -1), B1 (+1, +1), B2 (+1, -1); sizes along a path 8, 4, 2, 1, sum 15). Step 1: the
winning B2 leaf ``R' = (8 * 1 + 4 * 0.5 + 2 * 1 + 1 * 0) / 15 = 12/15``, its sibling
``(-8 - 6 - 2) / 15 = -16/15``, each B1 leaf ``(8 + 2 + 0 + 0) / 15 = 10/15``. Step 2:
``V(B2) = -2/15``, ``V(B1) = 10/15``, ``V(B) = 4/15``, ``V(q) = 0``. Step 3, the winning B2
leaf's segments: ``A(B) = 4/15``, ``A(B2) = -2/15 - 4/15 = -6/15``, ``A(leaf) = 12/15 + 2/15
= 14/15``; ``leaf_mean`` gives ``0.5, -0.5, 1.0`` for the same segments.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..tree import RolloutTree
from .registry import TREE_ESTIMATORS, TreeEstimate
from .treepo import treepo_segment_advantages


def _leaf_sums(tree: RolloutTree, rewards: dict[int, float]) -> tuple[dict[int, float], dict[int, int]]:
    """Sum and count of the leaf rewards below every node (bottom-up over a reversed
    pre-order: after a split a tail's index can exceed its children's)."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for i in tree.subtree(0)[::-1]:
        n = tree[i]
        if n.is_leaf and i != 0:
            sums[i], counts[i] = (float(rewards[i]), 1) if i in rewards else (0.0, 0)
        else:
            sums[i] = sum(sums[c] for c in n.children)
            counts[i] = sum(counts[c] for c in n.children)
    return sums, counts


def code_segment_values(tree: RolloutTree, rewards: dict[int, float]) -> dict[int, float]:
    """Steps 1-2 of the released code's variant: node -> ``V`` (shaped leaf rewards, recursive
    means of children above them, ``V(root) = 0``). ``rewards``: trajectory leaf -> reward."""
    sums, counts = _leaf_sums(tree, rewards)
    value: dict[int, float] = {}
    for leaf, r in rewards.items():
        path = [a for a in tree.path(leaf) if counts[a]]
        value[leaf] = sum(counts[a] * (r - sums[a] / counts[a]) for a in path) / sum(counts[a] for a in path)
    for i in tree.subtree(0)[::-1]:  # children before parents
        kids = [value[c] for c in tree[i].children if c in value]
        if i not in value and kids and i != 0:
            value[i] = sum(kids) / len(kids)
    value[0] = 0.0
    return value


def code_segment_advantages(tree: RolloutTree, rewards: dict[int, float], discount: float | None = None) -> dict[int, list[float]]:
    """The released code's segment advantages of one tree (see the module docstring).

    Args:
        tree: a sampled tree.
        rewards: reward of each trajectory leaf (node index -> reward).
        discount: ``eta``; ``None`` or ``<= 0`` = no discount (the released default -1).
    Returns:
        leaf -> ``[depth]`` advantages of the segments on its path (``tree.path(leaf)[1:]``).
    """
    value = code_segment_values(tree, rewards)
    out: dict[int, list[float]] = {}
    for leaf in rewards:
        path = tree.path(leaf)
        depth = len(path) - 1
        row = []
        for d in range(1, depth + 1):
            parent = value.get(path[d - 1], 0.0)
            if discount is not None and discount > 0:
                parent *= discount ** (depth + 1 - d)
            row.append(value.get(path[d], 0.0) - parent)
        out[leaf] = row
    return out


@TREE_ESTIMATORS.register("treepo_segment")
def treepo_segment_estimate(trees: Sequence[RolloutTree], cfg) -> TreeEstimate:
    """TreePO segment-level credit (arXiv 2508.17445) of scored trees: ``treepo.segment_values``
    picks ``leaf_mean`` or the released ``code`` variant (with ``treepo.segment_discount``).

    Returns ``per_node`` (``[len(tree)]`` per tree: each segment's own advantage), or, with a
    discount (which depends on the trajectory's depth), ``per_segment`` (``[depth]`` per
    trajectory).
    """
    tp = cfg.treepo
    per_node, per_segment = [], []
    for tree in trees:
        rewards = {l: float(tree[l].reward) for l in tree.leaves(include_mc=False)}
        if tp.segment_values == "code" and tp.segment_discount is not None:
            rows = code_segment_advantages(tree, rewards, tp.segment_discount)
            per_segment.extend(rows[l] for l in rewards)
            continue
        if tp.segment_values == "code":
            v = code_segment_values(tree, rewards)
            seg = {i: v.get(i, 0.0) - v.get(tree[i].parent, 0.0) for i in range(1, len(tree))}
        else:
            seg = treepo_segment_advantages(tree, rewards)
        per_node.append([seg.get(i, 0.0) for i in range(len(tree))])
    if tp.segment_values == "code" and tp.segment_discount is not None:
        return TreeEstimate(per_segment=per_segment)
    return TreeEstimate(per_node=per_node)
