"""TreePO sampler: allocation, budget transfer, width invariant, early stop, fallback.

Uses a tiny random LlamaForCausalLM (vocab 50, hidden 64, 2 layers) with a character
tokenizer stand-in, and a scripted fake engine where exact branching must be controlled.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from segrl.configs import ConfigError, SegrlConfig, TreePOConfig, load_config
from segrl.engine.cascade_engine import CascadeEngine
from segrl.engine.hf_engine import Engine, EngineStats, SamplingParams
from segrl.engine.registry import make_engine
from segrl.samplers.treepo import TreePOSampler, allocate_branches, branch_budget, has_repetition, tree_metrics
from segrl.tree import FinishReason, RolloutTree

CHARS = " \nabcdefghijklmnopqrstuvwxyz0123456789:.+-="
EOS = 2


class CharTok:
    """Minimal tokenizer stand-in: ids 3.. are characters, 0 pad, 1 bos, 2 eos."""

    eos_token_id = EOS
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        out = []
        for i in ids:
            if 3 <= i < 3 + len(CHARS):
                out.append(CHARS[i - 3])
            elif not skip_special_tokens:
                out.append(f"<{i}>")
        return "".join(out)

    def encode(self, text):
        return [CHARS.index(c) + 3 for c in text]


TOK = CharTok()


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
    )
    m = LlamaForCausalLM(cfg).eval()  # near-uniform next-token distribution: EOS ~2% per token
    m.generation_config.eos_token_id = EOS
    return m


def make_cfg(max_len=24, **tp):
    cfg = SegrlConfig()
    cfg.sampling.max_completion_length = max_len
    cfg.train.num_generations = tp.pop("num_generations", 8)
    cfg.treepo = TreePOConfig(**tp)
    return cfg


def engine_for(model, seed=0):
    return Engine(model, TOK, SamplingParams(temperature=1.0), seed=seed)


def prompts(n):
    return [[1] + TOK.encode(f"q{i}:") for i in range(n)]


# ----- pure helpers -----------------------------------------------------------------------
def test_allocate_branches_largest_remainder():
    assert allocate_branches(4, [1, 1]) == [2, 2]
    assert allocate_branches(2, [5, 1]) == [1, 1]  # everyone keeps >= 1
    # rest 7 over (.7,.2,.1): shares 4.9, 1.4, 0.7 -> floors 4,1,0, remainder 2 to .9 and .7
    assert allocate_branches(10, [0.7, 0.2, 0.1]) == [6, 2, 2]
    assert sum(allocate_branches(7, [1, 1, 1])) == 7
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = allocate_branches(5, [1, 1], g)
        assert sorted(a) == [2, 3]
    with pytest.raises(ValueError):
        allocate_branches(1, [1, 1])


def test_branch_budget_is_doubling_capped_with_transfer():
    assert branch_budget(16, 0, 0, 2, 2) == 4  # 2 -> 4
    assert branch_budget(16, 0, 0, 8, 2) == 16  # 8 -> 16
    assert branch_budget(16, 0, 0, 16, 2) == 16  # saturated: chains
    assert branch_budget(16, 1, 1, 1, 2) == 4  # a finished sibling donates 2 branches
    assert branch_budget(16, 15, 0, 1, 2) == 1  # never fewer than the active paths
    assert branch_budget(4, 3, 0, 2, 2) == 2  # (token mode: width shrank below in-flight)


def test_has_repetition():
    assert has_repetition("ab" * 200, 32, 8)
    assert not has_repetition("ab" * 20, 32, 8)  # 40 chars: a 32-char string fits once
    assert not has_repetition("".join(chr(97 + (i * 7) % 26) + str(i) for i in range(300)), 32, 8)
    assert has_repetition("xyz" * 3, 3, 3) and not has_repetition("xyzxyz", 3, 3)


# ----- a scripted engine --------------------------------------------------------------
class ScriptEngine:
    """Engine stand-in: ``script(tree, node, child_no, limit) -> (text, reason)``."""

    def __init__(self, script, seed=0):
        self.script = script
        self.tokenizer = TOK
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = EngineStats()
        self.calls = []

    def extend(self, refs, max_new_tokens, num_children=1, keep_kv=False, release_sources=True, **info):
        self.stats.extend_calls += 1
        self.calls.append([(t.group, n, k) for (t, n), k in zip(refs, num_children)])
        out = []
        for (tree, node), lim, k in zip(refs, max_new_tokens, num_children):
            kids = []
            for j in range(k):
                text, reason = self.script(tree, node, j, lim)
                ids = TOK.encode(text)[:lim] + ([EOS] if reason == "eos" else [])
                ids = ids[:lim]
                self.stats.decode_tokens += len(ids)
                c = tree.add(node, ids, [-1.0] * len(ids), reason, **info)
                kids.append((tree, c))
            out.append(kids)
        return out


def test_budget_transfer_one_first_level_path_finishes():
    """Round 1: of 2 first-level paths, one hits EOS; the other then forks 4 ways."""

    def script(tree, node, j, lim):
        if node == 0 and j == 0:
            return "ab", "eos"
        return "abcd", "segment"

    cfg = make_cfg(max_len=16, segment_length=4, max_depth=4, width=16)
    eng = ScriptEngine(script)
    tree = RolloutTree([1, 3])
    s = TreePOSampler(cfg)
    s.grow(eng, [tree])
    assert eng.calls[0] == [(0, 0, 2)]
    (g, node, k), = eng.calls[1]
    assert tree[node].depth == 1 and k == 4  # budget min(16 - 1, 2*1 + 2*1) = 4
    assert [c[2] for c in eng.calls[2]] == [2, 2, 2, 2]  # 4 -> 8
    assert sorted(c[2] for c in eng.calls[3]) == [1] + [2] * 7  # 8 -> min(16 - 1, 16) = 15
    assert len(eng.calls) == 4 and len(tree.leaves()) == 16  # 1 EOS leaf + 15 at max length
    assert tree[0].info["treepo"]["fallback_points"] == 0


def test_budget_transfer_and_fallback_fill_width():
    def script(tree, node, j, lim):
        if tree[node].depth == 2 and j == 0:
            return "answer: 5.", "stop"
        return "abcdefghijkl", "segment"

    cfg = make_cfg(max_len=48, segment_length=12, max_depth=4, width=8, fallback_trajectory_policy="random_all")
    eng = ScriptEngine(script)
    tree = RolloutTree([1, 3])
    s = TreePOSampler(cfg)
    s.grow(eng, [tree])
    assert len(tree.leaves()) == 8
    for in_flight, finished in (r[0] for r in s.trace):
        assert in_flight + finished <= 8
    reasons = [tree[l].finish_reason for l in tree.leaves()]
    assert FinishReason.ANSWER in reasons


# ----- early stop ------------------------------------------------------------------------
def _classify_cfg(**kw):
    return TreePOSampler(make_cfg(max_len=64, segment_length=8, max_depth=8, width=4, **kw))


def _chain(texts_reasons):
    t = RolloutTree([1])
    node = 0
    for text, reason in texts_reasons:
        ids = TOK.encode(text) + ([EOS] if reason == "eos" else [])
        node = t.add(node, ids, [-1.0] * len(ids), reason)
    return t, node


def test_early_stop_answer_eos_and_split_answer():
    s = _classify_cfg()
    s._tok = TOK
    t, c = _chain([("answer: 12.", "stop")])
    assert s._classify(t, c) == FinishReason.ANSWER
    t, c = _chain([("no answer", "eos")])
    assert s._classify(t, c) == FinishReason.EOS
    # answer split across two segments (the released code only looked at the last segment)
    t, c = _chain([("so answe", "segment"), ("r: 7.", "stop")])
    assert s._classify(t, c) == FinishReason.ANSWER
    # answer without EOS: continues under answer_and_eos, stops under answer_as_eos
    t, c = _chain([("answer: 3", "segment")])
    assert s._classify(t, c) is None
    s2 = _classify_cfg(answer_policy="answer_as_eos")
    s2._tok = TOK
    assert s2._classify(t, c) == FinishReason.ANSWER


def test_early_stop_order_is_configurable():
    rep = "ab" * 16 * 9  # a 32-char substring 9 times
    t, c = _chain([(rep, "eos")])
    s = TreePOSampler(make_cfg(max_len=1024, segment_length=512, max_depth=8, width=4))
    s._tok = TOK
    assert s._classify(t, c) == FinishReason.EOS  # default: repetition last
    s = TreePOSampler(make_cfg(max_len=1024, segment_length=512, max_depth=8, width=4, early_stop_order=["repetition", "answer", "eos", "length", "depth"]))
    s._tok = TOK
    assert s._classify(t, c) == FinishReason.REPETITION
    t, c = _chain([(rep, "segment")])
    assert s._classify(t, c) == FinishReason.REPETITION
    # length vs depth
    t, c = _chain([("abcd", "segment")] * 2)
    s = TreePOSampler(make_cfg(max_len=8, segment_length=4, max_depth=2, width=4))
    s._tok = TOK
    assert s._classify(t, c) == FinishReason.LENGTH
    s = TreePOSampler(make_cfg(max_len=8, segment_length=4, max_depth=2, width=4, early_stop_order=["answer", "eos", "depth", "length"]))
    s._tok = TOK
    assert s._classify(t, c) == FinishReason.DEPTH


# ----- with a real (tiny) model -------------------------------------------------------------
def _forward_logprobs(model, tree, node):
    """Log-probs of the path's generated tokens from ONE full forward pass over the path."""
    ids = tree.path_token_ids(node)
    n_prompt = len(tree.prompt_ids())
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return lp[n_prompt - 1 :].tolist()


@pytest.mark.parametrize(
    "tp",
    [
        dict(width=8),
        dict(width=6, initial_width=2, initial_width_max=5, divergence=3),
        dict(width=8, divergence_policy="low_prob", divergence_score="path_mean"),
        dict(width=5, divergence_policy="high_prob", divergence_max=4, fallback_trajectory_policy="finished_first"),
        dict(width=7, max_depth=2, fallback_trajectory_policy="random_all", fallback_cut_policy="lowest_prob"),
        dict(width=8, saturated_fast_path=False),
        dict(width=6, initial_width=6),  # saturated from the start: decoded to the end at once
    ],
)
def test_width_invariant_and_exact_leaves(model, tp):
    tp = {"segment_length": 4, "max_depth": 6, **tp}
    cfg = make_cfg(max_len=24, **tp)
    eng = engine_for(model, seed=3)
    trees = eng.new_trees(prompts(3))
    s = TreePOSampler(cfg)
    m = s.grow(eng, trees)
    W = tp["width"]
    for rnd in s.trace:
        for in_flight, finished in rnd:
            assert in_flight + finished <= W
    for t in trees:
        t.validate()
        assert len(t.leaves()) == W
        assert all(t[l].finish_reason in FinishReason.COMPLETED | FinishReason.TRUNCATED for l in t.leaves())
        assert all(t.completion_len(l) <= 24 and t[l].depth <= tp["max_depth"] for l in t.leaves())
        assert not t.kv  # every cached state released
    # ONE engine call per round, and every token decoded once (no shared prefix twice)
    assert eng.stats.extend_calls == m["tree/rounds"] == len(s.trace)
    assert eng.stats.decode_tokens == sum(t.num_generated_tokens() for t in trees) == m["tree/decoded_tokens"]
    assert m["tree/decoded_tokens"] <= m["tree/independent_equivalent_tokens"]
    assert m["tree/leaves"] == W
    assert sum(v for k, v in m.items() if k.startswith("tree/finish_reason/")) == pytest.approx(1.0)
    for t in trees:  # segments are nodes of at most segment_length tokens
        assert all(0 < len(t[i].token_ids) <= tp["segment_length"] for i in range(1, len(t)))
        for l in t.leaves():
            assert _forward_logprobs(model, t, l) == pytest.approx(t.path_logprobs(l), abs=2e-4)


@pytest.mark.parametrize("kv_sharing, fork_min_tokens", [("cascade", None), ("cascade", 4), ("copy", None)])
def test_fallback_regrows_from_kept_prefix(model, kv_sharing, fork_min_tokens, monkeypatch):
    """Fallback children are decoded from a context rebuilt from the kept prefix: their
    log-probs equal a full forward pass over prefix + segment (the released code kept a
    stale, longer context here). The kept prefix's KV is cropped from the cut leaf's cached
    state where it can be (no prefill), else prefilled; either way the same trees. With
    fork_min_tokens=4 the cascade engine's leaves read level-1 blocks, so cuts fall inside
    and past a block, not only in the private tail."""
    if fork_min_tokens is not None:
        monkeypatch.setattr(CascadeEngine, "fork_min_tokens", fork_min_tokens)
    cfg = make_cfg(max_len=24, segment_length=4, max_depth=3, width=10, initial_width=2, fallback_trajectory_policy="random_all", kv_sharing=kv_sharing)
    eng = make_engine(cfg, model, TOK, seed=5)
    trees = eng.new_trees(prompts(4))
    s = TreePOSampler(cfg)
    m = s.grow(eng, trees)
    assert m["tree/fallbacks_per_prompt"] > 0
    regrown = [(t, i) for t in trees for i in range(1, len(t)) if t[i].info.get("fallback")]
    deep = [(t, i) for t, i in regrown if t[i].depth >= 2]  # cut below the root
    assert deep, "expected at least one fallback cut at a segment boundary below the root"
    for t, i in regrown:
        full = _forward_logprobs(model, t, i)
        n = len(t[i].token_ids)
        assert full[-n:] == pytest.approx(t[i].logprobs, abs=2e-4)
    # and in general every leaf's sampled log-probs match a full forward pass
    for t in trees:
        for l in t.leaves():
            assert _forward_logprobs(model, t, l) == pytest.approx(t.path_logprobs(l), abs=2e-4)
        assert len(t.leaves()) == 10
        assert not t.kv  # the finished leaves' states kept for cropping are released too
    prompt_tokens = sum(len(t.prompt_ids()) - 1 for t in trees)
    points = sum(t[0].info["treepo"]["fallback_points"] for t in trees)
    assert 0 < eng.stats.kv_crops <= points
    # Without cropping every fallback point is prefilled from its kept prefix: same trees.
    eng2 = make_engine(cfg, model, TOK, seed=5)
    eng2.cache_prefix = lambda tree, node, source: False
    trees2 = eng2.new_trees(prompts(4))
    TreePOSampler(cfg).grow(eng2, trees2)
    assert eng2.stats.kv_crops == 0 and eng2.stats.prefill_tokens > eng.stats.prefill_tokens >= prompt_tokens
    for t, t2 in zip(trees, trees2):
        assert [n.token_ids for n in t.nodes] == [n.token_ids for n in t2.nodes]
        assert [n.logprobs for n in t.nodes] == [pytest.approx(n.logprobs, abs=1e-4) for n in t2.nodes]


def test_misaligned_fallback_window_splits_segments(model):
    """A fallback window that is not a multiple of the segment length cuts inside a segment:
    that node is split so the cut point is a node, the cut point's state is cropped from the
    leaf, and the regrown paths still score exactly like a full forward pass."""
    cfg = make_cfg(max_len=24, segment_length=4, max_depth=3, width=10, initial_width=2, fallback_window=3, fallback_trajectory_policy="random_all")
    eng = engine_for(model, seed=8)
    trees = eng.new_trees(prompts(4))
    TreePOSampler(cfg).grow(eng, trees)
    assert sum(t[0].info["treepo"]["fallback_points"] for t in trees) > 0, "expected a fallback"
    assert any(len(t[i].token_ids) % 4 and t[i].children for t in trees for i in range(1, len(t)))  # a split segment
    assert eng.stats.kv_crops > 0
    for t in trees:
        t.validate()
        assert len(t.leaves()) == 10 and not t.kv
        for l in t.leaves():
            assert _forward_logprobs(model, t, l) == pytest.approx(t.path_logprobs(l), abs=2e-4)


def test_token_budget_mode(model):
    cfg = make_cfg(max_len=24, segment_length=4, max_depth=6, width=8, budget_mode="tokens", token_budget=60, min_width=2)
    eng = engine_for(model, seed=2)
    trees = eng.new_trees(prompts(4))
    TreePOSampler(cfg).grow(eng, trees)
    for t in trees:
        n = len(t.leaves())
        assert 2 <= n <= 8
        # the fallback never tops up beyond the token-budget estimate
        avg = t.independent_equivalent_tokens() / n
        assert n <= max(2, math.ceil(60 / max(avg, 1))) + 8  # bounded by in-flight at estimate time
    big = make_cfg(max_len=24, segment_length=4, max_depth=6, width=8, budget_mode="tokens", token_budget=10_000)
    trees = eng.new_trees(prompts(2))
    TreePOSampler(big).grow(eng, trees)
    assert all(len(t.leaves()) == 8 for t in trees)


def test_random_initial_width_is_first_class(model):
    cfg = make_cfg(max_len=8, segment_length=4, max_depth=2, width=8, initial_width=2, initial_width_max=8)
    eng = engine_for(model, seed=0)
    trees = eng.new_trees(prompts(12))
    TreePOSampler(cfg).grow(eng, trees)
    k0 = [t[0].info["treepo"]["initial_width"] for t in trees]
    assert all(2 <= k <= 8 for k in k0) and len(set(k0)) > 1
    assert all(t[0].info["treepo"]["initial_width"] == sum(1 for c in t[0].children if not t[c].info.get("fallback")) for t in trees)


def test_logprob_divergence_direction():
    cfg = make_cfg(width=8, divergence_policy="low_prob", divergence_temperature=0.5)
    t = RolloutTree([1])
    a = t.add(0, [5, 5], [-0.1, -0.1], "segment")
    b = t.add(0, [6, 6], [-2.0, -2.0], "segment")
    s = TreePOSampler(cfg)
    w = s._weights(t, [a, b], 0.5)
    assert w[1] > w[0]  # low-prob path encouraged
    assert allocate_branches(6, w)[1] > allocate_branches(6, w)[0]
    cfg.treepo.divergence_policy = "high_prob"
    w = TreePOSampler(cfg)._weights(t, [a, b], 0.5)
    assert w[0] > w[1]
    s = TreePOSampler(make_cfg(width=8, divergence_temperature=5.0, divergence_temperature_end=1.0))
    assert s._temperature(0.0) == pytest.approx(5.0) and s._temperature(1.0) == pytest.approx(1.0)


def test_progress_drives_the_divergence_temperature():
    """The trainer hands the fraction of training done to the sampler (no back-channel)."""
    cfg = make_cfg(max_len=8, segment_length=4, max_depth=2, width=4, divergence_policy="low_prob",
                   divergence_temperature=5.0, divergence_temperature_end=1.0)
    s = TreePOSampler(cfg)
    script = lambda t, n, j, lim: ("abcd", "segment")  # noqa: E731
    # cosine from 5 (progress 0) to 1 (progress 1): at 0.5, 1 + 4 * 0.5 * (1 + cos(pi / 2)) = 3
    assert s.sample(ScriptEngine(script), [RolloutTree([1, 3])], progress=0.5)["tree/divergence_temperature"] == pytest.approx(3.0)
    assert s.sample(ScriptEngine(script), [RolloutTree([1, 3])])["tree/divergence_temperature"] == 5.0  # outside training


def test_eval_sampler_leaves_exactly_k(model):
    cfg = make_cfg(max_len=16, segment_length=4, max_depth=4, width=8, eval_divergence=4)
    eng = engine_for(model, seed=1)
    trees = eng.new_trees(prompts(3))
    metrics = TreePOSampler.for_eval(cfg, 5).sample(eng, trees)
    assert all(len(t.leaves()) == 5 for t in trees)
    assert metrics["tree/leaves"] == 5
    trees = eng.new_trees(prompts(2))
    TreePOSampler.for_eval(cfg, 1)(eng, trees)  # k below initial_width
    assert all(len(t.leaves()) == 1 for t in trees)


# ----- settings ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "over,field",
    [
        ({"treepo.width": "1", "treepo.initial_width": "2"}, "treepo.width"),
        ({"treepo.segment_length": "0"}, "treepo.segment_length"),
        ({"treepo.segment_length": "-4"}, "treepo.segment_length"),
        ({"treepo.fallback_window": "0"}, "treepo.fallback_window"),
        ({"treepo.fallback_window": "-1"}, "treepo.fallback_window"),
        ({"treepo.initial_width_max": "1"}, "treepo.initial_width_max"),
        ({"treepo.early_stop_order": "answer,eos,depth"}, "treepo.early_stop_order"),
        ({"treepo.early_stop_order": "eos,length,depth,bogus"}, "treepo.early_stop_order"),
        ({"treepo.budget_mode": "tokens"}, "treepo.token_budget"),
        ({"treepo.max_depth": "0"}, "treepo.max_depth"),
        ({"treepo.answer_pattern": "("}, "treepo.answer_pattern"),
    ],
)
def test_invalid_settings_fail_clearly(over, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides={"train.algo": "treepo", **over})


def test_cross_section_width_check():
    """The width checks are the config's (SegrlConfig.validate), not the sampler's: they apply
    whenever training samples with TreePO, and only then."""
    over = {"train.num_generations": "3", "treepo.initial_width": "4"}  # width unset -> 3
    with pytest.raises(ConfigError, match=r"treepo\.width"):
        load_config(overrides={"train.algo": "treepo", **over})
    with pytest.raises(ConfigError, match=r"treepo\.width"):  # GRPO w/ TreePO sampling
        load_config(overrides={"train.rollout": "treepo", **over})
    assert load_config(overrides=over).treepo.initial_width == 4  # GRPO's groups: TreePO unused
    cfg = make_cfg(num_generations=3, initial_width=4)
    cfg.train.algo = "treepo"  # changed after construction: validated again when used
    with pytest.raises(ConfigError, match=r"treepo\.width"):
        cfg.validate()
    from segrl.trainer.treepo_algorithm import TreePO

    with pytest.raises(ConfigError, match=r"treepo\.width"):
        TreePO(cfg)
    with pytest.raises(ConfigError, match="max_rows_in_flight"):  # the evaluation width too
        load_config(overrides={"eval.rollout": "treepo", "eval.num_samples": "8", "treepo.max_rows_in_flight": "4"})
    assert TreePOSampler(make_cfg(num_generations=4)).width == 4


def test_treepo_recipe_defaults_do_not_clobber_user_values():
    cfg = load_config(overrides={"train.algo": "treepo"})
    assert (cfg.train.epsilon, cfg.train.epsilon_high, cfg.train.dual_clip, cfg.train.loss_type, cfg.train.beta) == (0.2, 0.28, 10.0, "dapo", 0.0)
    cfg = load_config(overrides={"train.algo": "treepo", "train.epsilon_high": "0.2", "train.dual_clip": "none"})
    assert cfg.train.epsilon_high == 0.2 and cfg.train.dual_clip is None
    assert load_config().train.epsilon_high is None  # other algorithms unaffected


# ----- dynamic sampling / algorithm -----------------------------------------------------------
class Stream:
    """A prompt stream stand-in: trees with group ids ``start, start + step, ...``."""

    def __init__(self, start, step=1):
        self.next_group, self.step = start, step

    def next_trees(self, n):
        out = [RolloutTree([1, 3], group=self.next_group + self.step * i) for i in range(n)]
        self.next_group += self.step * n
        return out


def test_dynamic_sampling_filters_on_raw_correctness_and_tops_up():
    from segrl.trainer.algorithms import Rollout
    from segrl.trainer.treepo_algorithm import TreePO

    def script(tree, node, j, lim):
        return ("answer: 1.", "stop") if tree[node].depth >= 1 else ("abcd", "segment")

    cfg = make_cfg(max_len=16, segment_length=4, max_depth=3, width=4)
    cfg.train.algo = "treepo"
    cfg.treepo.max_extra_rounds = 2
    algo = TreePO(cfg, prompts=Stream(100))  # the prompt stream is handed in at construction

    def scorer(refs):
        for t, l in refs:
            # groups 0 and 100+even: mixed correctness; others all-correct; shaped reward always varies
            mixed = t.group == 0 or (t.group >= 100 and t.group % 2 == 0)
            t[l].info["correct"] = float(l % 2 == 0) if mixed else 1.0
            t[l].reward = t[l].info["correct"] + 0.01 * l
        return {"rewards/x": 1.0}

    trees = [RolloutTree([1, 3], group=g) for g in range(4)]
    roll = algo.rollout(ScriptEngine(script), trees, scorer)
    assert isinstance(roll, Rollout) and "_trees" not in roll.metrics
    kept, m = roll.trees, roll.metrics
    assert len(kept) == 4
    assert all(t.group == 0 or t.group % 2 == 0 for t in kept)
    assert 1 <= m["dynamic/extra_rounds"] <= 2
    assert m["dynamic/prompts_sampled"] > 4
    samples, am = algo.samples(kept)
    assert len(samples) == 16 and math.isfinite(am["advantages/mean"])
    # bounded: with no mixed prompt at all, at most max_extra_rounds extra rounds, empty batch
    algo = TreePO(cfg, prompts=Stream(101, 2))  # odd groups only
    roll = algo.rollout(ScriptEngine(script), [RolloutTree([1, 3], group=1)], scorer)
    assert roll.trees == [] and roll.metrics["dynamic/extra_rounds"] == 2
    assert algo.samples([]) == ([], {})


def test_grpo_with_treepo_sampling(model):
    from segrl.trainer.algorithms import get_algorithm

    cfg = make_cfg(max_len=16, segment_length=4, max_depth=4)
    cfg.train.algo, cfg.train.rollout, cfg.train.num_generations = "grpo", "treepo", 4
    algo = get_algorithm("grpo")(cfg)
    eng = engine_for(model)
    trees = eng.new_trees(prompts(2))

    def scorer(refs):
        for t, l in refs:
            t[l].reward = float(l % 2)
            t[l].info["correct"] = float(l % 2)
        return {}

    m = algo.rollout(eng, trees, scorer).metrics
    assert m["tree/leaves"] == 4
    samples, _ = algo.samples(trees)
    assert len(samples) == 8


def test_saturated_fast_path_cuts_into_segments_and_stops_mid():
    """Once in-flight + finished = width, the rest of each path is decoded in one call and cut
    into segment nodes; a segment-level early stop (repetition) still cuts the path there."""
    rep = "a" * 16  # with repetition_substring=1, count=3: a segment "aaaa" is mumbling

    def script(tree, node, j, lim):
        if lim > 4:  # a whole rest-of-path request
            text = "xyzw" + "qrst" + rep  # segment 3 is repetitive
            return text[:lim], "segment"
        return "cdef"[:lim], "segment"

    cfg = make_cfg(max_len=32, segment_length=4, max_depth=8, width=4, repetition_substring=1, repetition_count=3)
    eng = ScriptEngine(script)
    tree = RolloutTree([1, 3])
    s = TreePOSampler(cfg)
    s.grow(eng, [tree])
    # round 1: 2 paths; round 2 grows 4 children = width: saturated, so they go to the end
    assert [c[2] for c in eng.calls[1]] == [2, 2]
    assert len(eng.calls) == 2
    assert all(len(tree[i].token_ids) == 4 for i in range(1, len(tree)))
    leaves = tree.leaves()
    assert len(leaves) == 4
    for l in leaves:
        assert tree[l].finish_reason == FinishReason.REPETITION
        assert tree[l].depth == 4  # cdef + xyzw, qrst, aaaa (cut there)
        assert TOK.decode(tree.path_token_ids(l, include_prompt=False)).endswith("xyzwqrstaaaa")
    # with the fast path off: one segment per round, same tree shape
    eng2 = ScriptEngine(lambda t, n, j, lim: (["xyzw", "qrst", "aaaa"][t[n].depth - 1] if t[n].depth >= 1 else "cdef", "segment"))
    tree2 = RolloutTree([1, 3])
    cfg.treepo.saturated_fast_path = False
    TreePOSampler(cfg).grow(eng2, [tree2])
    assert len(eng2.calls) == 4
    assert sorted(tree2[l].depth for l in tree2.leaves()) == [4] * 4
    assert all(tree2[l].finish_reason == FinishReason.REPETITION for l in tree2.leaves())
