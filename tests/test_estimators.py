"""Estimator registries and the estimator defects of issue 20, against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from segrl.algos.registry import LOSS_AGGREGATIONS, OUTCOME_ESTIMATORS, TREE_ESTIMATORS, estimator_names
from segrl.algos.treepo import tree_subgroups, treepo_advantage
from segrl.algos.treepo_segment import code_segment_advantages
from segrl.configs import ConfigError, SegrlConfig, load_config
from segrl.tree import FinishReason, RolloutTree

REWARDS = {"A1": (1, -1), "A2": (-1, -1), "B1": (1, 1), "B2": (1, -1)}


def worked_tree():
    """q -> {A, B} -> {A1, A2, B1, B2} -> 2 leaves each (TreePO notes' worked example)."""
    t = RolloutTree([1, 2, 3])
    names: dict[str, list[int]] = {}
    for top in "AB":
        a = t.add(0, [5, 5, 5], [-0.1] * 3, FinishReason.SEGMENT)
        for k in "12":
            b = t.add(a, [6, 6], [-0.2] * 2, FinishReason.SEGMENT)
            names[top + k] = []
            for r in REWARDS[top + k]:
                leaf = t.add(b, [7], [-0.3], FinishReason.EOS)
                t[leaf].reward = float(r)
                names[top + k].append(leaf)
    return t, names


def chain_root_tree():
    """parents [-1, 0, 1, 2, 2, 1]: the root's only child 1 has children 2 and leaf 5; node 2
    has leaves 3 and 4. Leaf rewards 3: 1, 4: 0, 5: 0."""
    t = RolloutTree([1])
    for parent in (0, 1, 2, 2, 1):
        t.add(parent, [4], [-1.0], FinishReason.SEGMENT)
    for leaf, r in ((3, 1.0), (4, 0.0), (5, 0.0)):
        t[leaf].finish_reason, t[leaf].reward = FinishReason.EOS, r
    assert [n.parent for n in t.nodes] == [-1, 0, 1, 2, 2, 1]
    return t


def treepo_adv(trees, dedup=False, **kw) -> dict[int, float]:
    idx = tree_subgroups(trees, dedup=dedup)
    r = torch.tensor([float(t[l].reward) for t, l in idx.refs], dtype=torch.float64)
    adv = treepo_advantage(r, idx.pair_leaf, idx.pair_group, idx.is_root, **kw)
    return {l: float(a) for (_, l), a in zip(idx.refs, adv)}


# ----- defect: dedup counted the root and its only child twice ----------------------------------
def test_dedup_counts_each_distinct_leaf_set_once():
    t = chain_root_tree()
    # Sub-groups of leaf 3 (R = 1): root {3,4,5} (mean 1/3), node 1 {3,4,5} (the same set: the
    # root's only child), node 2 {3,4} (mean 1/2). Terms 1 - 1/3 = 2/3, 2/3, 1 - 1/2 = 1/2.
    # Every depth counted (the paper's per-depth sum): (2/3 + 2/3 + 1/2) / 3 = 11/18 = 0.6111.
    assert treepo_adv([t])[3] == pytest.approx(11 / 18)
    assert 11 / 18 == pytest.approx(0.6111, abs=1e-4)
    # Each distinct leaf set once ({3,4,5}, {3,4}): (2/3 + 1/2) / 2 = 7/12 = 0.5833. Before the
    # fix dedup kept both the root and node 1 here and gave 0.6111 again.
    d = treepo_adv([t], dedup=True)
    assert d[3] == pytest.approx(7 / 12) and 7 / 12 == pytest.approx(0.5833, abs=1e-4)
    # leaf 4 (R = 0): terms -1/3 and -1/2 -> -5/12; leaf 5: only {3,4,5} -> -1/3
    assert d[4] == pytest.approx(-5 / 12) and d[5] == pytest.approx(-1 / 3)
    # the one set {3,4,5} is the root's: dropping the root term drops it
    assert treepo_adv([t], dedup=True, include_root=False)[3] == pytest.approx(0.5)


# ----- defect: group_std was not Eq. 5; subgroup_std is --------------------------------------------
def test_subgroup_std_is_eq5_as_written():
    t, n = worked_tree()
    # Winning B2 leaf: terms root 1 - 0 = 1, B 1 - 0.5 = 0.5, B2 1 - 0 = 1; mean 5/6; unbiased
    # std of (1, 0.5, 1): deviations 1/6, -1/3, 1/6 -> (1/36 + 4/36 + 1/36) / 2 = 1/12.
    got = treepo_adv([t], term_std=True)
    assert got[n["B2"][0]] == pytest.approx((5 / 6) / (math.sqrt(1 / 12) + 1e-4))
    # a B1 leaf: terms 1, 0.5, 0 -> mean 0.5, std 0.5 -> 0.5 / 0.5001
    assert got[n["B1"][0]] == pytest.approx(0.5 / 0.5001)
    # one kept term (leaf 5 of the dedup tree: only the root's set) has no std: unscaled
    assert treepo_adv([chain_root_tree()], dedup=True, term_std=True)[5] == pytest.approx(-1 / 3)
    # the TreePO algorithm: normalization=subgroup_std goes through the treepo estimator
    from segrl.trainer.treepo_algorithm import TreePO

    cfg = load_config(overrides={"train.algo": "treepo", "treepo.normalization": "subgroup_std"})
    samples, _ = TreePO(cfg).samples([t])
    adv = {s.info["leaf"]: s.advantages for s in samples}
    assert adv[n["B2"][0]] == pytest.approx([(5 / 6) / (math.sqrt(1 / 12) + 1e-4)] * 6)
    with pytest.raises(ConfigError, match=r"treepo\.normalization"):  # no sub-group terms per segment
        load_config(overrides={"train.algo": "treepo", "treepo.normalization": "subgroup_std", "treepo.advantage_level": "segment"})


# ----- defect: the segment level was not the released code's ----------------------------------------
def test_code_segment_variant_by_hand():
    t, n = worked_tree()
    rew = {l: t[l].reward for l in t.leaves()}
    rows = code_segment_advantages(t, rew)
    # Step 1, size-weighted sub-group advantage over root (8), B (4), B2 (2), the leaf (1):
    # winning B2 leaf (8*1 + 4*0.5 + 2*1 + 1*0) / 15 = 12/15; its sibling (-8 - 6 - 2) / 15 =
    # -16/15; each B1 leaf (8*1 + 4*0.5 + 2*0 + 0) / 15 = 10/15.
    # Step 2, recursive means: V(B2) = -2/15, V(B1) = 10/15, V(B) = 4/15, V(root) = 0.
    # Step 3: A(B) = 4/15, A(B2) = -2/15 - 4/15 = -6/15, A(leaf) = 12/15 + 2/15 = 14/15.
    assert rows[n["B2"][0]] == pytest.approx([4 / 15, -6 / 15, 14 / 15])
    assert rows[n["B1"][1]] == pytest.approx([4 / 15, 6 / 15, 0.0])
    # with the discount eta = 0.9 on the parent value (k = leaf depth + 1 - node depth):
    # A(B2) = -2/15 - 0.9^2 * 4/15, A(leaf) = 12/15 - 0.9 * (-2/15)
    eta = code_segment_advantages(t, rew, 0.9)[n["B2"][0]]
    assert eta == pytest.approx([4 / 15, (-2 - 0.81 * 4) / 15, (12 + 0.9 * 2) / 15])
    # the library's leaf_mean variant on the same path: V(B) = 0.5, V(B2) = 0, V(leaf) = 1
    cfg = load_config(overrides={"train.algo": "treepo", "treepo.advantage_level": "segment"})
    path = t.path(n["B2"][0])[1:]
    ours = TREE_ESTIMATORS["treepo_segment"]([t], cfg).per_node[0]
    assert [ours[i] for i in path] == pytest.approx([0.5, -0.5, 1.0])
    cfg = load_config(overrides={"train.algo": "treepo", "treepo.advantage_level": "segment", "treepo.segment_values": "code"})
    code = TREE_ESTIMATORS["treepo_segment"]([t], cfg).per_node[0]  # no discount: one value per node
    assert [code[i] for i in path] == pytest.approx([4 / 15, -6 / 15, 14 / 15])
    cfg = load_config(overrides={"train.algo": "treepo", "treepo.advantage_level": "segment", "treepo.segment_values": "code",
                                 "treepo.segment_discount": "0.9"})
    rows = dict(zip(t.leaves(), TREE_ESTIMATORS["treepo_segment"]([t], cfg).per_segment))  # per trajectory
    assert rows[n["B2"][0]] == pytest.approx(eta)
    with pytest.raises(ConfigError, match=r"treepo\.segment_discount"):
        load_config(overrides={"treepo.segment_discount": "0.9"})  # leaf_mean has no discount


# ----- defect: no way to reproduce the SPO reference's GRPO baseline ----------------------------------
def test_spo_grpo_is_population_std_eps_1e8():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0], dtype=torch.float64)
    idx = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    a = OUTCOME_ESTIMATORS["spo_grpo"](r, idx)
    # group 0: mean 0.5, population std 0.5; group 1: mean 0.75, population std sqrt(0.75 * 0.25)
    s1 = math.sqrt(0.75 * 0.25)
    want = [0.5 / (0.5 + 1e-8), -0.5 / (0.5 + 1e-8)] * 2
    want = [want[0], want[1], want[1], want[0]] + [0.25 / (s1 + 1e-8)] * 3 + [-0.75 / (s1 + 1e-8)]
    assert a.tolist() == pytest.approx(want, rel=1e-12)
    # TRL's grpo: unbiased std (sqrt(1/3) for group 0), eps 1e-4
    assert OUTCOME_ESTIMATORS["grpo"](r, idx)[0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-4))
    # batch: the population std of all eight rewards (mean 0.625): sqrt(0.625 * 0.375)
    b = OUTCOME_ESTIMATORS["spo_grpo"](r, idx, scale_rewards="batch")
    assert b[0].item() == pytest.approx(0.5 / (math.sqrt(0.625 * 0.375) + 1e-8))
    assert load_config(overrides={"train.adv_estimator": "spo_grpo"}).train.adv_estimator == "spo_grpo"


# ----- registries ---------------------------------------------------------------------------------------
def test_config_choices_come_from_the_registries():
    assert set(estimator_names()) >= {"grpo", "rloo", "spo_grpo", "spo_tree", "spo_chain", "treepo", "treepo_segment"}
    assert LOSS_AGGREGATIONS.names() == ("grpo", "bnpo", "dr_grpo", "dapo")
    with pytest.raises(ConfigError, match=r"train\.adv_estimator: 'nope' is not one of"):
        load_config(overrides={"train.adv_estimator": "nope"})
    with pytest.raises(ConfigError, match=r"train\.loss_type: 'ppo' is not one of"):
        load_config(overrides={"train.loss_type": "ppo"})

    @LOSS_AGGREGATIONS.register("test_token_sum")
    def token_sum(per_token, mask, norm):
        return (per_token * mask).sum()

    try:
        assert load_config(overrides={"train.loss_type": "test_token_sum"}).train.loss_type == "test_token_sum"
    finally:
        LOSS_AGGREGATIONS.unregister("test_token_sum")
    with pytest.raises(KeyError, match="unknown tree advantage estimator 'nope'"):
        TREE_ESTIMATORS["nope"]
    with pytest.raises(ValueError, match="registered twice"):
        OUTCOME_ESTIMATORS.register("grpo")(lambda rewards, index, **kw: rewards)


def test_estimator_apart_from_the_sampler():
    """train.adv_estimator swaps the estimator and keeps the algorithm's sampler and update."""
    from segrl.trainer.algorithms import get_algorithm

    # RLOO's estimator in GRPO's algorithm = algo rloo: n/(n-1) (r - mean) on each group
    t = RolloutTree([1, 2], group=0)
    for r in (1.0, 0.0, 0.0, 1.0):
        leaf = t.add(0, [5, 6], [-0.5, -0.5], FinishReason.EOS)
        t[leaf].reward = r
    a = get_algorithm("grpo")(load_config(overrides={"train.adv_estimator": "rloo"})).samples([t])[0]
    b = get_algorithm("rloo")(load_config(overrides={"train.algo": "rloo"})).samples([t])[0]
    assert [s.advantages for s in a] == [s.advantages for s in b] == [[2 / 3] * 2, [-2 / 3] * 2, [-2 / 3] * 2, [2 / 3] * 2]
    # GRPO's estimator on TreePO's trees (TreePO algorithm, no normalisation on top): the worked
    # tree's eight rewards (+1 x 4, -1 x 4) have mean 0 and unbiased std sqrt(8/7)
    tree, n = worked_tree()
    cfg = load_config(overrides={"train.algo": "treepo", "train.adv_estimator": "grpo", "treepo.normalization": "none"})
    samples = {s.info["leaf"]: s for s in get_algorithm("treepo")(cfg).samples([tree])[0]}
    assert samples[n["B2"][0]].advantages == pytest.approx([1 / (math.sqrt(8 / 7) + 1e-4)] * 6)
    # SPO-tree's estimator (a segment-level tree estimator) on the same tree, under GRPO:
    # V(B) = 0.5, V(B2) = 0, so the winning B2 leaf's segments get 0.5, -0.5, 1
    cfg = load_config(overrides={"train.adv_estimator": "spo_tree"})
    samples = {s.info["leaf"]: s for s in get_algorithm("grpo")(cfg).samples([tree])[0]}
    assert samples[n["B2"][0]].advantages == pytest.approx([0.5] * 3 + [-0.5] * 2 + [1.0])
    assert tree[tree[n["B2"][0]].parent].info["advantage"] == pytest.approx(-0.5)  # per segment
    with pytest.raises(ConfigError, match=r"train\.adv_estimator: spo_chain"):  # needs MC values
        load_config(overrides={"train.adv_estimator": "spo_chain"})


def test_config_validation_runs_on_the_whole_config():
    cfg = SegrlConfig()
    cfg.train.algo, cfg.train.rollout = "spo_tree", "treepo"
    with pytest.raises(ConfigError, match=r"train\.rollout: spo_tree samples with its own sampler"):
        cfg.validate()
