"""Token sampling: the two-level inverse-CDF draw equals the plain one for the same uniform
numbers (up to float32 rounding at token boundaries), zero-probability tokens are never drawn, recorded log-probs are log_softmax at the
temperature, top-k / top-p keep only their tokens, and ``order`` deals the draws in row order."""

from __future__ import annotations

import torch

from segrl.engine.sampling import CDF_BLOCK, inverse_cdf_sample, sample_tokens


def _reference_draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The textbook inverse CDF: first index whose float64 cumulative mass exceeds u * total."""
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)


def test_two_level_draw_equals_the_full_cumulative_sum():
    V = 5 * CDF_BLOCK + 76  # a partial last block (padding)
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2048, V, generator=g) ** 6
    probs[:, ::7] = 0.0  # zero-probability tokens, some at block boundaries
    probs[:64, CDF_BLOCK : 2 * CDF_BLOCK] = 0.0  # a whole empty block
    probs[64:128] = 0.0
    probs[64:128, CDF_BLOCK - 1] = 1.0  # all mass on the last entry of a block
    probs[128:192] = 0.0
    probs[128:192, V - 1] = 2.0  # all mass on the last token (inside the padded block)
    u = torch.rand(2048, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    tok = inverse_cdf_sample(probs, torch.Generator().manual_seed(5))
    # Block masses are float32 sums: a uniform within ~1e-4 of a token boundary may land on
    # the neighbouring token (1 of these 2048 draws; a bug shifts whole blocks instead).
    same = tok == _reference_draw(probs, u)
    assert int((~same).sum()) <= 3
    assert bool((probs.gather(-1, tok[:, None]) > 0).all())
    assert bool((tok[64:128] == CDF_BLOCK - 1).all()) and bool((tok[128:192] == V - 1).all())


def test_two_level_draw_has_the_right_frequencies():
    V = 3000
    p = torch.rand(V, generator=torch.Generator().manual_seed(1)) ** 4
    p[::7] = 0.0
    tok = inverse_cdf_sample(p[None].expand(200_000, V).contiguous(), torch.Generator().manual_seed(2))
    freq = torch.bincount(tok, minlength=V).double() / tok.numel()
    assert freq[::7].sum() == 0
    # total variation vs the target: ~0.033 from 200k draws (torch.multinomial gets the same)
    assert float((freq - p.double() / p.sum()).abs().sum() / 2) < 0.045


def test_logprob_is_log_softmax_at_the_temperature_and_truncation_keeps_its_tokens():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(256, 2 * 4 * CDF_BLOCK, generator=g) * 3
    ref = torch.log_softmax(logits / 0.7, -1)
    for top_k, top_p in ((0, 1.0), (5, 1.0), (0, 0.5), (20, 0.9)):
        tok, lp = sample_tokens(logits, 0.7, top_p, top_k, g)
        assert torch.allclose(lp, ref.gather(-1, tok[:, None]).squeeze(-1), atol=1e-5)
        if top_k:
            assert bool((logits.gather(-1, tok[:, None]) >= logits.topk(top_k, -1).values[:, -1:]).all())
        if top_p < 1.0:  # the mass of the tokens ranked above the drawn one is < top_p
            probs = ref.exp()
            above = (probs * (probs > probs.gather(-1, tok[:, None]))).sum(-1)
            assert bool((above < top_p).all())
    tok, lp = sample_tokens(logits, 0.0)  # greedy: argmax, log-prob at temperature 1
    assert torch.equal(tok, logits.argmax(-1))
    assert torch.allclose(lp, torch.log_softmax(logits, -1).max(-1).values, atol=1e-5)


def test_order_deals_the_draws_in_row_order():
    logits = torch.randn(64, 3000, generator=torch.Generator().manual_seed(4))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(6))
    want, want_lp = sample_tokens(logits, 1.0, generator=torch.Generator().manual_seed(9))
    # batch position b holds row perm[b]; its rank in row order is perm[b]
    got, got_lp = sample_tokens(logits[perm], 1.0, generator=torch.Generator().manual_seed(9), order=perm)
    assert torch.equal(got, want[perm]) and torch.allclose(got_lp, want_lp[perm])


def test_logits_with_a_huge_spread_sample_the_top_tokens():
    """Gaps beyond the exp floor (80 nats) do not change what is drawn or the log-prob."""
    logits = torch.full((512, 5000), -1000.0)
    logits[:, 7], logits[:, 9] = 0.0, -1.0  # p = e^0 : e^-1 between the two, ~0 elsewhere
    logits[:256, 11] = float("-inf")
    tok, lp = sample_tokens(logits, 1.0, generator=torch.Generator().manual_seed(8))
    assert set(tok.tolist()) == {7, 9}
    assert abs(float((tok == 7).double().mean()) - 1 / (1 + torch.e**-1)) < 0.06
    ref = torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    assert torch.allclose(lp, ref, atol=1e-5)

