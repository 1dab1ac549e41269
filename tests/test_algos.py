import math

import pytest
import torch

from segrl.algos.advantages import masked_whiten
from segrl.algos.registry import OUTCOME_ESTIMATORS
from segrl.algos.losses import LossNormalizer, aggregate_loss, clipped_surrogate, k3_kl, policy_loss

R = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0], dtype=torch.float64)
IDX = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_grpo_group_scaling_by_hand():
    a = OUTCOME_ESTIMATORS["grpo"](R, IDX, scale_rewards="group")
    s0 = math.sqrt(1 / 3)  # unbiased std of (1,0,0,1)
    s1 = 0.5  # unbiased std of (1,1,1,0)
    want = [0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), 0.5 / (s0 + 1e-4)]
    want += [0.25 / (s1 + 1e-4)] * 3 + [-0.75 / (s1 + 1e-4)]
    assert torch.allclose(a, torch.tensor(want, dtype=torch.float64), atol=1e-9)


def test_grpo_batch_and_none_scaling_by_hand():
    sb = math.sqrt(1.875 / 7)  # unbiased std of all eight rewards (mean 0.625)
    a = OUTCOME_ESTIMATORS["grpo"](R, IDX, scale_rewards="batch")
    assert a[0].item() == pytest.approx(0.5 / (sb + 1e-4))
    assert a[7].item() == pytest.approx(-0.75 / (sb + 1e-4))
    n = OUTCOME_ESTIMATORS["grpo"](R, IDX, scale_rewards="none")
    assert n.tolist() == [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]
    with pytest.raises(ValueError):
        OUTCOME_ESTIMATORS["grpo"](R, IDX, scale_rewards="bogus")


def test_zero_std_group_gets_zero_advantage():
    a = OUTCOME_ESTIMATORS["grpo"](torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    assert a.abs().max() == 0


def test_rloo_by_hand():
    a = OUTCOME_ESTIMATORS["rloo"](R, IDX)
    assert torch.allclose(a, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0], dtype=torch.float64))


def test_masked_whiten_uses_only_masked_entries():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1, 1, 1, 0])
    w = masked_whiten(x, m)
    assert torch.allclose(w[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)  # mean 2, unbiased std 1
    assert w[3] == 100.0


def test_clipping_by_hand():
    lp = torch.tensor([[0.5, -0.5, 3.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    loss, flags = clipped_surrogate(lp, old, adv, epsilon=0.2)
    assert loss[0, 0].item() == pytest.approx(-1.2)  # ratio 1.65 clipped to 1.2
    assert loss[0, 1].item() == pytest.approx(0.8)  # ratio 0.61, A<0: pessimistic 0.8
    assert loss[0, 2].item() == pytest.approx(math.exp(3.0))
    assert flags["high_clipped"].tolist() == [[True, False, False]]
    assert flags["low_clipped"].tolist() == [[False, True, False]]
    hi, _ = clipped_surrogate(lp, old, adv, epsilon=0.2, epsilon_high=0.28)
    assert hi[0, 0].item() == pytest.approx(-1.28)
    dual, _ = clipped_surrogate(lp, old, adv, epsilon=0.2, dual_clip=10.0)
    assert dual[0, 2].item() == pytest.approx(10.0)


def test_k3_by_hand():
    assert k3_kl(torch.tensor(0.0), torch.tensor(-1.0)).item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert k3_kl(torch.tensor(-0.3), torch.tensor(-0.3)).item() == 0.0


# per-token losses [[1,2,3],[4,-,-]]: ratio 1 gives loss = -A
L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
M = torch.tensor([[1.0, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    "loss_type,whole,split",
    [("grpo", 3.0, 3.0), ("bnpo", 2.5, 3.0), ("dr_grpo", 10 / 8, 10 / 8), ("dapo", 2.5, 2.5)],
)
def test_loss_types_by_hand(loss_type, whole, split):
    norm = LossNormalizer(num_tokens=4, num_sequences=2, num_micro_batches=1, max_completion_length=4)
    zero = torch.zeros(2, 3)
    loss, _ = policy_loss(zero, zero, -L, M, norm, loss_type)
    assert loss.item() == pytest.approx(whole)
    # the same batch as two micro-batches of one sequence: sum of the parts
    norm2 = LossNormalizer(num_tokens=4, num_sequences=2, num_micro_batches=2, max_completion_length=4)
    parts = [aggregate_loss(L[i : i + 1], M[i : i + 1], loss_type, norm2) for i in range(2)]
    assert sum(p.item() for p in parts) == pytest.approx(split)


def test_kl_term_is_added_per_token():
    norm = LossNormalizer(num_tokens=2, num_sequences=1)
    lp = torch.zeros(1, 2)
    ref = torch.tensor([[-1.0, 0.0]])
    loss, sums = policy_loss(lp, lp, torch.zeros(1, 2), torch.ones(1, 2), norm, "dapo", beta=0.5, ref_logp=ref)
    assert loss.item() == pytest.approx(0.5 * math.exp(-1) / 2)
    assert sums["kl"] == pytest.approx(math.exp(-1))
