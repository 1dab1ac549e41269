"""TreePO tree advantages (Li et al., arXiv 2508.17445, Sec. 3.3, Eq. 3-7).

Sub-groups come from the trees' parent pointers: the sub-group ``G_j`` of a leaf at depth ``j``
of its path is the set of leaves below its ancestor at depth ``j`` (``G_0`` = the whole prompt
group, the root). For every leaf ``i``::

    A_ij = R_i - mean(R over G_j)                         for each ancestor j (root included)
    A_i  = mean_j A_ij                       ("average", Eq. 5; script; best in the ablation)
         = sum_j |G_j| A_ij / sum_j |G_j|    ("size", Eq. 6; the code's default)

Sub-groups with one leaf are skipped (their term is 0); the root is always kept unless
``include_root=False``; ``reject_zero_std=True`` also drops sub-groups whose rewards have zero
std (Eq. 7). Then a normalisation (``treepo.normalization``):

* ``batch_whiten`` (the released code, REINFORCE++-baseline): the scalar is broadcast to every
  response token and whitened over the whole batch, so the mean and std are token-weighted
  (:func:`normalize_tree_advantages`);
* ``subgroup_std`` (Eq. 5 as written): ``A_i / std_j(A_ij)``, the unbiased std of the leaf's
  own kept sub-group advantages (``term_std=True`` of :func:`treepo_advantage`);
* ``group_std``: divided by the std of the prompt group's rewards (a GRPO-style scale; not
  the paper's);
* ``none``.

Worked example (one prompt, q -> {A, B} -> {A1, A2, B1, B2} -> 2 leaves each, rewards
A1 (+1, -1), A2 (-1, -1), B1 (+1, +1), B2 (+1, -1)): the winning B2 leaf gets
(1 + 0.5 + 1) / 3 = 0.833 averaged and (8 + 2 + 2) / 14 = 0.857 size-weighted; a B1 leaf
(1 + 0.5 + 0) / 3 = 0.5 (before normalisation).

Segment-level variants: :mod:`segrl.algos.treepo_segment`. The tree estimator ``treepo``
(:data:`~segrl.algos.registry.TREE_ESTIMATORS`) applies :func:`treepo_advantage` to one tree
with the ``treepo.*`` settings.

All functions are pure (no tree is modified).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..tree import RolloutTree
from .advantages import MeanStd, weighted_mean_std
from .registry import TREE_ESTIMATORS, TreeEstimate


@dataclass
class SubgroupIndex:
    """Leaf-to-sub-group incidence of a batch of trees, as sparse pairs.

    Attributes:
        refs: ``N`` leaves ``(tree, leaf)`` in batch order.
        pair_leaf: ``[P]`` leaf position (into ``refs``) of each (leaf, sub-group) pair.
        pair_group: ``[P]`` sub-group id of each pair.
        is_root: ``[S]`` True for sub-groups that are a whole prompt group.
        group: ``[N]`` prompt (tree) group id of each leaf.
        lengths: ``[N]`` completion length of each leaf (tokens).
    """

    refs: list[tuple[RolloutTree, int]]
    pair_leaf: torch.Tensor
    pair_group: torch.Tensor
    is_root: torch.Tensor
    group: torch.Tensor
    lengths: torch.Tensor


def tree_subgroups(trees: Sequence[RolloutTree], dedup: bool = False) -> SubgroupIndex:
    """Every internal node (root included) of every tree is a sub-group: its leaves.

    With ``dedup=True`` every distinct leaf set is counted once: a node that is its parent's
    only child (same leaf set as the parent) is skipped, so a chain of single-child nodes
    counts once, as its top node (the root, when the chain starts there). Without it the
    same sub-group counts at every depth of such a chain, as the paper's per-depth sum does.
    """
    refs: list[tuple[RolloutTree, int]] = []
    pl: list[int] = []
    pg: list[int] = []
    roots: list[bool] = []
    for t in trees:
        leaves = t.leaves(include_mc=False)
        base = len(refs)
        pos = {l: base + i for i, l in enumerate(leaves)}
        refs.extend((t, l) for l in leaves)
        gid: dict[int, int] = {}
        for l in leaves:
            for a in t.ancestors(l):
                if dedup and a != 0 and len(t[t[a].parent].children) == 1:
                    continue
                if a not in gid:
                    gid[a] = len(roots)
                    roots.append(a == 0)
                pl.append(pos[l])
                pg.append(gid[a])
    return SubgroupIndex(
        refs=refs,
        pair_leaf=torch.tensor(pl, dtype=torch.long),
        pair_group=torch.tensor(pg, dtype=torch.long),
        is_root=torch.tensor(roots, dtype=torch.bool),
        group=torch.tensor([t.group for t, _ in refs], dtype=torch.long),
        lengths=torch.tensor([t.completion_len(l) for t, l in refs], dtype=torch.long),
    )


def treepo_advantage(
    rewards: torch.Tensor,
    pair_leaf: torch.Tensor,
    pair_group: torch.Tensor,
    is_root: torch.Tensor,
    aggregation: str = "average",
    reject_zero_std: bool = False,
    include_root: bool = True,
    term_std: bool = False,
    eps: float = 1e-4,
) -> torch.Tensor:
    """TreePO sub-group advantage (Eq. 5 / 6 / 7), before any batch normalisation.

    Args:
        rewards: ``[N]`` one reward per leaf.
        pair_leaf, pair_group: ``[P]`` (leaf, sub-group) incidence pairs (leaf in sub-group).
        is_root: ``[S]`` which sub-groups are whole prompt groups.
        aggregation: ``average`` (plain mean over the kept sub-groups) or ``size`` (weighted
            by sub-group size).
        reject_zero_std: drop sub-groups whose rewards have zero std (Eq. 7).
        include_root: keep the root term (the ablation drops it).
        term_std: divide by ``std_j(A_ij) + eps``, the unbiased std of the leaf's kept terms
            (Eq. 5's denominator as written); a leaf with fewer than two kept terms, whose
            std is undefined, is left unscaled.
    Returns:
        ``[N]`` advantages (0 for a leaf with no kept sub-group).
    """
    if aggregation not in ("average", "size"):
        raise ValueError(f"aggregation must be 'average' or 'size', got {aggregation!r}")
    x = rewards.to(torch.float64)
    N, S = x.shape[0], is_root.shape[0]
    if pair_leaf.numel() == 0:
        return torch.zeros_like(x)
    r = x[pair_leaf]
    size = torch.zeros(S, dtype=torch.float64).index_add_(0, pair_group, torch.ones_like(r))
    mean = torch.zeros(S, dtype=torch.float64).index_add_(0, pair_group, r) / size.clamp(min=1)
    a = r - mean[pair_group]
    sq = torch.zeros(S, dtype=torch.float64).index_add_(0, pair_group, a * a)
    keep = (size > 1) | is_root
    if reject_zero_std:
        keep &= sq > 1e-12
    if not include_root:
        keep &= ~is_root
    k = keep[pair_group].to(torch.float64)
    w = k * (size[pair_group] if aggregation == "size" else 1.0)
    num = torch.zeros(N, dtype=torch.float64).index_add_(0, pair_leaf, w * a)
    den = torch.zeros(N, dtype=torch.float64).index_add_(0, pair_leaf, w)
    out = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))
    if term_std:
        out = out / _term_std(a, k, pair_leaf, N, eps)
    return out.to(rewards.dtype)


def _term_std(a: torch.Tensor, keep: torch.Tensor, pair_leaf: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """Per leaf: ``std + eps`` of its kept terms ``a`` (unbiased), or 1 with fewer than two."""
    cnt = torch.zeros(n, dtype=torch.float64).index_add_(0, pair_leaf, keep)
    mean = torch.zeros(n, dtype=torch.float64).index_add_(0, pair_leaf, keep * a) / cnt.clamp(min=1)
    sq = torch.zeros(n, dtype=torch.float64).index_add_(0, pair_leaf, keep * (a - mean[pair_leaf]) ** 2)
    return torch.where(cnt > 1, (sq / (cnt - 1).clamp(min=1)).sqrt() + eps, torch.ones_like(cnt))


@TREE_ESTIMATORS.register("treepo")
def treepo_estimate(trees: Sequence[RolloutTree], cfg) -> TreeEstimate:
    """TreePO's tree advantage of each trajectory (paper Eq. 5-7; see the module docstring),
    with the ``treepo.*`` settings of ``cfg``: ``advantage_aggregation``,
    ``reject_zero_std_subgroups``, ``include_root``, ``dedup_subgroups``, and
    ``normalization=subgroup_std`` (the only per-leaf normalisation; the batch-wide ones are
    the algorithm's).

    Returns ``per_trajectory``: ``[N]``, every token of a trajectory gets its leaf's value.
    """
    tp = cfg.treepo
    idx = tree_subgroups(trees, dedup=tp.dedup_subgroups)
    rewards = torch.tensor([float(t[l].reward) for t, l in idx.refs], dtype=torch.float64)
    adv = treepo_advantage(
        rewards, idx.pair_leaf, idx.pair_group, idx.is_root,
        aggregation=tp.advantage_aggregation,
        reject_zero_std=tp.reject_zero_std_subgroups,
        include_root=tp.include_root,
        term_std=tp.normalization == "subgroup_std",
    )
    return TreeEstimate(per_trajectory=adv)


def token_weighted_whiten(values: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-8, stats: MeanStd | None = None) -> torch.Tensor:
    """Whiten per-trajectory scalars as if broadcast to their tokens (``masked_whiten`` over
    the batch's ``[N, T]`` token grid, unbiased variance): mean and std are token-weighted.
    ``stats`` as in :func:`~segrl.algos.advantages.masked_whiten` (all ranks under torchrun).

    Shapes: ``values [N]``, ``lengths [N]`` -> ``[N]``.
    """
    n, mean, std = (stats or weighted_mean_std)(values, lengths)
    if n < 2:
        return values
    return ((values.to(torch.float64) - mean) / (std**2 + eps) ** 0.5).to(values.dtype)


def group_std_scale(values: torch.Tensor, rewards: torch.Tensor, index: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Divide by the unbiased std of each prompt group's rewards (+ ``eps``), no mean shift
    (the paper's Eq. 5 normalisation). Shapes: ``[N]``, ``[N]``, ``[N]`` -> ``[N]``."""
    _, inv, counts = torch.unique(index, return_inverse=True, return_counts=True)
    r = rewards.to(torch.float64)
    n = counts.to(torch.float64)
    mean = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inv, r) / n
    sq = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inv, (r - mean[inv]) ** 2)
    std = torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(n))
    return (values.to(torch.float64) / (std[inv] + eps)).to(values.dtype)


def normalize_tree_advantages(
    adv: torch.Tensor,
    mode: str,
    lengths: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    stats: MeanStd | None = None,
) -> torch.Tensor:
    """``batch_whiten`` (code) | ``group_std`` | ``none`` (``subgroup_std``: already applied
    per leaf by the estimator); see module docstring. ``stats``: batch statistics (all ranks
    under torchrun), see :func:`token_weighted_whiten`. Shapes: ``[N]`` each -> ``[N]``."""
    if mode in ("none", "subgroup_std"):
        return adv
    if mode == "batch_whiten":
        return token_weighted_whiten(adv, lengths if lengths is not None else torch.ones_like(adv), stats=stats)
    if mode == "group_std":
        return group_std_scale(adv, rewards, index)
    raise ValueError(f"normalization must be batch_whiten, subgroup_std, group_std or none, got {mode!r}")


def treepo_segment_advantages(tree: RolloutTree, rewards: dict[int, float]) -> dict[int, float]:
    """Segment-level TreePO credit (``treepo.segment_values=leaf_mean``):
    ``A(node) = V(node) - V(parent)`` for every non-root node, with ``V(node)`` = mean reward
    of the leaves below it (``V(leaf)`` = its reward). The released code's variant differs:
    :func:`segrl.algos.treepo_segment.code_segment_advantages`.

    Along a root-to-leaf path the segment advantages sum to ``R_leaf - V(root)``.

    Args:
        tree: a sampled tree.
        rewards: reward of each leaf (node index -> reward).
    Returns:
        node index -> advantage of that segment (every token of the segment gets it).
    """
    value: dict[int, float] = {}
    # Bottom-up over a reversed pre-order (not by index: after RolloutTree.split a tail has a
    # larger index than its own children).
    order = tree.subtree(0)[::-1]
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for i in order:
        n = tree[i]
        if n.is_leaf and i != 0:
            if i not in rewards:
                continue
            sums[i], counts[i] = float(rewards[i]), 1
        else:
            sums[i] = sum(sums.get(c, 0.0) for c in n.children)
            counts[i] = sum(counts.get(c, 0) for c in n.children)
        if counts.get(i):
            value[i] = sums[i] / counts[i]
    return {i: value[i] - value[tree[i].parent] for i in value if i != 0 and tree[i].parent in value}


def segment_token_advantages(tree: RolloutTree, leaf: int, seg_adv: dict[int, float]) -> list[float]:
    """Per-token advantages of the path to ``leaf`` from segment advantages."""
    out: list[float] = []
    for node, a, b in tree.segment_spans(leaf):
        out.extend([float(seg_adv.get(node, 0.0))] * (b - a))
    return out


def normalize_token_advantages(
    per_leaf: list[list[float]],
    mode: str,
    rewards: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    eps: float = 1e-8,
    stats: MeanStd | None = None,
) -> list[list[float]]:
    """Normalise per-token advantage lists (segment-level variant).

    ``batch_whiten``: whiten over every token of every trajectory in the batch (unbiased;
    ``stats`` as in :func:`token_weighted_whiten`); ``group_std``: divide by the std of each
    prompt group's rewards; ``none``.
    """
    if mode == "none" or (not per_leaf and mode != "batch_whiten"):
        return per_leaf
    if mode == "batch_whiten":  # even with no rows here: other ranks wait for this one's sums
        flat = torch.tensor([x for row in per_leaf for x in row], dtype=torch.float64)
        n, mean, std = (stats or weighted_mean_std)(flat, torch.ones_like(flat))
        if n < 2:
            return per_leaf
        scale = (std**2 + eps) ** 0.5
        return [[(x - mean) / scale for x in row] for row in per_leaf]
    if mode == "group_std":
        ones = torch.ones(len(per_leaf), dtype=torch.float64)
        s = group_std_scale(ones, rewards, index).tolist()
        return [[x * f for x in row] for row, f in zip(per_leaf, s)]
    raise ValueError(f"normalization must be batch_whiten, group_std or none, got {mode!r}")
