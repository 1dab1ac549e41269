"""Policy losses and loss aggregation: pure tensor functions (verl ``core_algos`` style).

Shapes: ``[B, T]`` per-token tensors for ``B`` sequences of ``T`` response positions, with a
``mask`` marking the tokens that are trained (response tokens, minus whatever the probability
mask or truncation masking removed).

The aggregations (TRL's ``loss_type``) are registered in
:data:`~segrl.algos.registry.LOSS_AGGREGATIONS` with one signature,
``f(per_token [B, T], mask [B, T], norm: LossNormalizer) -> scalar``: summed over all the
micro-batches of a step, the returned values give the batch loss whatever the micro-batch
size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import LOSS_AGGREGATIONS


@dataclass
class LossNormalizer:
    """Batch-wide counts that make the loss independent of micro-batch size.

    The trainer fills these over the *whole* optimisation batch (all micro-batches, all ranks)
    before the first backward, as TRL does for ``dapo`` (``num_items_in_batch``).
    """

    num_tokens: float  # masked tokens in the whole batch
    num_sequences: float  # sequences in the whole batch
    num_micro_batches: int = 1
    max_completion_length: int = 1


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate per token (Schulman et al. 2017), with DAPO's clip-higher
    (``epsilon_high``, arXiv 2503.14476) and dual clip for negative advantages (``dual_clip``
    = c, Ye et al. 2020: the loss of an A<0 token is capped at ``-A * c``).

    Returns ``(per_token_loss [B, T], flags)`` where flags are boolean ``[B, T]`` tensors
    ``low_clipped`` / ``high_clipped`` (TRL's ``clip_ratio/*`` definitions) and ``ratio``.
    """
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    un = ratio * advantages
    cl = torch.clamp(ratio, 1 - epsilon, 1 + eps_hi) * advantages
    loss = -torch.min(un, cl)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -advantages * dual_clip), loss)
    flags = {
        "ratio": ratio.detach(),
        "low_clipped": ((ratio < 1 - epsilon) & (advantages < 0)).detach(),
        "high_clipped": ((ratio > 1 + eps_hi) & (advantages > 0)).detach(),
    }
    return loss, flags


@LOSS_AGGREGATIONS.register("grpo")
def grpo_loss(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean (GRPO paper, arXiv 2402.03300).
    ``[B, T], [B, T] -> []``."""
    seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return seq.sum() / max(norm.num_sequences, 1)


@LOSS_AGGREGATIONS.register("bnpo")
def bnpo_loss(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
    """Token mean within each micro-batch, averaged over micro-batches (TRL's ``bnpo``).
    ``[B, T], [B, T] -> []``."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1) / max(norm.num_micro_batches, 1)


@LOSS_AGGREGATIONS.register("dr_grpo")
def dr_grpo_loss(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
    """Token sum / (sequences x ``max_completion_length``) (Dr. GRPO, arXiv 2503.20783).
    ``[B, T], [B, T] -> []``."""
    return (per_token * mask).sum() / (max(norm.num_sequences, 1) * norm.max_completion_length)


@LOSS_AGGREGATIONS.register("dapo")
def dapo_loss(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
    """Token sum / masked tokens of the whole batch (DAPO's token-level mean, arXiv 2503.14476).
    ``[B, T], [B, T] -> []``."""
    return (per_token * mask).sum() / max(norm.num_tokens, 1)


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, norm: LossNormalizer) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss of one micro-batch to the scalar to backprop with the
    ``loss_type`` aggregation (:data:`~segrl.algos.registry.LOSS_AGGREGATIONS`)."""
    if loss_type not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_type must be one of {LOSS_AGGREGATIONS.names()}, got {loss_type!r}")
    return LOSS_AGGREGATIONS[loss_type](per_token, mask.to(per_token.dtype), norm)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    norm: LossNormalizer,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    dual_clip: float | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    kl_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss plus optional ``beta * k3`` KL, aggregated by ``loss_type``.

    Args:
        logp, old_logp, advantages, mask: ``[B, T]``; ``advantages`` are per token.
        kl_mask: tokens that carry the KL term (default: ``mask``). SPO gates the KL with the
            probability mask too, which is what passing ``mask`` does.
    Returns:
        ``(loss, sums)``: the scalar to backprop and *sums* (not means) of diagnostic values
        over this micro-batch's masked tokens, for the trainer to normalise batch-wide.
    """
    per_tok, flags = clipped_surrogate(logp, old_logp, advantages, epsilon, epsilon_high, dual_clip)
    m = mask.bool()
    sums = {
        "tokens": float(m.sum()),
        "clip_ratio/low": float((flags["low_clipped"] & m).sum()),
        "clip_ratio/high": float((flags["high_clipped"] & m).sum()),
        "clip_ratio/region": float(((flags["low_clipped"] | flags["high_clipped"]) & m).sum()),
    }
    if beta and ref_logp is not None:
        km = m if kl_mask is None else kl_mask.bool()
        kl = k3_kl(logp, ref_logp)
        per_tok = per_tok + beta * torch.where(km, kl, torch.zeros_like(kl))
        sums["kl"] = float((kl.detach() * km).sum())
        sums["kl_tokens"] = float(km.sum())
    return aggregate_loss(per_tok, mask, loss_type, norm), sums
