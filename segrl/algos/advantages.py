"""Outcome advantage estimators and whitening: pure tensor functions (verl ``core_algos`` style).

Every function in :data:`~segrl.algos.registry.OUTCOME_ESTIMATORS` has one signature::

    f(rewards [N], index [N], *, scale_rewards: str = "group", stats: MeanStd | None = None) -> [N]

``rewards``: one scalar per trajectory; ``index``: the prompt (group) id of each trajectory;
``scale_rewards``: ``group`` | ``batch`` | ``none`` (``train.scale_rewards``); ``stats``:
batch ``(count, mean, std)`` of a tensor (default: this process's; under torchrun every
rank's, :func:`segrl.distributed.global_mean_std`). Tree estimators (SPO, TreePO) live in
:mod:`segrl.algos.spo` and :mod:`segrl.algos.treepo`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .registry import OUTCOME_ESTIMATORS

Tensor = torch.Tensor
#: ``stats(values, weights) -> (count, mean, unbiased std)``: batch statistics of a tensor
MeanStd = Callable[[torch.Tensor, torch.Tensor], tuple[float, float, float]]


def _group_stats(x: torch.Tensor, index: torch.Tensor, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element group mean, group std (unbiased: 0 for singleton groups) and group size."""
    _, inv, counts = torch.unique(index, return_inverse=True, return_counts=True)
    n = counts.to(x.dtype)
    s = torch.zeros(len(counts), dtype=x.dtype).index_add_(0, inv, x)
    mean = s / n
    sq = torch.zeros(len(counts), dtype=x.dtype).index_add_(0, inv, (x - mean[inv]) ** 2)
    if unbiased:
        std = torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(n))
    else:
        std = (sq / n).sqrt()
    return mean[inv], std[inv], n[inv]


def _scale(
    adv: torch.Tensor,
    rewards: torch.Tensor,
    group_std: torch.Tensor,
    scale: str,
    eps: float,
    stats: MeanStd | None,
    unbiased: bool = True,
) -> torch.Tensor:
    """Divide by the group std, the batch std (from ``stats``), or nothing (``scale_rewards``)."""
    if scale == "group":
        return adv / (group_std + eps)
    if scale == "batch":
        n, _, std = (stats or weighted_mean_std)(rewards, torch.ones_like(rewards))
        if n < 2:
            return adv
        if not unbiased:
            std *= ((n - 1) / n) ** 0.5
        return adv / (std + eps)
    if scale == "none":
        return adv
    raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")


@OUTCOME_ESTIMATORS.register("grpo")
def grpo_advantage(rewards: Tensor, index: Tensor, scale_rewards: str = "group", stats: MeanStd | None = None, eps: float = 1e-4) -> Tensor:
    """GRPO group-relative advantage (Shao et al. 2024, arXiv 2402.03300; TRL semantics).

    ``A_i = (r_i - mean(r_group)) / (std + eps)`` where ``std`` is

    * ``"group"``: the unbiased std of the trajectory's own group (GRPO paper, TRL default);
    * ``"batch"``: the unbiased std over the whole batch (Hu et al. 2025, REINFORCE++ style);
    * ``"none"``: no scaling (Dr. GRPO, arXiv 2503.20783).

    Args:
        rewards: ``[N]`` one scalar reward per trajectory.
        index: ``[N]`` the group (prompt) id of each trajectory.
        stats: batch statistics for ``batch`` (see the module docstring).
    Returns:
        ``[N]`` advantages.
    """
    mean, std, _ = _group_stats(rewards, index)
    return _scale(rewards - mean, rewards, std, scale_rewards, eps, stats)


@OUTCOME_ESTIMATORS.register("rloo")
def rloo_advantage(rewards: Tensor, index: Tensor, scale_rewards: str = "none", stats: MeanStd | None = None, eps: float = 1e-4) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv 2402.14740).

    ``A_i = r_i - mean_{j != i, same group} r_j = n/(n-1) * (r_i - mean(r_group))``.
    Singleton groups get 0. RLOO has no per-group std (TRL's ``RLOOTrainer``): ``group`` and
    ``none`` leave the advantages unscaled, ``batch`` divides by the batch reward std.

    Shapes: ``rewards [N]``, ``index [N]`` -> ``[N]``.
    """
    mean, std, n = _group_stats(rewards, index)
    adv = torch.where(n > 1, n / (n - 1).clamp(min=1) * (rewards - mean), torch.zeros_like(rewards))
    return _scale(adv, rewards, std, "batch" if scale_rewards == "batch" else "none", eps, stats)


@OUTCOME_ESTIMATORS.register("spo_grpo")
def spo_grpo_advantage(
    rewards: Tensor, index: Tensor, scale_rewards: str = "group", stats: MeanStd | None = None, eps: float = 1e-8
) -> Tensor:
    """GRPO as the SPO reference code computes its baseline (Guo et al., arXiv 2505.23564;
    ``math_episode_generator_with_group_advantages.py``, ``adv_method=grpo``):
    ``(r - mean) / (std + 1e-8)`` with the *population* std (``ddof=0``) of the group.

    It differs from :func:`grpo_advantage` (unbiased std, ``eps`` 1e-4) only in the scale:
    with 8 samples a group std is ``sqrt(7/8)`` of the unbiased one, so advantages are ~7%
    larger; a group of equal rewards still gets 0. ``scale_rewards``: ``group`` (the
    reference), ``batch`` (population std of the batch), ``none``.

    Shapes: ``rewards [N]``, ``index [N]`` -> ``[N]``.
    """
    mean, std, _ = _group_stats(rewards, index, unbiased=False)
    return _scale(rewards - mean, rewards, std, scale_rewards, eps, stats, unbiased=False)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, stats: MeanStd | None = None) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (unbiased variance).

    The statistics come from every masked entry passed in: the caller chooses the scope
    (a whole batch, one group), never an accident of micro-batch size. Unmasked entries are
    returned unchanged. Used by SPO (token whitening) and TreePO (REINFORCE++ batch norm).
    ``stats``: computes ``(count, mean, std)`` instead of :func:`weighted_mean_std` (under
    torchrun, :func:`segrl.distributed.global_mean_std`: the batch spans every rank).
    """
    n, mean, std = (stats or weighted_mean_std)(values, mask)
    if n < 2:
        return values
    out = (values - mean) / torch.sqrt(torch.tensor(std**2 + eps, dtype=values.dtype))
    return torch.where(mask.bool(), out, values)


def weighted_mean_std(values: torch.Tensor, weights: torch.Tensor) -> tuple[float, float, float]:
    """``(sum of weights, weighted mean, unbiased weighted std)`` of ``values`` (float64):
    with 0/1 weights the count, mean and std of the selected entries; with token counts as
    weights the statistics of the values broadcast to their tokens."""
    x = values.detach().to(torch.float64).flatten()
    w = weights.detach().to(torch.float64).flatten()
    n = float(w.sum())
    if n <= 0:
        return 0.0, 0.0, 0.0
    mean = float((x * w).sum()) / n
    var = float((((x - mean) ** 2) * w).sum()) / (n - 1) if n > 1 else 0.0
    return n, mean, var**0.5
