"""SPO values and advantages on hand-built trees and chains, against hand-worked numbers."""

import math

import pytest
import torch

from segrl.algos.samples import TrainSample, prob_mask
from segrl.algos.spo import chain_token_advantages, spo_chain_advantage, spo_tree_advantage, tree_edge_advantages, tree_values
from segrl.configs import load_config
from segrl.samplers.partition import FixedPartition
from segrl.samplers.spo_chain import SPOChainSampler
from segrl.samplers.spo_tree import tree_size
from segrl.trainer.algorithms import get_algorithm
from segrl.trainer.spo_algorithms import ReplayBuffer, whiten_samples
from segrl.tree import FinishReason, RolloutTree

EOS, SEG = FinishReason.EOS, FinishReason.SEGMENT
NAN = float("nan")


def leaf(t, parent, tokens, reward, probs=None):
    probs = probs or [0.5] * len(tokens)
    i = t.add(parent, tokens, [math.log(p) for p in probs], EOS)
    t[i].reward = reward
    return i


def paper_figure_tree():
    """The paper's Fig. (advantage estimation, tree): parent Pa with three children valued
    1, 2/3 and 0 (the middle child has leaves 1, 1, 0; the last leaves 0, 0, 0)."""
    t = RolloutTree([1, 2, 3])
    pa = t.add(0, [10, 11], [math.log(0.5)] * 2, SEG)
    n = leaf(t, pa, [12, 13], 1.0)
    m = t.add(pa, [14], [math.log(0.5)], SEG)
    k = t.add(pa, [15], [math.log(0.5)], SEG)
    m_leaves = [leaf(t, m, [16], r) for r in (1.0, 1.0, 0.0)]
    k_leaves = [leaf(t, k, [17], r) for r in (0.0, 0.0, 0.0)]
    return t, pa, n, m, k, m_leaves, k_leaves


def arrays(t):
    return [x.parent for x in t.nodes], [NAN if x.reward is None else x.reward for x in t.nodes]


def test_paper_figure_worked_example():
    t, pa, n, m, k, ml, kl = paper_figure_tree()
    parent, rewards = arrays(t)
    values, adv = spo_tree_advantage(parent, rewards)
    assert values[m].item() == pytest.approx(2 / 3)
    assert values[k].item() == pytest.approx(0.0)
    assert values[pa].item() == pytest.approx((1 + 2 / 3 + 0) / 3)  # = 5/9
    assert adv[n].item() == pytest.approx(1 - 5 / 9)
    assert adv[m].item() == pytest.approx(2 / 3 - 5 / 9)
    assert adv[k].item() == pytest.approx(-5 / 9)
    assert adv[ml[0]].item() == pytest.approx(1 / 3) and adv[ml[2]].item() == pytest.approx(-2 / 3)
    assert adv[kl[0]].item() == 0.0
    assert adv[pa].item() == 0.0 and adv[0].item() == 0.0  # only child of the root


def test_unbalanced_tree_recursive_mean_differs_from_leaf_mean():
    # root -> a (finishes early, R = 1), b -> (b1, b2, b3 all R = 0)
    t = RolloutTree([1])
    a = leaf(t, 0, [5], 1.0)
    b = t.add(0, [6, 7], [math.log(0.5)] * 2, SEG)
    bl = [leaf(t, b, [8], 0.0) for _ in range(3)]
    parent, rewards = arrays(t)
    v = tree_values(parent, rewards)
    assert v[0].item() == pytest.approx(0.5)  # (1 + 0) / 2, recursive
    leaf_mean = sum(t[i].reward for i in t.leaves()) / len(t.leaves())
    assert leaf_mean == pytest.approx(0.25)  # what a flat mean over leaves would give
    adv = tree_edge_advantages(parent, v)
    assert adv[a].item() == pytest.approx(0.5) and adv[b].item() == pytest.approx(-0.5)
    assert all(adv[i].item() == 0.0 for i in bl)


def test_tree_values_independent_of_node_order():
    # A chain built by split() has a tail with a larger index than its children.
    t = RolloutTree([1])
    x = t.add(0, [5, 6, 7], [math.log(0.5)] * 3, SEG)
    leaf(t, x, [8], 1.0)
    leaf(t, x, [9], 0.0)
    tail = t.split(x, 1)  # x -> tail -> (two leaves); tail index > leaves' indices
    parent, rewards = arrays(t)
    v = tree_values(parent, rewards)
    assert v[tail].item() == pytest.approx(0.5) and v[x].item() == pytest.approx(0.5)


def test_sibling_std_normalisation():
    t = RolloutTree([1])
    leaf(t, 0, [5], 1.0)
    leaf(t, 0, [6], 0.0)
    leaf(t, 0, [7], 0.0)
    leaf(t, 0, [8], 0.0)
    parent, rewards = arrays(t)
    _, raw = spo_tree_advantage(parent, rewards)
    _, norm = spo_tree_advantage(parent, rewards, normalize_by_sibling_std=True)
    std = math.sqrt(3 / 16)  # population std of (1, 0, 0, 0)
    assert raw[1:].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert norm[1:].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std])


def test_leaf_without_value_raises():
    with pytest.raises(ValueError):
        tree_values([-1, 0, 0], [NAN, 1.0, NAN])


def test_chain_advantages_by_hand():
    assert spo_chain_advantage([0.5, 0.25, 0.75], 1.0).tolist() == [-0.25, 0.5, 0.25]
    adv = chain_token_advantages([2, 5], [0.5, 0.25], 1.0, 8).tolist()
    assert adv == [0, 0, -0.25, -0.25, -0.25, 0.75, 0.75, 0.75]
    # boundary 0 = the prompt state: every token belongs to a segment
    assert chain_token_advantages([0, 3], [0.4, 0.8], 0.0, 5).tolist() == pytest.approx([0.4] * 3 + [-0.8] * 2)
    with pytest.raises(ValueError):
        chain_token_advantages([3, 2], [0.1, 0.2], 1.0, 5)


def test_tree_size():
    assert tree_size([6, 6, 6]) == (216, 258)
    assert tree_size([4, 4, 4]) == (64, 84)


# ----- the trainer algorithms on hand-built trees -------------------------------------------
def chain_tree():
    """Two trajectories of one prompt sharing their first 3 tokens, split every 3 tokens
    (fixed partition): boundary states (), (5, 6, 7) shared, then (5, 6, 7, 8, 9, 4) only A's."""
    t = RolloutTree([1, 2, 3], group=0)
    pa = [0.5, 0.95, 0.5, 0.5, 0.95, 0.95, 0.5, 0.5]  # A: 8 tokens
    pb = [0.5, 0.95, 0.5, 0.95, 0.5]  # B: 5 tokens
    a = leaf(t, 0, [5, 6, 7, 8, 9, 4, 4, 4], 1.0, pa)
    b = leaf(t, 0, [5, 6, 7, 9, 9], 0.0, pb)
    return t, a, b


def split_chain_tree():
    t, a, b = chain_tree()
    s = SPOChainSampler(FixedPartition(3), num_generations=2, num_mc_samples=2, max_completion_length=16)
    req = s.split([t])
    # states: prompt (shared by A and B), after 5 6 7 (shared), after 5 6 7 8 9 4 (A only)
    assert len(req) == 3
    assert [t.path_token_ids(n, include_prompt=False) for _, n in req] == [[], [5, 6, 7], [5, 6, 7, 8, 9, 4]]
    la = [l for l in t.leaves() if t.path_token_ids(l, include_prompt=False)[-1] == 4][0]
    lb = [l for l in t.leaves() if l != la][0]
    assert t[la].info["spo_bounds"] == [0, 3, 6] and t[lb].info["spo_bounds"] == [0, 3]
    assert t[la].info["spo_nodes"][:2] == t[lb].info["spo_nodes"]  # same representatives
    return t, req, la, lb


def test_chain_split_shares_boundary_states():
    t, req, la, lb = split_chain_tree()
    # B's head after (5, 6, 7) is its own node but takes A's estimate
    assert sum("mc_from" in x.info for x in t.nodes) == 1


def add_mc(t, node, rewards):
    for r in rewards:
        c = t.add(node, [30], [math.log(0.5)], EOS, mc=True)
        t[c].reward = r


def test_chain_algorithm_samples_by_hand():
    t, req, la, lb = split_chain_tree()
    (_, root), (_, s1), (_, s2) = req
    add_mc(t, root, [1.0, 0.0])  # V(prompt) = 0.5
    add_mc(t, s1, [0.0, 0.0])  # V(5 6 7) = 0
    add_mc(t, s2, [1.0, 1.0])  # V(5 6 7 8 9 4) = 1
    cfg = load_config(overrides={"train.algo": "spo_chain", "spo.whiten": "none"})
    algo = get_algorithm("spo_chain")(cfg)
    assert algo.use_prob_mask and algo.rho == 0.9
    samples, metrics = algo.samples([t])
    # the values are computed once, by the algorithm, and written on the boundary nodes
    assert t[s1].value == 0.0 and t[0].value == 0.5 and t[s2].value == 1.0
    assert t[la].info["spo_values"] == [0.5, 0.0, 1.0] and t[lb].info["spo_values"] == [0.5, 0.0]
    byleaf = {s.info["leaf"]: s for s in samples}
    sa, sb = byleaf[la], byleaf[lb]
    # A: segments [0,3) -> 0 - 0.5, [3,6) -> 1 - 0, [6,8) -> R - 1 = 0
    want_a = [-0.5] * 3 + [1.0] * 3 + [0.0] * 2
    assert sa.mask == [1, 0, 1, 1, 0, 0, 1, 1]  # probability mask: p < 0.9
    assert sa.advantages == [w if m else 0.0 for w, m in zip(want_a, sa.mask)]
    # B: [0,3) -> 0 - 0.5, [3,5) -> R - 0 = 0
    assert sb.mask == [1, 0, 1, 0, 1]
    assert sb.advantages == [-0.5, 0.0, -0.5, 0.0, 0.0]
    assert metrics["advantages/count"] == 5  # segment advantages -0.5, 1, 0, -0.5, 0
    assert metrics["advantages/mean"] == pytest.approx(0.0)
    assert metrics["prob_mask/masked_fraction"] == pytest.approx(5 / 13)


def test_chain_without_prob_mask_trains_every_token():
    t, req, la, lb = split_chain_tree()
    for (_, n), rs in zip(req, ([1.0, 0.0], [0.0, 0.0], [1.0, 1.0])):
        add_mc(t, n, rs)
    cfg = load_config(overrides={"train.algo": "spo_chain", "spo.whiten": "none", "train.use_prob_mask": "false"})
    samples, _ = get_algorithm("spo_chain")(cfg).samples([t])
    sa = {s.info["leaf"]: s for s in samples}[la]
    assert sa.mask == [1] * 8 and sa.advantages == [-0.5] * 3 + [1.0] * 3 + [0.0] * 2


def test_tree_algorithm_samples_drop_zero_and_prob_mask():
    t, pa, n, m, k, ml, kl = paper_figure_tree()
    t[n].logprobs = [math.log(0.95), math.log(0.5)]  # first token above rho: masked
    cfg = load_config(overrides={"train.algo": "spo_tree", "spo.whiten": "none"})
    samples, metrics = get_algorithm("spo_tree")(cfg).samples([t])
    nodes = {s.info["node"]: s for s in samples}
    # zero-advantage segments (pa, the three leaves under k) are not trained
    assert set(nodes) == {n, m, k, *ml}
    assert metrics["tree/dropped_zero_advantage"] == 4
    sn = nodes[n]
    assert sn.context == [1, 2, 3, 10, 11] and sn.response == [12, 13]
    assert sn.mask == [0, 1] and sn.advantages == pytest.approx([0.0, 4 / 9])
    assert nodes[m].advantages == pytest.approx([2 / 3 - 5 / 9])
    assert nodes[ml[2]].context == [1, 2, 3, 10, 11, 14]
    cfg = load_config(overrides={"train.algo": "spo_tree", "spo.whiten": "none", "spo.drop_zero_advantage": "false"})
    samples, _ = get_algorithm("spo_tree")(cfg).samples([t])
    assert len(samples) == len(t) - 1  # every segment, including zero-advantage ones


def test_prob_mask_for_grpo_is_an_option():
    t = RolloutTree([1, 2], group=0)
    leaf(t, 0, [5, 6, 7], 1.0, [0.95, 0.5, 0.99])
    leaf(t, 0, [5, 8], 0.0, [0.95, 0.3])
    assert prob_mask([math.log(p) for p in (0.95, 0.5, 0.89999, 0.9)], 0.9) == [0, 1, 1, 0]
    plain, _ = get_algorithm("grpo")(load_config(overrides={"train.algo": "grpo"})).samples([t])
    assert [s.mask for s in plain] == [[1, 1, 1], [1, 1]]
    masked, _ = get_algorithm("grpo")(load_config(overrides={"train.algo": "grpo", "train.use_prob_mask": "true"})).samples([t])
    assert [s.mask for s in masked] == [[0, 1, 0], [0, 1]]
    off, _ = get_algorithm("spo_tree")(load_config(overrides={"train.algo": "spo_tree", "train.use_prob_mask": "false"})).samples([t])
    assert all(all(s.mask) for s in off)


def sample(adv, mask, qid):
    return TrainSample([1], [5] * len(adv), [0.0] * len(adv), list(adv), list(mask), info={"qid": qid})


def test_whitening_scope():
    batch = [sample([1.0, 9.0, 3.0], [1, 0, 1], 0), sample([5.0, 7.0], [1, 1], 1)]
    whiten_samples(batch, "batch")
    # masked values 1, 3, 5, 7: mean 4, unbiased std sqrt(20/3)
    s = math.sqrt(20 / 3)
    assert batch[0].advantages == pytest.approx([-3 / s, 9.0, -1 / s], abs=1e-6)  # unmasked token kept
    assert batch[1].advantages == pytest.approx([1 / s, 3 / s], abs=1e-6)
    group = [sample([1.0, 9.0, 3.0], [1, 0, 1], 0), sample([5.0, 7.0], [1, 1], 1)]
    whiten_samples(group, "group")
    r2 = math.sqrt(2)  # each group: two values 2 apart -> mean +-1, unbiased std sqrt(2)
    assert group[0].advantages == pytest.approx([-1 / r2, 9.0, 1 / r2], abs=1e-6)
    assert group[1].advantages == pytest.approx([-1 / r2, 1 / r2], abs=1e-6)
    none = [sample([1.0, 2.0], [1, 1], 0)]
    whiten_samples(none, "none")
    assert none[0].advantages == [1.0, 2.0]


def test_whitening_is_independent_of_micro_batch_size():
    """The scope is the batch the algorithm returns, whatever train.micro_batch_size is."""
    t, pa, n, m, k, ml, kl = paper_figure_tree()
    outs = []
    for mbs in ("1", "64"):
        cfg = load_config(overrides={"train.algo": "spo_tree", "train.micro_batch_size": mbs})
        samples, _ = get_algorithm("spo_tree")(cfg).samples([t])
        outs.append([a for s in samples for a in s.advantages])
    assert outs[0] == outs[1]
    w = torch.tensor([a for s in samples for a, mm in zip(s.advantages, s.mask) if mm], dtype=torch.float64)
    assert w.mean().item() == pytest.approx(0.0, abs=1e-9) and w.std().item() == pytest.approx(1.0, abs=1e-6)


def test_replay_buffer_ages_and_per_prompt_cap():
    buf = ReplayBuffer(per_prompt=2, max_age=2, seed=0)
    buf.add([sample([1.0], [1], q) for q in (0, 0, 0, 1)], step=0)
    got = buf.draw(step=0)
    assert sorted(s.info["qid"] for s in got) == [0, 0, 1]  # at most 2 per prompt
    assert len(buf) == 1  # one prompt-0 sample waits
    buf.add([sample([2.0], [1], 2)], step=1)
    assert len(buf.draw(step=1)) == 2  # the old one (age 1) and the new one
    buf.add([sample([3.0], [1], 3)], step=2)
    buf.items.append((0, sample([4.0], [1], 4)))  # an age-2 sample is dropped
    assert [s.info["qid"] for s in buf.draw(step=2)] == [3]


def test_spo_algorithms_reject_foreign_rollout():
    with pytest.raises(ValueError):
        get_algorithm("spo_tree")(load_config(overrides={"train.algo": "spo_tree", "train.rollout": "treepo"}))


def test_tree_values_written_to_nodes():
    t, pa, n, m, k, ml, kl = paper_figure_tree()
    get_algorithm("spo_tree")(load_config(overrides={"train.algo": "spo_tree"})).samples([t])
    assert t[pa].value == pytest.approx(5 / 9) and t[n].info["advantage"] == pytest.approx(4 / 9)
