"""Multi-level cascade-attention engine: exact against the transformers forward and against
:class:`Engine` (same tokens from the same seed), KV pool bookkeeping, and the TreePO
sampler's use of it (kv_sharing, row capacity)."""

from __future__ import annotations

import gc

import pytest
import torch
from test_engine import full_forward_logprobs
from test_treepo_sampler import TOK, make_cfg, prompts
from test_treepo_sampler import model as model  # noqa: F401  (module fixture)

from segrl.engine.cascade_attention import cascade_attention, key_mask, level_indices
from segrl.engine.cascade_engine import Block, CascadeEngine, _Level, unsupported_reason
from segrl.engine.hf_engine import Engine, SamplingParams
from segrl.engine.kv_pool import KVPool, copy_positions, row_index
from segrl.engine.registry import make_engine
from segrl.samplers.treepo import TreePOSampler
from segrl.tree import FinishReason


def grow(eng, prompt_ids):
    """Root -> 3 children -> 2 each -> 1 each -> 3 each: forks at three depths, a chain
    continued by a single child in between, different prompt lengths."""
    trees = eng.new_trees(prompt_ids)
    lv1 = [c for kids in eng.extend([(t, 0) for t in trees], 6, 3) for c in kids]
    lv2 = [c for kids in eng.extend(lv1, 5, 2) for c in kids]
    lv3 = [c for kids in eng.extend(lv2, 5, 1) for c in kids]
    eng.extend(lv3, 4, 3)
    return trees


@pytest.mark.parametrize("fork_min_tokens", [1, 1000])
def test_cascade_logprobs_match_full_forward(tiny_model, char_tok, fork_min_tokens):
    """Forked completions as shared level-1 blocks (1), or copied into each row's tail (1000)."""
    eng = CascadeEngine(tiny_model, char_tok, SamplingParams(temperature=1.0), seed=7, eos_token_ids=[])
    eng.fork_min_tokens = fork_min_tokens
    trees = grow(eng, [[2, 5, 6, 7], [2, 9], [2, 3, 4, 5, 6, 7, 8, 9, 10]])
    assert eng.stats.prefill_tokens == 3 + 1 + 8  # each prompt prefilled once, nothing after
    assert eng.stats.decode_tokens == 3 * (3 * 6 + 6 * 5 + 6 * 5 + 18 * 4)
    # prompts, and (only as blocks) the forked completions
    assert len(eng._levels) == (2 if fork_min_tokens == 1 else 1)
    n = 0
    for t in trees:
        assert len(t.leaves()) == 18
        for leaf in t.leaves():
            ref = full_forward_logprobs(tiny_model, t, leaf)
            assert torch.allclose(ref, torch.tensor(t.path_logprobs(leaf)), atol=1e-4)
            n += 1
    assert n == 54


@pytest.mark.parametrize("fork_min_tokens", [1, 1000])
def test_rows_of_one_node_start_at_different_steps(tiny_model, char_tok, fork_min_tokens):
    """max_batch_size 4: a node's 3 children do not all start together (continuous batching),
    and the ones that start later still read the shared tail (its row goes to the last one)."""
    eng = CascadeEngine(tiny_model, char_tok, SamplingParams(temperature=1.0), max_batch_size=4, seed=2, eos_token_ids=[])
    eng.fork_min_tokens = fork_min_tokens
    batch_rows = []
    step = eng._step
    eng._step = lambda inp, *a: batch_rows.append(inp.shape[0]) or step(inp, *a)
    trees = eng.new_trees([[2, 5, 6, 7], [2, 9]])
    lv1 = [c for kids in eng.extend([(t, 0) for t in trees], 5, 1) for c in kids]
    lv2 = [c for kids in eng.extend(lv1, 4, 3) for c in kids]  # rows 0-3 start, 4-5 wait
    eng.extend(lv2, 3, 1)
    assert max(batch_rows) == 4 and sum(batch_rows) == eng.stats.decode_tokens
    for t in trees:
        for leaf in t.leaves():
            ref = full_forward_logprobs(tiny_model, t, leaf)
            assert torch.allclose(ref, torch.tensor(t.path_logprobs(leaf)), atol=1e-4)


@pytest.mark.parametrize("fork_min_tokens", [1, 1000])
def test_private_window_past_the_front_rows(tiny_model, char_tok, fork_min_tokens):
    """A group of rows whose tails lie past the pool's front rows is attended where it lies
    (the window starts past row 0), with the same log-probs as a full forward pass."""
    eng = CascadeEngine(tiny_model, char_tok, SamplingParams(temperature=1.0), max_batch_size=4, seed=5, eos_token_ids=[])
    eng.fork_min_tokens = fork_min_tokens
    windows = []
    step = eng._step
    eng._step = lambda inp, pos, trow, buf, *a: windows.append(buf) or step(inp, pos, trow, buf, *a)
    trees = grow(eng, [[2, 5, 6, 7], [2, 9], [2, 3, 4]])
    assert max(n for _, n in windows) == 4 and any(lo > 0 for lo, _ in windows)
    for t in trees:
        for leaf in t.leaves():
            ref = full_forward_logprobs(tiny_model, t, leaf)
            assert torch.allclose(ref, torch.tensor(t.path_logprobs(leaf)), atol=1e-4)


@pytest.mark.parametrize("fork_min_tokens", [1, 1000])
def test_cascade_samples_the_same_tokens_as_engine(tiny_model, char_tok, fork_min_tokens):
    out = []
    for cls in (Engine, CascadeEngine):
        eng = cls(tiny_model, char_tok, SamplingParams(temperature=1.0), seed=3)  # EOS on: rows end early
        eng.fork_min_tokens = fork_min_tokens
        trees = grow(eng, [[2, 5, 6, 7], [2, 9, 9]])
        out.append([[t[i].token_ids for i in range(len(t))] for t in trees])
        out.append([[t[i].finish_reason for i in range(len(t))] for t in trees])
    assert out[0] == out[2] and out[1] == out[3]


@pytest.mark.parametrize("fork_min_tokens", [1, 1000])
def test_pool_rows_are_freed_with_the_trees(tiny_model, char_tok, fork_min_tokens):
    eng = CascadeEngine(tiny_model, char_tok, SamplingParams(temperature=1.0), seed=1, eos_token_ids=[])
    eng.fork_min_tokens = fork_min_tokens
    trees = grow(eng, [[2, 5, 6, 7], [2, 9]])
    pools = [eng._tails, *eng._levels]
    assert any(len(p.free) < p.rows for p in pools)  # the last level's states hold rows
    Engine.release(trees)
    gc.collect()
    assert all(len(p.free) == p.rows for p in pools)
    rows = [p.rows for p in pools]
    grow(eng, [[2, 5, 6, 7], [2, 9]])  # a second run of the same size reuses the rows
    assert [p.rows for p in pools] == rows


def _filled_pool(rows: int, lens: dict[int, int]):
    """A 2-layer pool of ``rows`` rows; row r holds ``lens[r]`` positions of value 10r + layer + 1."""
    pool = KVPool(layers=2, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    pool.reserve(rows, 3)
    slots = pool.alloc(rows)
    for s in slots:
        n = lens.get(s.row, 0)
        for li in range(2):
            pool.K[li][s.row, :, :n] = float(10 * s.row + li + 1)
        pool.lens[s.row] = n
    return pool, slots


def _contents(pool, slots):
    """Each slot's used positions (layer 1) as a list, and its length."""
    return {id(s): (pool.K[1][s.row, :, : int(pool.lens[s.row])].tolist(), int(pool.lens[s.row])) for s in slots}


def test_kv_pool_pack_moves_used_positions():
    """pack() gathers the slots into one window of rows, moving as few used positions as
    it can: a group already in one stretch stays put; otherwise the outliers move into the
    window's free rows, or swap with other owners' rows there."""
    pool, (a, b, c, d) = _filled_pool(4, {0: 1, 2: 2, 3: 3})
    before = _contents(pool, (c, d))
    pool.release(a)
    pool.release(b)
    assert pool.pack([c, d]) == 2  # rows 2 and 3 already form a window: nothing moves
    assert (c.row, d.row) == (2, 3) and _contents(pool, (c, d)) == before

    pool, s = _filled_pool(6, {0: 1, 1: 2, 2: 3, 4: 2, 5: 1})
    group = [s[0], s[1], s[5]]  # 3 rows: the window [0, 3) holds 3 of their 4 used positions
    before, other = _contents(pool, group), _contents(pool, [s[2]])
    assert pool.pack(group) == 0
    assert sorted(x.row for x in group) == [0, 1, 2] and (s[0].row, s[1].row) == (0, 1)
    assert s[2].row == 5  # the other owner in the window swapped out to the vacated row
    assert _contents(pool, group) == before and _contents(pool, [s[2]]) == other
    assert before[id(s[5])][0] == [[[52.0, 52.0]]] and other[id(s[2])][1] == 3  # 10r + layer + 1 at r = 5, layer 1
    pool.release(s[0])
    pool.release(s[1])
    # Rows 0 and 1 are free now, but s[4] and s[2] lie in rows 4 and 5: they stay there.
    assert pool.pack([s[4], s[2]]) == 4 and (s[4].row, s[2].row) == (4, 5)
    # A group of fresh (empty) rows and one used row: the window is the used row's.
    assert pool.pack([s[3], s[2]]) == 4 and s[2].row == 5 and s[3].row == 4 and s[4].row == 3


def test_copy_positions_with_slices_and_indices():
    """Consecutive rows become slices; copies through slices equal indexed copies, also
    within one store with overlapping rows (sources are read first)."""
    assert row_index([3, 4, 5]) == slice(3, 6)
    assert row_index([3, 5]).tolist() == [3, 5] and row_index([5, 4]).tolist() == [5, 4]
    t = torch.arange(4 * 1 * 3 * 1, dtype=torch.float32).view(4, 1, 3, 1)  # row r holds 3r..3r+2
    old = t.clone()
    copy_positions(t, row_index([1, 2, 3]), t, row_index([0, 1, 2]), 2)  # shift rows down by one
    assert t[1:, 0, :2, 0].tolist() == old[:3, 0, :2, 0].tolist() and t[0].tolist() == old[0].tolist()
    assert t[:, 0, 2].tolist() == old[:, 0, 2].tolist()  # positions past n untouched
    dst = torch.zeros(3, 1, 4, 1)
    copy_positions(dst, row_index([0, 1]), old, row_index([3, 0]), 2, at=1)  # slice <- index, at an offset
    assert dst[:, 0, :, 0].tolist() == [[0, 9, 10, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    copy_positions(dst, row_index([2, 0]), old, row_index([1, 2]), 1)  # index <- slice
    assert dst[:, 0, 0, 0].tolist() == [6, 0, 3]


def test_level_groups_readers_by_block_in_row_order():
    """_Level: blocks packed in the pool's front rows, each block's readers (rows of the
    call) in row order, padded with B; rows that read no block point at the dummy slot."""
    pool = KVPool(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    pool.reserve(4, 3)
    sa, sb, sc = pool.alloc(3)  # rows 0, 1, 2
    A, B, _ = Block(0, sa, 2), Block(0, sb, 3), Block(0, sc, 1)
    (bid, blocks), = CascadeEngine._chain_index([(B,), (), (A,), (B,), (A,), (), (B,)])
    assert bid.tolist() == [0, -1, 1, 0, 1, -1, 0] and blocks == [B, A]
    lv = _Level(bid, blocks, pool, (1, 1))
    # by pool row: A (row 0) read by rows 2, 4; B (row 1) by rows 0, 3, 6; S = 3, padding 7
    assert lv.members_orig.tolist() == [[2, 4, 7], [0, 3, 6]]
    assert lv.dummy == 6
    assert lv.slot_orig.tolist() == [3, 6, 0, 4, 1, 6, 5]
    assert lv.layers[0][0].shape == (2, 1, 3, 2)  # N blocks x the longest block
    assert lv.mask[:, 0, 0].tolist() == [[0.0, 0.0, float("-inf")], [0.0, 0.0, 0.0]]
    lv.index(torch.tensor([0, 2, 3, 6]), torch.device("cpu"))  # rows 1, 4, 5 dead
    assert lv.members.tolist() == [[1, 4, 4], [0, 2, 3]] and lv.inverse.tolist() == [3, 0, 4, 5]
    assert lv.gather[2] is None  # every live row reads a block here


def test_level_attends_blocks_in_place_unless_most_rows_are_unread():
    """_Level packs only when at least half the pool rows of the window from the first to the
    last block read are unread; otherwise it attends the window in place and an unread row in
    between has no readers and length 0."""
    pool = KVPool(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    pool.reserve(4, 3)
    slots = pool.alloc(4)  # rows 0-3
    blocks = [Block(0, s, n) for s, n in zip(slots, (2, 3, 1, 3))]
    pool.lens[:] = torch.tensor([2, 3, 1, 3])  # positions in use: what a pack moves
    # Rows 0 and 2 read: 2 of the 3 rows up to row 2 -> in place, row 1 unread.
    lv = _Level(torch.tensor([0, 2, 0]), blocks, pool, (1, 1))
    assert [s.row for s in slots] == [0, 1, 2, 3]
    assert lv.members_orig.tolist() == [[0, 2], [3, 3], [1, 3]]  # S = 2, padding B = 3
    assert lv.slot_orig.tolist() == [0, 4, 1]
    assert lv.mask[:, 0, 0].tolist() == [[0.0, 0.0], [float("-inf")] * 2, [0.0, float("-inf")]]
    # Rows 2 and 3 read: the window [2, 4) is all read -> attended in place (nothing moves),
    # window row 0 = pool row 2.
    pool.K[0][2, 0, :3] = 5.0
    lv = _Level(torch.tensor([3, 2, -1]), blocks, pool, (1, 1))
    assert [s.row for s in slots] == [0, 1, 2, 3]
    assert lv.layers[0][0].shape == (2, 1, 3, 2)
    assert torch.equal(lv.layers[0][0][0, 0], torch.full((3, 2), 5.0))
    assert lv.members_orig.tolist() == [[1], [0]]  # S = 1: window row 0 <- query 1, row 1 <- query 0
    assert lv.slot_orig.tolist() == [1, 0, 2]  # query 2 reads no block: the dummy slot N*S = 2
    assert lv.mask[:, 0, 0].tolist() == [[0.0, float("-inf"), float("-inf")], [0.0, 0.0, 0.0]]
    # Rows 0 and 3 read: 2 of 4 rows -> packed into the two-row window that holds the most
    # used positions, [2, 4) (row 3 has 3, row 0 has 2): block 0 swaps with block 2.
    pool.K[0][3, 0, :3] = 7.0
    pool.K[0][0, 0, :2] = 4.0
    lv = _Level(torch.tensor([3, -1, 0]), blocks, pool, (1, 1))
    assert [s.row for s in slots] == [2, 1, 0, 3]
    assert lv.layers[0][0].shape == (2, 1, 3, 2)
    assert torch.equal(lv.layers[0][0][1, 0], torch.full((3, 2), 7.0))  # window row 1 = pool row 3
    assert torch.equal(lv.layers[0][0][0, 0, :2], torch.full((2, 2), 4.0))  # block 0, moved
    assert lv.slot_orig.tolist() == [1, 2, 0]  # S = 1; query 1 reads none -> dummy 2


def test_cascade_attention_equals_plain_softmax_attention():
    """Private keys + a grouped level (some rows read no block) == softmax over each row's
    concatenated keys, with GQA (4 query heads over 2 KV heads)."""
    torch.manual_seed(0)
    R, Hq, Hkv, D = 5, 4, 2, 8
    q = torch.randn(R, Hq, D)
    lens = torch.tensor([3, 1, 4, 2, 2])
    n = 6  # buffer rows: query r owns buffer row rows[r]; buffer row 5 is unused
    rows = torch.tensor([4, 0, 2, 1, 3])
    K, V = torch.randn(n, Hkv, 4, D), torch.randn(n, Hkv, 4, D)
    valid = torch.zeros(n, dtype=torch.long)
    valid[rows] = lens
    blocks_K, blocks_V = torch.randn(2, Hkv, 3, D), torch.randn(2, Hkv, 3, D)
    blen = torch.tensor([3, 2])
    reads = [0, 1, None, 0, 1]  # row 2 reads no block
    members = torch.tensor([[0, 3], [1, 4]])
    inverse = torch.tensor([0, 2, 4, 1, 3])  # slots; 4 = N*S: no block
    level = (blocks_K, blocks_V, key_mask(blen, 3)) + level_indices(members, inverse, Hq, Hkv)
    out = cascade_attention(q, (K, V, key_mask(valid, 4), rows), [level])
    for r in range(R):
        keys = [K[rows[r], :, : lens[r]]]
        vals = [V[rows[r], :, : lens[r]]]
        if reads[r] is not None:
            keys.insert(0, blocks_K[reads[r], :, : blen[reads[r]]])
            vals.insert(0, blocks_V[reads[r], :, : blen[reads[r]]])
        k, v = torch.cat(keys, 1), torch.cat(vals, 1)  # [Hkv, T, D]
        k, v = k.repeat_interleave(Hq // Hkv, 0), v.repeat_interleave(Hq // Hkv, 0)
        ref = torch.softmax(q[r][:, None, :] @ k.transpose(-1, -2), -1) @ v
        assert torch.allclose(out[r], ref[:, 0], atol=1e-5)


def test_level_indices_by_hand():
    """2 blocks x 2 slots, 4 query heads over 2 KV heads (g = 2), 3 queries: query 0 reads
    block 1 (slot 0), query 2 block 0 (slot 1), query 1 none; slots (0, 0) and (1, 1) pad."""
    members = torch.tensor([[3, 2], [0, 3]])
    inverse = torch.tensor([2, 4, 1])
    qidx, sidx, none = level_indices(members, inverse, 4, 2)
    # grouped slot (n, h, s, j) <- flat query row members[n, s] * 4 + h * 2 + j (padding -> query 0)
    assert qidx.view(2, 2, 2, 2).tolist() == [
        [[[0, 1], [8, 9]], [[2, 3], [10, 11]]],
        [[[0, 1], [0, 1]], [[2, 3], [2, 3]]],
    ]
    # query r, head h*2+j <- grouped row ((n*2 + h)*2 + s)*2 + j
    assert sidx.view(3, 4).tolist() == [[8, 9, 12, 13], [0, 1, 4, 5], [2, 3, 6, 7]]
    assert none.view(-1).tolist() == [False, True, False]
    assert level_indices(torch.tensor([[0, 1]]), torch.tensor([0, 1]), 4, 2)[2] is None


def test_unsupported_models_keep_the_copy_engine(char_tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    assert "gpt2" in unsupported_reason(gpt2)
    with pytest.raises(ValueError, match="cannot decode this model"):
        CascadeEngine(gpt2, char_tok)
    cfg = make_cfg(max_len=8, segment_length=4, max_depth=2, width=4)
    eng = make_engine(cfg, gpt2, char_tok, seed=0)  # the factory picks the copy engine
    assert type(eng) is Engine
    trees = eng.new_trees([[1, 5, 6]])
    TreePOSampler(cfg).grow(eng, trees)
    assert len(trees[0].leaves()) == 4


def test_treepo_trees_are_the_same_with_cascade_and_copy(model):  # noqa: F811
    trees = {}
    for sharing in ("cascade", "copy"):
        cfg = make_cfg(max_len=24, segment_length=4, max_depth=6, width=8, kv_sharing=sharing)
        eng = make_engine(cfg, model, TOK, seed=5)
        trees[sharing] = eng.new_trees(prompts(3))
        TreePOSampler(cfg).grow(eng, trees[sharing])
        assert type(eng) is (CascadeEngine if sharing == "cascade" else Engine)
    for a, b in zip(trees["cascade"], trees["copy"]):
        assert [a[i].token_ids for i in range(len(a))] == [b[i].token_ids for i in range(len(b))]
        assert [a[i].parent for i in range(len(a))] == [b[i].parent for i in range(len(b))]


@pytest.mark.parametrize("cap", [8, 12, 20])
def test_row_capacity_bounds_every_round(model, cap):  # noqa: F811
    """Under max_rows_in_flight every round decodes at most ``cap`` rows, prompts are
    served as capacity frees up, and every prompt still ends with exactly ``width`` leaves."""
    cfg = make_cfg(max_len=24, segment_length=4, max_depth=6, width=8, max_rows_in_flight=cap)
    eng = make_engine(cfg, model, TOK, seed=2)
    view_calls = []
    s = TreePOSampler(cfg)
    orig = CascadeEngine._decode

    def spy(self, rows, limits, keep_kv):
        view_calls.append(len(rows))
        return orig(self, rows, limits, keep_kv)

    CascadeEngine._decode = spy
    try:
        trees = eng.new_trees(prompts(5))
        s.grow(eng, trees)
    finally:
        CascadeEngine._decode = orig
    assert max(view_calls) <= cap
    assert len(view_calls) > 6  # 5 prompts of up to 8 rows do not fit in one round
    for t in trees:
        t.validate()
        assert len(t.leaves()) == 8
        assert all(t[l].finish_reason in FinishReason.COMPLETED | FinishReason.TRUNCATED for l in t.leaves())
    for rnd in s.trace:
        assert all(f + i <= 8 for i, f in rnd)


def test_row_capacity_below_width_is_rejected():
    from segrl.configs import ConfigError

    with pytest.raises(ConfigError, match="max_rows_in_flight"):
        TreePOSampler(make_cfg(width=8, max_rows_in_flight=4))


def test_factory_engine_crops_spo_chain_boundaries_like_the_copy_engine(tiny_model, char_tok):
    """The factory's pool engine serves SPO-chain too: a boundary state inside a cached
    trajectory is a crop of it (no prefill), and while a call fits in max_batch_size it
    samples the same tokens as the copy engine from the same seed."""
    from segrl.configs import SegrlConfig
    from segrl.samplers.partition import FixedPartition
    from segrl.samplers.spo_chain import SPOChainSampler

    def scorer(refs):
        for t, leaf in refs:
            t[leaf].reward = float(t.completion_len(leaf) % 2)
        return {}

    out = {}
    for kv in ("copy", "cascade"):
        cfg = SegrlConfig()
        cfg.sampling.kv_sharing = kv
        eng = make_engine(cfg, tiny_model, char_tok, seed=4, params=SamplingParams(temperature=1.0))
        assert type(eng) is (Engine if kv == "copy" else CascadeEngine)
        trees = eng.new_trees([[2, 5, 6, 7], [2, 9, 10]])
        m = SPOChainSampler(FixedPartition(4), 3, 2, max_completion_length=14).sample(eng, trees, scorer)
        assert eng.stats.prefill_tokens == 3 + 2 and eng.stats.kv_crops == m["mc/states"] > 0
        for t in trees:
            for leaf in t.leaves():
                ref = full_forward_logprobs(tiny_model, t, leaf)
                assert torch.allclose(ref, torch.tensor(t.path_logprobs(leaf)), atol=1e-4)
        out[kv] = [[(n.token_ids, n.finish_reason) for n in t.nodes] for t in trees]
    assert out["copy"] == out["cascade"]
