"""SPO-chain segment partitions and the segment cap, against hand-worked boundaries."""

import math

import pytest

from segrl.algos.spo import chain_token_advantages
from segrl.configs import ConfigError, load_config
from segrl.samplers.partition import (
    CutpointPartition,
    FixedPartition,
    NewlinePartition,
    cap_boundaries,
    make_partition,
)


def lp(probs):
    return [math.log(p) for p in probs]


# positions:     0     1    2     3    4    5     6    7    8     9    10   11
PROBS = [0.95, 0.5, 0.99, 0.3, 0.2, 0.95, 0.1, 0.6, 0.97, 0.4, 0.8, 0.5]
# cutpoints (p < 0.9): 1, 3, 4, 6, 7, 9, 10, 11
TOKS = list(range(10, 22))


@pytest.mark.parametrize(
    "interval, want",
    [
        (1, [1, 3, 4, 6, 7, 9, 10, 11]),  # every cutpoint opens a segment
        (2, [1, 4, 7, 10]),  # 1st, 3rd, 5th, 7th cutpoint
        (5, [1, 9]),  # 1st and 6th
    ],
)
def test_cutpoint_intervals(interval, want):
    part = CutpointPartition(rho=0.9, interval=interval)
    assert part.cutpoints(lp(PROBS)) == [1, 3, 4, 6, 7, 9, 10, 11]
    assert part(TOKS, lp(PROBS)) == want


@pytest.mark.parametrize("interval", [1, 2, 5])
def test_no_cutpoint_means_no_segment_and_zero_advantage(interval):
    probs = [0.95, 0.99, 0.9, 0.91]  # p == rho is not below rho
    assert CutpointPartition(0.9, interval)([1, 2, 3, 4], lp(probs)) == []
    assert chain_token_advantages([], [], reward=1.0, length=4).tolist() == [0.0] * 4


@pytest.mark.parametrize("interval, want", [(1, [0, 2, 3]), (2, [0, 3]), (5, [0])])
def test_first_token_cutpoint_gives_the_prompt_state(interval, want):
    probs = [0.3, 0.99, 0.5, 0.7, 0.95]  # cutpoints 0, 2, 3
    assert CutpointPartition(0.9, interval)([1, 2, 3, 4, 5], lp(probs)) == want


def test_rho_is_a_setting():
    probs = [0.95, 0.5, 0.7, 0.2]
    assert CutpointPartition(0.9, 1)([1, 2, 3, 4], lp(probs)) == [1, 2, 3]
    assert CutpointPartition(0.6, 1)([1, 2, 3, 4], lp(probs)) == [1, 3]
    assert CutpointPartition(0.99, 1)([1, 2, 3, 4], lp(probs)) == [0, 1, 2, 3]


def test_cutpoint_segment_advantages_by_hand():
    # interval 2 on PROBS: boundaries 1, 4, 7, 10 with values 0.5, 0.25, 0.75, 1.0 and R = 0
    adv = chain_token_advantages([1, 4, 7, 10], [0.5, 0.25, 0.75, 1.0], 0.0, 12).tolist()
    assert adv == [0.0] + [-0.25] * 3 + [0.5] * 3 + [0.25] * 3 + [-1.0] * 2


def test_fixed_partition():
    assert FixedPartition(length=3)(list(range(8)), [0.0] * 8) == [0, 3, 6]
    assert FixedPartition(length=10)(list(range(8)), [0.0] * 8) == [0]
    assert FixedPartition(num_segments=4)(list(range(10)), [0.0] * 10) == [0, 2, 5, 7]
    assert FixedPartition(num_segments=4)(list(range(3)), [0.0] * 3) == [0, 1, 2]
    assert FixedPartition(length=3)([], []) == []


class LineTok:
    """Token i decodes to VOCAB[i]."""

    VOCAB = ["a", "b", "\n", "=", "1", "\n\n", "x\ny"]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.VOCAB[i] for i in ids)


def test_newline_partition():
    part = NewlinePartition(LineTok(), "\n")
    # "ab\n=1\n1"  -> lines start at 0, 3, 6; a final newline opens nothing
    assert part([0, 1, 2, 3, 4, 2, 4], [0.0] * 7) == [0, 3, 6]
    assert part([0, 1, 2, 3, 4, 2], [0.0] * 6) == [0, 3]
    # a token holding the newline inside it: the boundary follows that token
    assert part([0, 6, 1, 1], [0.0] * 4) == [0, 2]
    # a two-character delimiter spread over tokens cuts after its last token
    assert NewlinePartition(LineTok(), "\n\n")([0, 2, 2, 1, 5, 0], [0.0] * 6) == [0, 3, 5]


def test_cap_rules_by_hand():
    b = [1, 3, 4, 6, 7, 9, 10, 11]
    probs = [0.95, 0.5, 0.99, 0.3, 0.2, 0.95, 0.1, 0.6, 0.97, 0.4, 0.8, 0.5]
    assert cap_boundaries(b, 0, "even") == b  # 0 = no cap
    assert cap_boundaries(b, 8, "first") == b
    assert cap_boundaries(b, 3, "first") == [1, 3, 4]
    # even: indices floor(i * 7 / 2 + 1/2) = 0, 4, 7
    assert cap_boundaries(b, 3, "even") == [1, 7, 11]
    # m = 4: indices floor(i * 7 / 3 + 1/2) = 0, 2, 5, 7
    assert cap_boundaries(b, 4, "even") == [1, 4, 9, 11]
    assert cap_boundaries(b, 1, "even") == [1]
    # lowest_prob: p = .5 .3 .2 .1 .6 .4 .8 .5 -> three lowest at 6 (.1), 4 (.2), 3 (.3)
    assert cap_boundaries(b, 3, "lowest_prob", lp(probs)) == [3, 4, 6]
    # ties keep the earlier boundary: p(1) = p(11) = .5
    assert cap_boundaries(b, 5, "lowest_prob", lp(probs)) == [1, 3, 4, 6, 9]
    with pytest.raises(ValueError):
        cap_boundaries(b, 3, "lowest_prob")


def test_segment_cap_merges_segments():
    # capped to the first 2 boundaries: the second segment runs to the end
    bounds = cap_boundaries([1, 4, 7, 10], 2, "first")
    adv = chain_token_advantages(bounds, [0.5, 0.25], 1.0, 12).tolist()
    assert adv == [0.0] + [-0.25] * 3 + [0.75] * 8


def test_make_partition_from_config():
    cfg = load_config(overrides={"train.algo": "spo_chain", "spo.cutpoint_interval": "2"})
    part = make_partition(cfg.spo, 0.9)
    assert isinstance(part, CutpointPartition) and part.interval == 2
    cfg = load_config(overrides={"spo.partition": "fixed", "spo.fixed_num_segments": "4"})
    assert make_partition(cfg.spo, 0.9)(list(range(8)), [0.0] * 8) == [0, 2, 4, 6]
    cfg = load_config(overrides={"spo.partition": "newline"})
    with pytest.raises(ValueError):
        make_partition(cfg.spo, 0.9)  # needs a tokenizer
    assert isinstance(make_partition(cfg.spo, 0.9, LineTok()), NewlinePartition)


@pytest.mark.parametrize(
    "key, value",
    [
        ("spo.cutpoint_interval", "0"),
        ("spo.partition", "bogus"),
        ("spo.cap_rule", "random"),
        ("spo.max_segments", "-1"),
        ("spo.num_mc_samples", "0"),
        ("spo.branch_factors", "6,0,6"),
        ("spo.segment_length", "0"),
        ("spo.whiten", "microbatch"),
        ("spo.cutpoint_rho", "1.5"),
    ],
)
def test_config_validation(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        load_config(overrides={key: value})


def test_config_parses_branch_factors():
    cfg = load_config(overrides={"spo.branch_factors": "4,5,6"})
    assert cfg.spo.branch_factors == [4, 5, 6]
    assert load_config().spo.branch_factors == [6, 6, 6]
    assert load_config().spo.num_mc_samples == 9 and load_config().spo.cutpoint_interval == 5
