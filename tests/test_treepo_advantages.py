"""TreePO tree advantages against hand-computed values (reference notes' worked example)."""

from __future__ import annotations

import pytest
import torch

from segrl.algos.advantages import masked_whiten
from segrl.algos.registry import TREE_ESTIMATORS
from segrl.algos.treepo import (
    group_std_scale,
    normalize_token_advantages,
    normalize_tree_advantages,
    segment_token_advantages,
    token_weighted_whiten,
    tree_subgroups,
    treepo_advantage,
    treepo_segment_advantages,
)
from segrl.configs import SegrlConfig, TreePOConfig
from segrl.tree import FinishReason, RolloutTree

REWARDS = {"A1": (1, -1), "A2": (-1, -1), "B1": (1, 1), "B2": (1, -1)}


def worked_tree(group: int = 0, seg_tokens=(3, 2, 1)):
    """q -> {A, B} -> {A1, A2, B1, B2} -> 2 leaves each; returns (tree, {name: [leaves]})."""
    t = RolloutTree([1, 2, 3], group=group)
    names: dict[str, list[int]] = {}
    for top in "AB":
        a = t.add(0, [5] * seg_tokens[0], [-0.1] * seg_tokens[0], FinishReason.SEGMENT)
        for k in "12":
            b = t.add(a, [6] * seg_tokens[1], [-0.2] * seg_tokens[1], FinishReason.SEGMENT)
            name = top + k
            names[name] = []
            for r in REWARDS[name]:
                leaf = t.add(b, [7] * seg_tokens[2], [-0.3] * seg_tokens[2], FinishReason.EOS)
                t[leaf].reward = float(r)
                names[name].append(leaf)
    return t, names


def raw(trees, **kw):
    idx = tree_subgroups(trees)
    r = torch.tensor([float(t[l].reward) for t, l in idx.refs], dtype=torch.float64)
    adv = treepo_advantage(r, idx.pair_leaf, idx.pair_group, idx.is_root, **kw)
    return {(id(t), l): float(a) for (t, l), a in zip(idx.refs, adv)}, idx


def test_worked_example_average_and_size():
    t, n = worked_tree()
    avg, _ = raw([t], aggregation="average")
    size, _ = raw([t], aggregation="size")
    b2_win = n["B2"][0]  # reward +1
    assert avg[(id(t), b2_win)] == pytest.approx(2.5 / 3, abs=1e-9)  # 0.833
    assert size[(id(t), b2_win)] == pytest.approx(12 / 14, abs=1e-9)  # 0.857
    for leaf in n["B1"]:
        assert avg[(id(t), leaf)] == pytest.approx(0.5, abs=1e-9)  # (1 + 0.5 + 0) / 3
    # by hand: A1 winner: root 1, A mean -0.5 -> 1.5, A1 mean 0 -> 1  => 3.5/3
    assert avg[(id(t), n["A1"][0])] == pytest.approx(3.5 / 3)
    # A2 leaf (-1): root -1, A -0.5, A2 mean -1 -> 0 => -1.5/3
    assert avg[(id(t), n["A2"][0])] == pytest.approx(-0.5)
    # B2 loser (-1): root -1, B -1.5, B2 -1 => -3.5/3 ; size: (-8 - 6 - 2)/14
    assert avg[(id(t), n["B2"][1])] == pytest.approx(-3.5 / 3)
    assert size[(id(t), n["B2"][1])] == pytest.approx(-16 / 14)


def test_drop_root_and_reject_zero_std():
    t, n = worked_tree()
    no_root, _ = raw([t], include_root=False)
    assert no_root[(id(t), n["B2"][0])] == pytest.approx(0.75)  # (0.5 + 1) / 2
    rej, _ = raw([t], reject_zero_std=True)
    # B1 (+1, +1) and A2 (-1, -1) have zero std and are dropped
    assert rej[(id(t), n["B1"][0])] == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert rej[(id(t), n["A2"][0])] == pytest.approx(-0.75)  # (-1 - 0.5) / 2
    assert rej[(id(t), n["B2"][0])] == pytest.approx(2.5 / 3)  # unchanged


def test_subgroups_come_from_parent_pointers_and_singletons_are_skipped():
    t, n = worked_tree()
    idx = tree_subgroups([t])
    assert len(idx.refs) == 8
    # 1 root + 2 depth-1 + 4 depth-2 sub-groups; each leaf belongs to 3 of them
    assert idx.is_root.tolist().count(True) == 1 and len(idx.is_root) == 7
    assert len(idx.pair_leaf) == 8 * 3
    # a chain (single-child) node below a leaf-pair's parent: same leaf set counted twice unless dedup
    u = RolloutTree([1])
    a = u.add(0, [4], [-1.0], FinishReason.SEGMENT)
    b = u.add(a, [4], [-1.0], FinishReason.SEGMENT)  # a has one child b
    leaves = [u.add(b, [4], [-1.0], FinishReason.EOS) for _ in range(2)]
    other = u.add(0, [4], [-1.0], FinishReason.EOS)
    for l, r in zip(leaves + [other], (1.0, 0.0, 0.0)):
        u[l].reward = r
    adv, _ = raw([u])
    # leaf 1: root (mean 1/3) -> 2/3, a (mean .5) -> .5, b (mean .5) -> .5 => (2/3 + 1) / 3
    assert adv[(id(u), leaves[0])] == pytest.approx((2 / 3 + 1.0) / 3)
    idx_d = tree_subgroups([u], dedup=True)
    r = torch.tensor([u[l].reward for _, l in idx_d.refs], dtype=torch.float64)
    d = treepo_advantage(r, idx_d.pair_leaf, idx_d.pair_group, idx_d.is_root)
    assert float(d[0]) == pytest.approx((2 / 3 + 0.5) / 2)
    # a lone leaf of the root still gets the root term
    assert adv[(id(u), other)] == pytest.approx(-1 / 3)


def test_two_trees_are_independent_groups():
    t1, n1 = worked_tree(group=0)
    t2, _ = worked_tree(group=1)
    for l in t2.leaves():
        t2[l].reward = 1.0  # all correct: every sub-group mean is 1
    adv, idx = raw([t1, t2])
    assert adv[(id(t1), n1["B2"][0])] == pytest.approx(2.5 / 3)
    assert all(abs(adv[(id(t2), l)]) < 1e-12 for l in t2.leaves())
    assert idx.group.tolist() == [0] * 8 + [1] * 8


def test_batch_whiten_is_token_weighted_masked_whiten():
    vals = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    lens = torch.tensor([3, 1, 5, 2])
    got = token_weighted_whiten(vals, lens)
    grid = torch.zeros(4, 5, dtype=torch.float64)
    mask = torch.zeros(4, 5)
    for i, L in enumerate(lens.tolist()):
        grid[i, :L] = vals[i]
        mask[i, :L] = 1
    ref = masked_whiten(grid, mask)
    for i, L in enumerate(lens.tolist()):
        assert torch.allclose(ref[i, :L], got[i].expand(L), atol=1e-9)
    # token-weighted: the long trajectory dominates the mean
    w = lens.double()
    assert float((got * w).sum()) == pytest.approx(0.0, abs=1e-9)


def test_group_std_scale_per_prompt():
    r = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    idx = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    out = group_std_scale(adv, r, idx)
    s0 = torch.tensor([1.0, -1.0, 1.0]).std().item()
    s1 = torch.tensor([1.0, 0.0, 1.0]).std().item()
    assert out[0].item() == pytest.approx(1 / (s0 + 1e-4))
    assert out[4].item() == pytest.approx(1 / (s1 + 1e-4))
    assert torch.equal(normalize_tree_advantages(adv, "none"), adv)
    with pytest.raises(ValueError):
        normalize_tree_advantages(adv, "bogus")


def test_segment_level_variant():
    t, n = worked_tree()
    rew = {l: t[l].reward for l in t.leaves()}
    seg = treepo_segment_advantages(t, rew)
    b2_win = n["B2"][0]
    path = t.path(b2_win)  # root, B, B2, leaf
    # V(root)=0, V(B)=0.5, V(B2)=0, V(leaf)=1
    assert [seg[i] for i in path[1:]] == pytest.approx([0.5, -0.5, 1.0])
    toks = segment_token_advantages(t, b2_win, seg)
    assert toks == pytest.approx([0.5] * 3 + [-0.5] * 2 + [1.0] * 1)
    # telescoping: the segment advantages along a path sum to R - V(root)
    for l in t.leaves():
        assert sum(seg[i] for i in t.path(l)[1:]) == pytest.approx(t[l].reward - 0.0)
    out = normalize_token_advantages([toks, [1.0, 2.0]], "batch_whiten")
    flat = torch.tensor([x for row in out for x in row], dtype=torch.float64)
    assert flat.mean().item() == pytest.approx(0.0, abs=1e-9)


def test_registered_tree_estimators_apply_the_pure_functions():
    t, n = worked_tree()
    est = TREE_ESTIMATORS["treepo"]([t], _cfg(normalization="none"))
    assert est.per_node is None and est.per_segment is None  # one value per trajectory
    assert dict(zip(t.leaves(), est.per_trajectory.tolist()))[n["B2"][0]] == pytest.approx(2.5 / 3)
    seg = TREE_ESTIMATORS["treepo_segment"]([t], _cfg()).per_node[0]  # one value per segment
    assert [seg[i] for i in t.path(n["B2"][0])[1:]] == pytest.approx([0.5, -0.5, 1.0])


def _cfg(**tp):
    cfg = SegrlConfig()
    cfg.train.algo = "treepo"
    cfg.treepo = TreePOConfig(**tp)
    return cfg


def test_algorithm_samples_every_token_gets_its_value():
    from segrl.trainer.treepo_algorithm import TreePO

    t, n = worked_tree(seg_tokens=(3, 2, 2))
    algo = TreePO(_cfg(normalization="none"))
    samples, metrics = algo.samples([t])
    by_leaf = {s.info["leaf"]: s for s in samples}
    s = by_leaf[n["B2"][0]]
    assert len(s.response) == 7 and s.advantages == pytest.approx([2.5 / 3] * 7)
    assert by_leaf[n["B1"][1]].advantages == pytest.approx([0.5] * 7)
    # size weighting, default whitening: every token of a trajectory shares one value
    algo = TreePO(_cfg(advantage_aggregation="size"))
    samples, _ = algo.samples([t])
    for s in samples:
        assert len(set(round(a, 12) for a in s.advantages)) == 1
    adv = torch.tensor([s.advantages[0] for s in samples], dtype=torch.float64)
    assert adv.mean().item() == pytest.approx(0.0, abs=1e-9)  # equal lengths: plain whitening
    # segment level: per-segment values
    algo = TreePO(_cfg(normalization="none", advantage_level="segment"))
    samples, _ = algo.samples([t])
    s = {x.info["leaf"]: x for x in samples}[n["B2"][0]]
    assert s.advantages == pytest.approx([0.5] * 3 + [-0.5] * 2 + [1.0] * 2)
