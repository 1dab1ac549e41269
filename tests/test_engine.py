import torch

from segrl.engine.hf_engine import Engine, SamplingParams
from segrl.tree import FinishReason


def full_forward_logprobs(model, tree, node):
    ids = tree.path_token_ids(node)
    P = len(tree.prompt_ids())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[P - 1 : -1]
    return lp.gather(-1, torch.tensor(ids[P:])[:, None]).squeeze(-1)


def test_forked_sampling_matches_full_forward(tiny_model, char_tok):
    eng = Engine(tiny_model, char_tok, SamplingParams(temperature=1.0), seed=1)
    trees = eng.new_trees([[2, 5, 6, 7], [2, 9], [2, 3, 4, 5, 6, 7, 8, 9, 10]])
    first = eng.extend([(t, 0) for t in trees], 6, 4)
    # prompts prefilled once each (path minus the last token), however many samples
    assert eng.stats.prefill_tokens == 3 + 1 + 8
    active = [c for kids in first for c in kids if c[0][c[1]].finish_reason == FinishReason.SEGMENT]
    eng.extend(active, 5, 3)
    assert eng.stats.prefill_tokens == 12  # the second level continued from cached KV
    n = 0
    for t in trees:
        for leaf in t.leaves():
            ref = full_forward_logprobs(tiny_model, t, leaf)
            got = torch.tensor(t.path_logprobs(leaf))
            assert torch.allclose(ref, got, atol=1e-4), (ref, got)
            n += 1
    assert n >= 12


def test_temperature_scaled_logprobs(tiny_model, char_tok):
    eng = Engine(tiny_model, char_tok, SamplingParams(temperature=0.6), seed=2)
    (t,) = eng.new_trees([[2, 5, 6]])
    eng.extend([(t, 0)], 8, 2)
    for leaf in t.leaves():
        ids = t.path_token_ids(leaf)
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([ids])).logits[0].float() / 0.6
        lp = torch.log_softmax(logits, -1)[2:-1].gather(-1, torch.tensor(ids[3:])[:, None]).squeeze(-1)
        assert torch.allclose(lp, torch.tensor(t.path_logprobs(leaf)), atol=1e-4)


def test_greedy_equals_generate(tiny_model, char_tok):
    eng = Engine(tiny_model, char_tok, SamplingParams(temperature=0.0))
    prompts = [[2, 5, 6, 7], [2, 9, 9, 9, 9, 9], [2, 30]]
    trees = eng.new_trees(prompts)
    eng.extend([(t, 0) for t in trees], 24, 1)
    for t, p in zip(trees, prompts):
        out = tiny_model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=1, pad_token_id=0)
        assert out[0, len(p) :].tolist() == t.path_token_ids(1, include_prompt=False)


def test_stop_string_cuts_after_the_string(tiny_model, char_tok):
    # Find what greedy decoding writes, then use a piece of it as a stop string.
    eng = Engine(tiny_model, char_tok, SamplingParams(temperature=0.0))
    (t,) = eng.new_trees([[2, 5, 6, 7]])
    eng.extend([(t, 0)], 20, 1)
    text = char_tok.decode(t[1].token_ids)
    stop = text[5:7]
    cut = text.index(stop) + len(stop)
    eng2 = Engine(tiny_model, char_tok, SamplingParams(temperature=0.0, stop_strings=(stop,)))
    (u,) = eng2.new_trees([[2, 5, 6, 7]])
    eng2.extend([(u, 0)], 20, 1)
    assert char_tok.decode(u[1].token_ids) == text[:cut]
    assert u[1].finish_reason == FinishReason.STOP


def test_stop_strings_cut_at_first_occurrence_when_sampling(tiny_model, char_tok):
    # A sampled row (T=1, same seed; one row per call so that no other row changes the
    # random stream) with and without stop strings agrees up to the first occurrence and is
    # cut right after it: the per-token pre-check never skips a stop.
    def sample(seed, stops=()):
        eng = Engine(tiny_model, char_tok, SamplingParams(temperature=1.0, stop_strings=stops), seed=seed, eos_token_ids=[])
        (t,) = eng.new_trees([[2, 5, 6, 7]])
        eng.extend([(t, 0)], 30, 1)
        return t[1]

    texts = {seed: char_tok.decode(sample(seed).token_ids) for seed in range(4)}
    assert min(len(t) for t in texts.values()) >= 15
    stops = tuple(sorted({texts[0][9:11], texts[1][4:5], texts[2][12:15]}))
    n_stopped = 0
    for seed, text in texts.items():
        node = sample(seed, stops)
        cut = min([text.index(s) + len(s) for s in stops if s in text], default=len(text))
        assert char_tok.decode(node.token_ids) == text[:cut]
        n_stopped += node.finish_reason == FinishReason.STOP
    assert n_stopped >= 3


def test_crop_from_a_cached_descendant(tiny_model, char_tok):
    eng = Engine(tiny_model, char_tok, SamplingParams(temperature=1.0), seed=3)
    (t,) = eng.new_trees([[2, 5, 6, 7, 8]])
    eng.extend([(t, 0)], 12, 1, keep_kv=True)
    leaf = t.leaves()[0]
    if len(t[leaf].token_ids) < 3:
        return
    tail = t.split(leaf, 2)
    before = eng.stats.prefill_tokens
    eng.extend([(t, leaf)], 6, 3, mc=True)  # leaf is now the head of the chain
    assert eng.stats.prefill_tokens == before  # no prefix recomputed
    assert eng.stats.kv_crops == 1
    for c in t[leaf].children:
        if c == tail:
            continue
        assert t[c].info == {"mc": True}
        ref = full_forward_logprobs(tiny_model, t, c)
        assert torch.allclose(ref, torch.tensor(t.path_logprobs(c)), atol=1e-4)


def test_seeded_sampling_is_reproducible(tiny_model, char_tok):
    outs = []
    for _ in range(2):
        eng = Engine(tiny_model, char_tok, SamplingParams(temperature=1.0), seed=11)
        (t,) = eng.new_trees([[2, 5]])
        eng.extend([(t, 0)], 10, 4)
        outs.append([t[l].token_ids for l in t.leaves()])
    assert outs[0] == outs[1]


def test_per_ref_limits_and_children(tiny_model, char_tok):
    eng = Engine(tiny_model, char_tok, SamplingParams(temperature=1.0), seed=4, eos_token_ids=[])
    trees = eng.new_trees([[2, 5], [2, 6]])
    kids = eng.extend([(trees[0], 0), (trees[1], 0)], [3, 7], [2, 0])
    assert len(kids[0]) == 2 and kids[1] == []
    assert all(len(trees[0][c].token_ids) == 3 for _, c in kids[0])


def test_prefill_groups_trade_padding_for_forwards():
    from segrl.engine.hf_engine import prefill_groups

    # [10, 11, 50], 5 tokens per forward: {10,11}+{50} = 22+5 + 50+5 = 82 beats one batch
    # (3*50+5 = 155), three batches (71+15 = 86) and {10}+{11,50} (10+5 + 100+5 = 120).
    assert prefill_groups([50, 10, 11], 8, 5) == [[1, 2], [0]]
    assert prefill_groups([50, 10, 11], 8, 1000) == [[1, 2, 0]]  # forwards dear: one batch
    assert prefill_groups([50, 10, 11], 8, 0) == [[1], [2], [0]]  # padding dear: no padding
    assert sorted(map(len, prefill_groups([5, 5, 5], 2, 100))) == [1, 2]  # <= max_rows per batch
    assert prefill_groups([], 4, 10) == []


def test_grouped_prefill_matches_full_forward(tiny_model, char_tok):
    from segrl.engine.cascade_engine import CascadeEngine

    for cls in (Engine, CascadeEngine):
        eng = cls(tiny_model, char_tok, SamplingParams(temperature=1.0), seed=3)
        eng.prefill_call_tokens = 0  # every context length its own forward
        trees = eng.new_trees([[2, 5, 6, 7], [2, 9], [2, 3, 4, 5, 6, 7, 8, 9, 10], [2, 4, 4, 4]])
        eng.extend([(t, 0) for t in trees], 5, 2)
        assert eng.stats.prefill_tokens == 3 + 1 + 8 + 3  # unpadded
        for t in trees:
            for leaf in t.leaves():
                ref = full_forward_logprobs(tiny_model, t, leaf)
                assert torch.allclose(ref, torch.tensor(t.path_logprobs(leaf)), atol=1e-4), cls


def test_prefill_runs_one_forward_per_length_group(tiny_model, char_tok):
    eng = Engine(tiny_model, char_tok, SamplingParams(temperature=1.0), seed=3)
    eng.prefill_call_tokens = 0
    trees = eng.new_trees([[2, 5, 6, 7], [2, 9], [2, 3, 4, 5, 6, 7, 8, 9, 10], [2, 4, 4, 4]])
    shapes = []
    forward = eng._forward
    eng._forward = lambda ids, *a: shapes.append(tuple(ids.shape)) or forward(ids, *a)
    states = eng._prefill([(t, 0) for t in trees])
    assert sorted(shapes) == [(1, 1), (1, 8), (2, 3)]  # the two 3-token contexts together
    assert [s[0][0].shape[1] for s in states] == [3, 1, 8, 3]  # in the callers' order
