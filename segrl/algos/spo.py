"""SPO advantage estimators (Segment Policy Optimization, Guo et al., arXiv 2505.23564).

Pure functions on plain arrays, and the tree estimators ``spo_chain`` and ``spo_tree``
(:data:`~segrl.algos.registry.TREE_ESTIMATORS`) that apply them to a scored
:class:`~segrl.tree.RolloutTree`. No critic: values are Monte-Carlo means of rewards.

SPO-chain (paper Sec. 4.2, Fig. "advantage estimation (a)"): a trajectory ``y`` with reward
``R`` is cut at boundaries ``b_1 < ... < b_J``; ``V(s_{b_j})`` is the mean reward of ``K``
continuations sampled from the state before token ``b_j``. With ``V_{J+1} := R``::

    A_j = V_{j+1} - V_j        for the tokens [b_j, b_{j+1})   (b_{J+1} = len(y))

and tokens before ``b_1`` get 0.

SPO-tree (paper Sec. 5, Fig. "advantage estimation (b)"): a leaf's value is its reward, an
internal node's value the mean of its *children's* values (a recursive mean: in an unbalanced
tree, where some children finish early, it differs from the mean over the leaves below), and
the segment of an edge ``parent -> child`` gets::

    A = V(child) - V(parent)      [optionally / (std of the siblings' values + eps)]

Worked example of the paper's figure: children values ``1, 2/3, 0`` give
``V(parent) = (1 + 2/3 + 0) / 3 = 5/9`` and the first child ``A = 1 - 5/9 = 4/9``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..tree import NodeInfo, RolloutTree
from .registry import TREE_ESTIMATORS, TreeEstimate


def tree_values(parent: Sequence[int] | torch.Tensor, leaf_values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Recursive-mean node values of one tree.

    Args:
        parent: ``[N]`` parent index of every node, ``-1`` for the root (any node order).
        leaf_values: ``[N]`` the value of every leaf (its reward); entries of internal nodes
            are ignored (NaN is fine).
    Returns:
        ``[N]`` float64 values: leaves keep theirs, an internal node gets the mean of its
        children's values.
    Raises:
        ValueError if a leaf has a NaN value or ``parent`` is not a tree.
    """
    par = [int(p) for p in (parent.tolist() if isinstance(parent, torch.Tensor) else parent)]
    lv = torch.as_tensor(leaf_values, dtype=torch.float64)
    n = len(par)
    if lv.shape != (n,):
        raise ValueError(f"{n} parents but leaf_values of shape {tuple(lv.shape)}")
    children: list[list[int]] = [[] for _ in range(n)]
    for i, p in enumerate(par):
        if p >= 0:
            children[p].append(i)
    depth = _depths(par)
    vals = lv.clone()
    for i in sorted(range(n), key=lambda i: -depth[i]):  # children before parents
        if children[i]:
            vals[i] = torch.stack([vals[c] for c in children[i]]).mean()
        elif torch.isnan(vals[i]):
            raise ValueError(f"leaf {i} has no value")
    return vals


def _depths(par: list[int]) -> list[int]:
    n = len(par)
    depth = [-1] * n
    for i in range(n):
        chain, j = [], i
        while j >= 0 and depth[j] < 0:
            chain.append(j)
            j = par[j]
            if len(chain) > n:
                raise ValueError("parent pointers contain a cycle")
        d = -1 if j < 0 else depth[j]
        for k in reversed(chain):
            d += 1
            depth[k] = d
    return depth


def tree_edge_advantages(
    parent: Sequence[int] | torch.Tensor,
    values: torch.Tensor,
    normalize_by_sibling_std: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``A(child) = V(child) - V(parent)`` for every non-root node (0 for roots).

    With ``normalize_by_sibling_std`` the difference is divided by ``std + eps`` where ``std``
    is the population standard deviation of the values of the parent's children (the
    reference code's ``adv_method='grpo'``; its default ``'rloo'`` is the plain difference).

    Shapes: ``parent [N]``, ``values [N]`` -> ``[N]``.
    """
    par = [int(p) for p in (parent.tolist() if isinstance(parent, torch.Tensor) else parent)]
    values = torch.as_tensor(values, dtype=torch.float64)
    adv = torch.zeros(len(par), dtype=torch.float64)
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(par):
        if p >= 0:
            kids.setdefault(p, []).append(i)
    for p, cs in kids.items():
        cv = values[cs]
        d = cv - values[p]
        if normalize_by_sibling_std:
            d = d / (cv.std(unbiased=False) + eps)
        adv[cs] = d
    return adv


def spo_tree_advantage(
    parent: Sequence[int] | torch.Tensor,
    leaf_rewards: Sequence[float] | torch.Tensor,
    normalize_by_sibling_std: bool = False,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPO-tree values and edge advantages of one tree (see the module docstring).

    Args:
        parent: ``[N]`` parent indices (``-1`` for the root).
        leaf_rewards: ``[N]`` rewards of the leaves (internal entries ignored).
    Returns:
        ``(values [N], advantages [N])``; the advantage of node ``i`` belongs to the segment
        of tokens held by node ``i`` (the root's is 0).
    """
    v = tree_values(parent, leaf_rewards)
    return v, tree_edge_advantages(parent, v, normalize_by_sibling_std, eps)


def spo_chain_advantage(boundary_values: Sequence[float] | torch.Tensor, reward: float) -> torch.Tensor:
    """Segment advantages of one SPO-chain trajectory.

    Args:
        boundary_values: ``[J]`` MC values ``V(s_{b_1}), ..., V(s_{b_J})`` of its boundaries.
        reward: the trajectory's own reward ``R`` (the value after its last segment).
    Returns:
        ``[J]`` ``A_j = V_{j+1} - V_j`` with ``V_{J+1} = R``.
    """
    v = torch.as_tensor(boundary_values, dtype=torch.float64).reshape(-1)
    nxt = torch.cat([v[1:], torch.tensor([float(reward)], dtype=torch.float64)])
    return nxt - v


def chain_token_advantages(
    boundaries: Sequence[int],
    boundary_values: Sequence[float] | torch.Tensor,
    reward: float,
    length: int,
) -> torch.Tensor:
    """Per-token advantages ``[length]`` of an SPO-chain trajectory: every token of segment
    ``[b_j, b_{j+1})`` carries ``A_j`` (:func:`spo_chain_advantage`); tokens before ``b_1``
    carry 0, and so do all tokens of a trajectory without boundaries.

    Args:
        boundaries: ``[J]`` sorted offsets in ``[0, length)`` (``0`` = the prompt state).
        boundary_values: ``[J]`` their values.
        reward: the trajectory's reward.
        length: number of completion tokens.
    """
    b = [int(x) for x in boundaries]
    if len(b) != len(torch.as_tensor(boundary_values).reshape(-1)):
        raise ValueError(f"{len(b)} boundaries but {len(boundary_values)} values")
    if any(x < 0 or x >= length for x in b) or b != sorted(set(b)):
        raise ValueError(f"boundaries {b} must be distinct, sorted and in [0, {length})")
    out = torch.zeros(length, dtype=torch.float64)
    if not b:
        return out
    seg = spo_chain_advantage(boundary_values, reward)
    ends = b[1:] + [length]
    for start, end, a in zip(b, ends, seg.tolist()):
        out[start:end] = a
    return out


@TREE_ESTIMATORS.register("spo_tree")
def spo_tree_estimate(trees: Sequence[RolloutTree], cfg) -> TreeEstimate:
    """SPO-tree credit of scored trees (Guo et al., arXiv 2505.23564, Sec. 5): recursive-mean
    values and edge advantages (:func:`spo_tree_advantage`; ``spo.normalize_by_sibling_std``
    of ``cfg``).

    Returns ``per_node`` (``[len(tree)]`` per tree: ``V(node) - V(parent)``, 0 for the root)
    and ``values`` (the recursive means).
    """
    per_node, values = [], []
    for tree in trees:
        parent = [n.parent for n in tree.nodes]
        rewards = [float("nan") if n.reward is None else float(n.reward) for n in tree.nodes]
        v, adv = spo_tree_advantage(parent, rewards, cfg.spo.normalize_by_sibling_std)
        per_node.append(adv.tolist())
        values.append(v.tolist())
    return TreeEstimate(per_node=per_node, values=values)


def mc_value(tree: RolloutTree, node: int) -> float:
    """Mean reward of the Monte-Carlo continuations (``NodeInfo.MC`` children) of ``node``."""
    rs = [tree[c].reward for c in tree[node].children if tree[c].info.get(NodeInfo.MC)]
    if not rs or any(r is None for r in rs):
        raise ValueError(f"boundary node {node} has no scored MC continuations")
    return float(sum(rs)) / len(rs)


@TREE_ESTIMATORS.register("spo_chain")
def spo_chain_estimate(trees: Sequence[RolloutTree], cfg) -> TreeEstimate:
    """SPO-chain credit (arXiv 2505.23564, Sec. 4.2) of scored chain trees: the SPO-chain
    sampler's output, each trajectory leaf carrying ``NodeInfo.SPO_BOUNDS`` and
    ``NodeInfo.SPO_NODES`` (the representative boundary nodes whose MC continuations give
    ``V(s_b)``).

    The segment ``[b_j, b_{j+1})`` (one chain node) gets :func:`spo_chain_advantage`'s
    ``A_j``; the node before the first boundary, the root and the MC continuations get 0.
    ``cfg`` is not read.

    Returns ``per_node`` (``[len(tree)]`` per tree) and ``values``: ``V(s_b)`` on every
    boundary node (representatives and their duplicates, ``NodeInfo.MC_FROM``), the reward
    on trajectory leaves, NaN elsewhere.
    """
    per_node, values = [], []
    for tree in trees:
        adv, vals = _chain_tree(tree)
        per_node.append(adv)
        values.append(vals)
    return TreeEstimate(per_node=per_node, values=values)


def _chain_tree(tree: RolloutTree) -> tuple[list[float], list[float]]:
    adv = [0.0] * len(tree)
    values = [math.nan] * len(tree)
    for leaf in tree.leaves(include_mc=False):
        info = tree[leaf].info
        bounds = info.get(NodeInfo.SPO_BOUNDS)
        if bounds is None:
            raise ValueError(f"trajectory leaf {leaf} has no {NodeInfo.SPO_BOUNDS!r}: not an SPO-chain rollout")
        vals = []
        for rep in info[NodeInfo.SPO_NODES]:
            if math.isnan(values[rep]):
                values[rep] = mc_value(tree, rep)
            vals.append(values[rep])
        values[leaf] = float(tree[leaf].reward)
        if bounds:
            seg = spo_chain_advantage(vals, values[leaf]).tolist()
            for node, start, _ in tree.segment_spans(leaf):
                if start in bounds:
                    adv[node] = seg[bounds.index(start)]
    for i, n in enumerate(tree.nodes):  # duplicates of a shared boundary state
        if NodeInfo.MC_FROM in n.info:
            values[i] = values[n.info[NodeInfo.MC_FROM]]
    return adv, values
