import pytest

from segrl.tree import FinishReason, RolloutTree, load_jsonl, save_jsonl


def build():
    t = RolloutTree([5, 6, 7], group=3, row={"answer": "4"})
    a = t.add(0, [10, 11], [-0.1, -0.2], FinishReason.SEGMENT)
    b = t.add(0, [12], [-0.3], FinishReason.EOS)
    a1 = t.add(a, [13, 14, 15], [-0.4, -0.5, -0.6], FinishReason.EOS)
    a2 = t.add(a, [16], [-0.7], FinishReason.LENGTH, mc=True)
    return t, a, b, a1, a2


def test_paths_leaves_and_spans():
    t, a, b, a1, a2 = build()
    assert t.path(a1) == [0, a, a1]
    assert t.ancestors(a1) == [0, a]
    assert t.leaves() == [b, a1, a2]
    assert t.leaves(include_mc=False) == [b, a1]
    assert t.subtree(a) == [a, a1, a2]
    assert t.subtree_leaves(0, include_mc=False) == [a1, b]  # depth-first order
    assert t.path_token_ids(a1) == [5, 6, 7, 10, 11, 13, 14, 15]
    assert t.path_token_ids(a1, include_prompt=False) == [10, 11, 13, 14, 15]
    assert t.path_logprobs(a1) == [-0.1, -0.2, -0.4, -0.5, -0.6]
    assert t.segment_spans(a1) == [(a, 0, 2), (a1, 2, 5)]
    assert t[a1].depth == 2 and t.max_depth() == 2
    # decoded once: 2 + 1 + 3 + 1 = 7; independently the two trajectories cost 1 + 5
    assert t.num_generated_tokens() == 7
    assert t.independent_equivalent_tokens() == 6


def test_split_makes_a_chain_and_keeps_descendants():
    t, a, b, a1, a2 = build()
    t[a1].reward = 1.0
    tail = t.split(a1, 1)
    assert t[a1].token_ids == [13] and t[tail].token_ids == [14, 15]
    assert t[a1].children == [tail] and t[tail].parent == a1
    assert t[tail].depth == 3 and t[tail].reward == 1.0 and t[a1].reward is None
    assert t[tail].finish_reason == FinishReason.EOS and t[a1].finish_reason == FinishReason.SEGMENT
    # a split changes no path: independent sampling of the leaves still costs 1 + 5 (+ 3 with MC)
    t.split(a, 1)  # a's children now hang off a node created after them
    assert t.independent_equivalent_tokens() == 6 and t.independent_equivalent_tokens(include_mc=True) == 9
    assert t.path_token_ids(tail) == [5, 6, 7, 10, 11, 13, 14, 15]
    t.validate()
    with pytest.raises(ValueError):
        t.split(tail, 0)


@pytest.mark.parametrize("length", [1, 2, 3, 7])
def test_split_every_equals_repeated_splits(length):
    def grown():
        t = RolloutTree([5, 6])
        a = t.add(0, [10, 11, 12, 13, 14, 15, 16], [-0.1 * i for i in range(7)], FinishReason.SEGMENT, fallback=True)
        c = t.add(a, [20, 21], [-1.0, -2.0], FinishReason.EOS)  # a descendant: depths shift
        t[a].reward = 0.5
        t.kv[a] = "state"
        return t, a, c

    t1, a, _ = grown()
    last = a
    for _ in range((7 - 1) // length):
        last = t1.split(last, length)
    t2, _, _ = grown()
    assert t2.split_every(a, length) == last
    for n1, n2 in zip(t1.nodes, t2.nodes, strict=True):
        assert (n1.parent, n1.depth, n1.token_ids, n1.logprobs, n1.finish_reason, n1.reward, n1.children, n1.info) == (
            n2.parent, n2.depth, n2.token_ids, n2.logprobs, n2.finish_reason, n2.reward, n2.children, n2.info)
    assert t1.kv == t2.kv
    t2.validate()
    with pytest.raises(ValueError, match="length <= 0"):
        t2.split_every(a, 0)
    with pytest.raises(ValueError, match="the root"):
        t2.split_every(0, 1)


def test_jsonl_round_trip(tmp_path):
    t, *_ = build()
    t[3].reward = float("nan")
    p = tmp_path / "r.jsonl"
    save_jsonl([t, t], p)
    back = load_jsonl(p)
    assert len(back) == 2
    u = back[0]
    assert [n.token_ids for n in u.nodes] == [n.token_ids for n in t.nodes]
    assert [n.parent for n in u.nodes] == [n.parent for n in t.nodes]
    assert u.group == 3 and u.row == {"answer": "4"}
    assert u[3].reward is None  # NaN is written as null
    assert u[4].info == {"mc": True}


def test_corrupt_jsonl_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    t, *_ = build()
    save_jsonl([t], p)
    with open(p, "a") as f:
        f.write('{"nodes": [{"parent": 5, "depth": 0, "token_ids": []}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_jsonl(p)


def test_add_rejects_mismatched_arrays():
    t = RolloutTree([1])
    with pytest.raises(ValueError):
        t.add(0, [1, 2], [0.0])
    with pytest.raises(IndexError):
        t.add(7, [1], [0.0])
