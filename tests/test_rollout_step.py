"""The one-way training step: Rollout, the prompt stream, the sampler vocabulary, and an
estimator registered in the test trained through the normal config (tiny model)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_spo_sampling import ToyTok

from segrl.algos.registry import OUTCOME_ESTIMATORS, TREE_ESTIMATORS, TreeEstimate
from segrl.configs import ConfigError, load_config
from segrl.tree import NodeInfo


# ----- the prompt stream -------------------------------------------------------------------------
def test_prompt_stream_order_epochs_and_resume():
    from segrl.trainer.prompts import PromptStream

    ids = [[2, i] for i in range(5)]
    rows = [{"prompt": str(i)} for i in range(5)]
    s = PromptStream(ids, rows, seed=3, skip={4})
    g = torch.Generator().manual_seed(3 * 1000003)  # the seeded permutation of epoch 0
    epoch0 = [i for i in torch.randperm(5, generator=g).tolist() if i != 4]
    s.new_step()
    first = s.next_trees(3)
    assert [t.row["prompt"] for t in first] == [str(i) for i in epoch0[:3]]
    assert [t.group for t in first] == [0, 1, 2]
    state = s.state_dict()
    more = s.next_trees(3)  # crosses into epoch 1
    assert [t.group for t in more] == [3, 4, 5] and s.epoch == 1
    assert [t.row["prompt"] for t in more][:1] == [str(epoch0[3])]
    again = PromptStream(ids, rows, seed=3, skip={4})
    again.load_state_dict(state)
    assert [t.prompt_ids() for t in again.next_trees(3)] == [t.prompt_ids() for t in more]
    # two ranks: disjoint slices of one order, group ids unique across ranks
    r0, r1 = (PromptStream(ids, rows, 3, {4}, rank, 2) for rank in (0, 1))
    a, b = r0.next_trees(2), r1.next_trees(2)
    assert {t.row["prompt"] for t in a}.isdisjoint(t.row["prompt"] for t in b)
    assert [t.group for t in a] == [0, 2] and [t.group for t in b] == [1, 3]


# ----- the sampler vocabulary ----------------------------------------------------------------------
def test_one_sampler_vocabulary_with_old_names_accepted():
    from segrl.samplers.group import GroupSampler
    from segrl.samplers.treepo import TreePOSampler
    from segrl.trainer.algorithms import get_algorithm

    assert load_config().eval.rollout == "group"
    assert load_config(overrides={"eval.rollout": "independent"}).eval.rollout == "group"  # yesterday's name
    assert load_config(overrides={"train.rollout": "independent"}).train.rollout == "group"
    assert load_config(overrides={"train.rollout": "treepo", "eval.rollout": "treepo"}).eval.rollout == "treepo"
    with pytest.raises(ConfigError, match=r"eval\.rollout: 'spo_tree' is not one of"):  # no k leaves per problem
        load_config(overrides={"eval.rollout": "spo_tree"})
    with pytest.raises(ConfigError, match=r"train\.rollout: spo_chain samples with its own sampler"):
        load_config(overrides={"train.algo": "spo_chain", "train.rollout": "group"})
    # every name does something distinct: 'group' makes TreePO train on plain groups
    treepo = get_algorithm("treepo")
    assert isinstance(treepo(load_config(overrides={"train.algo": "treepo"})).sampler, TreePOSampler)
    assert isinstance(treepo(load_config(overrides={"train.algo": "treepo", "train.rollout": "group"})).sampler, GroupSampler)


def test_group_rollout_under_treepo_samples_depth_one_trees(tiny_model, char_tok):
    from segrl.engine.hf_engine import Engine, SamplingParams
    from segrl.trainer.algorithms import Rollout, get_algorithm

    over = {"train.algo": "treepo", "train.rollout": "group", "train.num_generations": "3", "treepo.dynamic_sampling": "false"}
    cfg = load_config(overrides=over)
    algo = get_algorithm("treepo")(cfg)
    eng = Engine(tiny_model, char_tok, SamplingParams(temperature=1.0), seed=0)
    trees = eng.new_trees([[2, 5, 6], [2, 7]])

    def scorer(refs):
        for t, leaf in refs:
            t[leaf].reward = t[leaf].info[NodeInfo.CORRECT] = float(leaf % 2)
        return {"rewards/parity": 0.5}

    roll = algo.rollout(eng, trees, scorer, progress=0.5)
    assert isinstance(roll, Rollout) and roll.trees == trees and "_trees" not in roll.metrics
    assert roll.metrics["rewards/parity"] == 0.5 and roll.metrics["tree/depth_max"] == 1.0
    assert all(len(t.leaves()) == 3 and t.max_depth() == 1 for t in trees)


# ----- an estimator registered here, trained through the normal config -----------------------------
@pytest.fixture
def toy_estimators():
    @OUTCOME_ESTIMATORS.register("test_sign")
    def sign_advantage(rewards, index, scale_rewards="group", stats=None):
        """+1 above the group mean, -1 below, 0 at it. ``[N], [N] -> [N]``."""
        _, inv = torch.unique(index, return_inverse=True)
        n = torch.zeros(int(inv.max()) + 1, dtype=rewards.dtype).index_add_(0, inv, torch.ones_like(rewards))
        mean = torch.zeros_like(n).index_add_(0, inv, rewards) / n
        return torch.sign(rewards - mean[inv])

    @TREE_ESTIMATORS.register("test_last_segment")
    def last_segment(trees, cfg):
        """Only each trajectory's last segment is credited, with R - mean(R of its tree).
        ``N`` lists of ``[depth]``."""
        rows = []
        for tree in trees:
            leaves = tree.leaves(include_mc=False)
            mean = sum(tree[l].reward for l in leaves) / len(leaves)
            rows += [[0.0] * (tree[l].depth - 1) + [tree[l].reward - mean] for l in leaves]
        return TreeEstimate(per_segment=rows)

    yield
    OUTCOME_ESTIMATORS.unregister("test_sign")
    TREE_ESTIMATORS.unregister("test_last_segment")


@pytest.mark.parametrize("estimator,rollout", [("test_sign", "group"), ("test_last_segment", "treepo")])
def test_registered_estimator_trains_a_step(tmp_path, tiny_model, toy_estimators, estimator, rollout):
    from segrl.tasks.base import Task
    from segrl.trainer.trainer import Trainer

    def correctness(prompts, completions, **cols):  # parity of the text: varies within a group
        return [float(sum(map(ord, c)) % 2) for c in completions]

    rows = [{"prompt": p, "answer": "M"} for p in ("ABC", "ABD", "AEF", "AGH")]
    over = {
        "train.adv_estimator": estimator, "train.rollout": rollout, "train.prompts_per_step": "2", "train.num_generations": "4",
        "sampling.max_completion_length": "8", "treepo.segment_length": "2", "treepo.max_depth": "4",
        "train.warmup_steps": "0", "log.report_to": "none", "log.progress": "false",
    }
    task = Task("toy", rows, rows, correctness)
    tr = Trainer(load_config(overrides=over), model=copy.deepcopy(tiny_model), tokenizer=ToyTok(), task=task, run_dir=tmp_path)
    before = [p.detach().clone() for p in tr.model.parameters()]
    metrics = tr.train_step()
    assert math.isfinite(metrics["loss"]) and metrics["train/samples"] == 8
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))  # a real update
    from segrl.tree import load_jsonl

    for t in load_jsonl(tmp_path / "rollouts.jsonl"):
        leaves = t.leaves()
        mean = sum(t[l].reward for l in leaves) / len(leaves)
        for l in leaves:
            want = math.copysign(1.0, t[l].reward - mean) if t[l].reward != mean else 0.0
            if estimator == "test_sign":  # one value per trajectory, on the leaf
                assert t[l].info["advantage"] == want
            else:  # per segment: the last one carries R - mean, the others 0
                assert t[l].info["advantage"] == pytest.approx(t[l].reward - mean)
                assert all(t[i].info["advantage"] == 0.0 for i in t.path(l)[1:-1])
