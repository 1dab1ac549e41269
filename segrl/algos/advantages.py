"""Advantage estimators: pure tensor functions in a name registry (verl's ``core_algos`` style).

Outcome estimators here take one reward per trajectory and the prompt (group) index of each
trajectory and return one advantage per trajectory. Tree estimators (SPO, TreePO) register
themselves from their own modules and work on :class:`~segrl.tree.RolloutTree` arrays.
"""

from __future__ import annotations

from typing import Callable

import torch

ADVANTAGE_ESTIMATORS: dict[str, Callable] = {}


def register_advantage(name: str):
    """Decorator: make an estimator available under ``name`` (``get_advantage(name)``)."""

    def deco(fn):
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} registered twice")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return deco


def get_advantage(name: str) -> Callable:
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise KeyError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGE_ESTIMATORS)}") from None


def _group_stats(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element group mean, unbiased group std (0 for singleton groups) and group size."""
    _, inv, counts = torch.unique(index, return_inverse=True, return_counts=True)
    n = counts.to(x.dtype)
    s = torch.zeros(len(counts), dtype=x.dtype).index_add_(0, inv, x)
    mean = s / n
    sq = torch.zeros(len(counts), dtype=x.dtype).index_add_(0, inv, (x - mean[inv]) ** 2)
    std = torch.where(n > 1, (sq / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(n))
    return mean[inv], std[inv], n[inv]


def _scale(adv: torch.Tensor, rewards: torch.Tensor, group_std: torch.Tensor, scale: str, eps: float) -> torch.Tensor:
    """Divide by the group std, the batch std, or nothing (``scale_rewards``)."""
    if scale == "group":
        return adv / (group_std + eps)
    if scale == "batch":
        return adv / (rewards.std() + eps) if rewards.numel() > 1 else adv
    if scale == "none":
        return adv
    raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale!r}")


@register_advantage("grpo")
def grpo_advantage(
    rewards: torch.Tensor,
    index: torch.Tensor,
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO group-relative advantage (Shao et al. 2024, arXiv 2402.03300; TRL semantics).

    ``A_i = (r_i - mean(r_group)) / (std + eps)`` where ``std`` is

    * ``"group"``: the unbiased std of the trajectory's own group (GRPO paper, TRL default);
    * ``"batch"``: the unbiased std over the whole batch (Hu et al. 2025, REINFORCE++ style);
    * ``"none"``: no scaling (Dr. GRPO, arXiv 2503.20783).

    Args:
        rewards: ``[N]`` one scalar reward per trajectory.
        index: ``[N]`` the group (prompt) id of each trajectory.
    Returns:
        ``[N]`` advantages.
    """
    mean, std, _ = _group_stats(rewards, index)
    return _scale(rewards - mean, rewards, std, scale_rewards, eps)


@register_advantage("rloo")
def rloo_advantage(rewards: torch.Tensor, index: torch.Tensor, scale_rewards: str = "none", eps: float = 1e-4) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv 2402.14740).

    ``A_i = r_i - mean_{j != i, same group} r_j = n/(n-1) * (r_i - mean(r_group))``.
    Singleton groups get 0. ``scale_rewards`` as in :func:`grpo_advantage` (default none).

    Shapes: ``rewards [N]``, ``index [N]`` -> ``[N]``.
    """
    mean, std, n = _group_stats(rewards, index)
    adv = torch.where(n > 1, n / (n - 1).clamp(min=1) * (rewards - mean), torch.zeros_like(rewards))
    return _scale(adv, rewards, std, scale_rewards, eps)


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


MeanStd = Callable[[torch.Tensor, torch.Tensor], tuple[float, float, float]]


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
