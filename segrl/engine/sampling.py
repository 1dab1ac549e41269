"""Token sampling from logits: temperature, top-k, top-p, and the log-prob we record.

The recorded log-prob is ``log_softmax(logits / temperature)`` of the sampled token, before
top-k/top-p truncation. That is what the trainer recomputes (TRL does the same), so the PPO
ratio of the first iteration is exactly 1.
"""

from __future__ import annotations

import torch


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    Args:
        logits: ``[B, V]`` next-token logits.
        temperature: 0 means greedy (argmax); the recorded log-prob is then at temperature 1.
        top_p: nucleus mass kept (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
    Returns:
        ``(tokens [B], logprobs [B])``.
    """
    logits = logits.float()
    if temperature <= 0:
        tok = logits.argmax(-1)
        lp = torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
        return tok, lp
    scaled = logits / temperature
    logp = torch.log_softmax(scaled, -1)
    filt = scaled
    if top_k and top_k > 0 and top_k < filt.shape[-1]:
        kth = torch.topk(filt, top_k, dim=-1).values[:, -1:]
        filt = filt.masked_fill(filt < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(filt, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        # Drop tokens once the mass *before* them already reaches top_p (keeps >= 1 token).
        drop = (cum - torch.softmax(sorted_logits, -1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filt = torch.full_like(filt, float("-inf")).scatter(-1, idx, sorted_logits)
    tok = inverse_cdf_sample(torch.softmax(filt, -1), generator)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from ``probs [B, V]`` (rows need not sum to 1): the first index whose
    cumulative mass exceeds a uniform draw in ``[0, total)``.

    Same distribution as ``torch.multinomial(probs, 1)``, but one random number per row
    instead of one per vocabulary entry: on CPU with a 49k vocabulary multinomial took
    ~37 ms per step for 32 rows (a sixth of a SmolLM2-135M decode step), this ~2 ms.
    The cumulative sum is in float64, so a zero-probability token is never drawn."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return tok.clamp_(max=probs.shape[-1] - 1)
