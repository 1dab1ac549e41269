"""Token sampling from logits: temperature, top-k, top-p, and the log-prob we record.

Everything runs where the logits are (CPU or GPU) with the engine's generator on that
device: no ``[rows x vocab]`` copy to the host; only the sampled ids go there.

The recorded log-prob is ``log_softmax(logits / temperature)`` of the sampled token, before
top-k/top-p truncation. That is what the trainer recomputes (TRL does the same), so the PPO
ratio of the first iteration is exactly 1.
"""

from __future__ import annotations

import torch

#: Logit gaps below the row's maximum are floored here before ``exp``: an LM's logits span
#: far more than 87 nats, and exp's denormal results (gaps beyond ~87) are several times
#: slower on x86 CPUs. A floored
#: token weighs e^-80 ~ 2e-35 of the top one; tokens removed by top-k/top-p stay exactly 0.
EXP_FLOOR = -80.0


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    Args:
        logits: ``[B, V]`` next-token logits.
        temperature: 0 means greedy (argmax); the recorded log-prob is then at temperature 1.
        top_p: nucleus mass kept (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        order: ``[B]`` rank of each row in the order the random draws are dealt (default:
            row order); a batch kept in another order then samples what it would in row order.
    Returns:
        ``(tokens [B], logprobs [B])``.
    """
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        lp = torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
        return tok, lp
    scaled = logits / temperature if temperature != 1.0 else logits
    # log_softmax(x)[tok] = x[tok] - (max + log sum exp(x - max)); the unnormalised exp(x - max)
    # is also what an untruncated draw samples from (one pass over [B, V] instead of three).
    top = scaled.amax(-1, keepdim=True)
    weights = (scaled - top).clamp_(min=EXP_FLOOR).exp_()
    log_z = top + torch.log(weights.sum(-1, keepdim=True))
    truncate = (top_k and 0 < top_k < scaled.shape[-1]) or top_p < 1.0
    if truncate:
        filt = scaled
        if top_k and 0 < top_k < filt.shape[-1]:
            kth = torch.topk(filt, top_k, dim=-1).values[:, -1:]
            filt = filt.masked_fill(filt < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, idx = torch.sort(filt, descending=True, dim=-1)
            sp = torch.softmax(sorted_logits, -1)
            # Drop tokens once the mass *before* them already reaches top_p (keeps >= 1 token).
            drop = (sp.cumsum(-1) - sp) >= top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            filt = torch.full_like(filt, float("-inf")).scatter(-1, idx, sorted_logits)
        weights = (filt - top).clamp_(min=EXP_FLOOR).exp_().masked_fill_(filt == float("-inf"), 0.0)
    tok = inverse_cdf_sample(weights, generator, order)
    return tok, (scaled.gather(-1, tok[:, None]) - log_z).squeeze(-1)


#: Vocabulary entries per block of the two-level draw in :func:`inverse_cdf_sample`.
CDF_BLOCK = 256


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None = None, order: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row from ``probs [B, V]`` (non-negative, rows need not sum to 1): the first
    index whose cumulative mass exceeds a uniform draw in ``[0, total)``.

    Same distribution as ``torch.multinomial(probs, 1)``, but one random number per row
    instead of one per vocabulary entry (multinomial's cost on the CPU grows with the
    vocabulary). A large vocabulary is searched in two levels: the float64 cumulative
    sum of per-block masses picks a block of :data:`CDF_BLOCK` entries, then the cumulative
    sum inside that block picks the entry (a full float64 cumsum over ``[B, V]`` is the
    slow part otherwise). Cumulative sums are in float64 and a zero-probability entry
    never raises them, so it is never drawn."""
    B, V = probs.shape
    u = torch.rand(B, 1, generator=generator, dtype=torch.float64, device=probs.device)
    if order is not None:
        u = u[order.to(probs.device, non_blocking=True)]
    if V <= 4 * CDF_BLOCK:
        cdf = probs.double().cumsum(-1)
        tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
        return tok.clamp_(max=V - 1)
    nb = -(-V // CDF_BLOCK)
    if nb * CDF_BLOCK != V:
        probs = torch.nn.functional.pad(probs, (0, nb * CDF_BLOCK - V))
    blocks = probs.view(B, nb, CDF_BLOCK)
    # Block masses summed in float32 (a float64 reduction over [B, V] is much slower); an
    # all-zero block still sums to exactly 0.
    cdf = blocks.sum(-1).double().cumsum(-1)  # [B, nb]
    u = u * cdf[:, -1:]
    blk = torch.searchsorted(cdf, u, right=True).clamp_(max=nb - 1)  # [B, 1]
    before = torch.where(blk > 0, cdf.gather(-1, (blk - 1).clamp(min=0)), 0.0)
    inner = blocks[torch.arange(B, device=probs.device), blk[:, 0]]  # [B, CDF_BLOCK]
    j = torch.searchsorted(inner.double().cumsum(-1), u - before, right=True)
    # Rounding can put the residual at or past the block's own total: take its last
    # positive entry then (never a zero-probability one).
    last = CDF_BLOCK - 1 - (inner > 0).flip(-1).int().argmax(-1, keepdim=True)
    j = torch.where(j >= CDF_BLOCK, last, j)
    return (blk * CDF_BLOCK + j).squeeze(-1).clamp_(max=V - 1)
