"""SPO-chain MC continuations and SPO-tree branches continue from cached prefixes.

A tiny random LLaMA (``conftest.tiny_model``) samples; every continuation's recorded
log-probs must equal a full forward pass over prefix + continuation, and the engine's
counters must show each prompt prefilled once (path minus its last token) and nothing
else prefilled: boundary states are crops of the trajectories' KV, tree levels forks.
"""

import math

import pytest
import torch

from segrl.algos.registry import TREE_ESTIMATORS
from segrl.configs import load_config
from segrl.engine.hf_engine import Engine, SamplingParams
from segrl.samplers.partition import CutpointPartition, FixedPartition
from segrl.samplers.spo_chain import SPOChainSampler
from segrl.samplers.spo_tree import SPOTreeSampler
from segrl.tree import FinishReason

PROMPTS = [[2, 5, 6, 7], [2, 9, 10], [2, 11, 12, 13, 14, 15]]
TEMP = 0.7


def full_forward_logprobs(model, tree, node, temperature=TEMP):
    ids = tree.path_token_ids(node)
    P = len(tree.prompt_ids())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float() / temperature
    lp = torch.log_softmax(logits, -1)[P - 1 : -1]
    return lp.gather(-1, torch.tensor(ids[P:])[:, None]).squeeze(-1)


def parity_scorer(refs):
    """Reward 1 for an even-length completion (deterministic, exercises both values)."""
    for t, leaf in refs:
        t[leaf].reward = float(t.completion_len(leaf) % 2 == 0)
        t[leaf].info["correct"] = t[leaf].reward
    return {}


def prefill_once(prompts):
    return sum(len(p) - 1 for p in prompts)


def test_chain_mc_continuations_continue_from_cached_prefix(tiny_model, char_tok):
    eng = Engine(tiny_model, char_tok, SamplingParams(temperature=TEMP), seed=0)
    trees = eng.new_trees(PROMPTS)
    N, K = 4, 3
    s = SPOChainSampler(CutpointPartition(0.9, 2), N, K, max_completion_length=14, max_segments=3)
    m = s.sample(eng, trees)
    assert all(n.value is None and n.reward is None for t in trees for n in t.nodes)  # samplers only sample
    parity_scorer([(t, leaf) for t in trees for leaf in t.leaves()])
    # Each prompt prefilled once; every boundary state is a crop of its trajectory's KV.
    assert eng.stats.prefill_tokens == prefill_once(PROMPTS)
    assert eng.stats.kv_crops == m["mc/states"] > 0
    assert eng.stats.extend_calls == 2  # trajectories, then all continuations at once
    assert m["mc/rollouts"] == K * m["mc/states"]
    inner = 0
    for t in trees:
        trajs = t.leaves(include_mc=False)
        assert len(trajs) == N
        mc = [l for l in t.leaves() if t[l].info.get("mc")]
        heads = {t[l].parent for l in mc}
        values = TREE_ESTIMATORS["spo_chain"]([t], None).values[0]  # V(s_b) = mean of the K continuations
        for h in heads:
            assert sum(1 for c in t[h].children if t[c].info.get("mc")) == K
            rs = [t[c].reward for c in t[h].children if t[c].info.get("mc")]
            assert values[h] == pytest.approx(sum(rs) / K)
            inner += h != 0
        for leaf in trajs + mc:  # continuation log-probs == full forward over prefix + continuation
            ref = full_forward_logprobs(tiny_model, t, leaf)
            got = torch.tensor(t.path_logprobs(leaf))
            assert torch.allclose(ref, got, atol=1e-4), (ref, got)
        for leaf in trajs:  # the boundaries are the cutpoints, and their values are recorded
            info = t[leaf].info
            lps = t.path_logprobs(leaf)
            cuts = [i for i, lp in enumerate(lps) if math.exp(lp) < 0.9]
            assert set(info["spo_bounds"]) <= set(cuts[::2])
            assert len(info["spo_bounds"]) <= 3 and len(info["spo_nodes"]) == len(info["spo_bounds"])
            for b, node in zip(info["spo_bounds"], info["spo_nodes"]):
                assert t.completion_len(node) == b
                assert t.path_token_ids(node, include_prompt=False) == t.path_token_ids(leaf, include_prompt=False)[:b]
    assert inner > 0  # some continuations started inside a trajectory (a true crop)
    assert all(not t.kv for t in trees)  # KV released


def test_chain_shared_boundary_states_estimated_once(tiny_model, char_tok):
    eng = Engine(tiny_model, char_tok, SamplingParams(temperature=TEMP), seed=1)
    trees = eng.new_trees(PROMPTS[:2])
    N, K = 4, 2
    s = SPOChainSampler(FixedPartition(length=4), N, K, max_completion_length=10)
    m = s.sample(eng, trees)
    for t in trees:
        # the prompt state is a boundary of all N trajectories but gets K continuations, not N*K
        assert sum(1 for c in t[0].children if t[c].info.get("mc")) == K
        keys = set()
        for leaf in t.leaves(include_mc=False):
            for b in t[leaf].info["spo_bounds"]:
                keys.add(tuple(t.path_token_ids(leaf, include_prompt=False)[:b]))
        heads = {t[l].parent for l in t.leaves() if t[l].info.get("mc")}
        assert len(heads) == len(keys)  # one estimate per distinct boundary state
    assert m["mc/shared_states"] >= 2 * (N - 1)
    assert eng.stats.prefill_tokens == prefill_once(PROMPTS[:2])


@pytest.mark.parametrize("unbounded", [True, False])
def test_tree_branches_continue_from_cached_prefix(tiny_model, char_tok, unbounded):
    eng = Engine(tiny_model, char_tok, SamplingParams(temperature=TEMP), seed=2)
    trees = eng.new_trees(PROMPTS)
    M, branch, max_len = 3, [3, 2, 2], 12
    m = SPOTreeSampler(branch, M, max_len, last_segment_unbounded=unbounded).sample(eng, trees)
    assert all(n.value is None and n.reward is None for t in trees for n in t.nodes)  # samplers only sample
    parity_scorer([(t, leaf) for t in trees for leaf in t.leaves()])
    # Each prompt prefilled once; deeper levels fork cached states; each shared prefix decoded once.
    assert eng.stats.prefill_tokens == prefill_once(PROMPTS)
    assert eng.stats.extend_calls == len(branch)
    assert eng.stats.decode_tokens == sum(t.num_generated_tokens() for t in trees) == m["tree/decoded_tokens"]
    for t in trees:
        assert len(t[0].children) == branch[0]
        for i, node in enumerate(t.nodes[1:], start=1):
            if node.children:
                assert len(node.children) == branch[node.depth] and len(node.token_ids) == M
                assert node.finish_reason == FinishReason.SEGMENT
            else:
                assert node.reward is not None
                assert node.finish_reason in (FinishReason.EOS, FinishReason.LENGTH, FinishReason.DEPTH)
                if node.finish_reason == FinishReason.DEPTH:
                    assert not unbounded and node.depth == len(branch) and len(node.token_ids) == M
                if node.finish_reason == FinishReason.LENGTH:
                    assert t.completion_len(i) == max_len
            if node.depth < len(branch) or not unbounded:
                assert len(node.token_ids) <= M
        for leaf in t.leaves():
            ref = full_forward_logprobs(tiny_model, t, leaf)
            assert torch.allclose(ref, torch.tensor(t.path_logprobs(leaf)), atol=1e-4)
        # the SPO-tree estimator: recursive-mean values and edge advantages
        est = TREE_ESTIMATORS["spo_tree"]([t], load_config(overrides={"train.algo": "spo_tree"}))
        v, adv = est.values[0], est.per_node[0]
        for i, node in enumerate(t.nodes):
            if node.children:
                assert v[i] == pytest.approx(sum(v[c] for c in node.children) / len(node.children))
            if i:
                assert adv[i] == pytest.approx(v[i] - v[node.parent])
    assert all(not t.kv for t in trees)


class ToyTok:
    """Text <-> ids for the tiny model: character c is id ord(c) - 63 (so 'A' = 2 ...)."""

    eos_token_id = 1
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) - 63 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(int(i) + 63) for i in ids if not (skip_special_tokens and int(i) in (0, 1)))


@pytest.mark.parametrize("algo", ["spo_chain", "spo_tree"])
def test_trainer_step_with_spo(tmp_path, tiny_model, algo):
    """One training step of each SPO algorithm through the real trainer (tiny model)."""
    import copy

    from segrl.configs import load_config
    from segrl.tasks.base import Task
    from segrl.trainer.trainer import Trainer

    def correctness(prompts, completions, **cols):
        return [1.0 if "M" in c else 0.0 for c in completions]

    rows = [{"prompt": p, "answer": "M"} for p in ("ABC", "ABD", "AEF", "AGH")]
    task = Task("toy", rows, rows, correctness)
    cfg = load_config(
        overrides={
            "train.algo": algo,
            "train.prompts_per_step": "2",
            "train.num_generations": "3",
            "sampling.max_completion_length": "8",
            "spo.num_mc_samples": "2",
            "spo.cutpoint_interval": "2",
            "spo.branch_factors": "2,2",
            "spo.segment_length": "3",
            "train.beta": "0.01",
            "log.report_to": "none",
            "log.progress": "false",
        }
    )
    tr = Trainer(cfg, model=copy.deepcopy(tiny_model), tokenizer=ToyTok(), task=task, run_dir=tmp_path)
    metrics = tr.train_step()
    for key in ("segments/mean_count", "segments/mean_length", "tree/decoded_tokens", "prob_mask/masked_fraction", "advantages/count"):
        assert key in metrics, key
    if algo == "spo_chain":
        assert metrics["mc/rollouts"] > 0 and metrics["mc/tokens"] > 0
    else:
        assert metrics["tree/leaves"] > 0
    assert math.isfinite(metrics.get("loss", 0.0))
