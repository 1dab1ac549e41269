"""TreePO sampler rules as pure functions: branch budget and allocation, the "mumbling"
detector, fallback priorities, and the ``tree/*`` metrics of sampled trees
(Li et al., arXiv 2508.17445; used by :mod:`segrl.samplers.treepo`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from ..tree import FinishReason, NodeInfo, RolloutTree

#: fallback "finished_first" priority (code: finished 7 > unclosed 6 > EOS 5 > steps 4 > tokens 3 > repetition 2)
FINISH_PRIORITY = {
    FinishReason.ANSWER: 7,
    FinishReason.EOS: 5,
    FinishReason.STOP: 5,
    FinishReason.DEPTH: 4,
    FinishReason.LENGTH: 3,
    FinishReason.REPETITION: 2,
}
ALL_REASONS = (FinishReason.ANSWER, FinishReason.EOS, FinishReason.STOP, FinishReason.LENGTH, FinishReason.DEPTH, FinishReason.REPETITION)


def branch_budget(width: int, finished: int, finished_this_round: int, active: int, divergence: int) -> int:
    """Children a prompt grows next round (the code's "budget" with branching budget transfer).

    ``min(width - finished, divergence * (finished_this_round + active))``, but never fewer
    than ``active`` (every active path continues). Paths that finished this round donate their
    ``divergence`` branches to the prompt's still-active paths.
    """
    b = min(width - finished, divergence * finished_this_round + divergence * active)
    return max(b, active)


def allocate_branches(budget: int, weights: Sequence[float], generator: torch.Generator | None = None) -> list[int]:
    """Split ``budget`` children over paths with ``weights``: >= 1 each, the rest by the
    largest-remainder method (code: ``weight_to_discrete_allocate``).

    Ties in the remainders are broken at random with ``generator`` (by position without one).
    """
    n = len(weights)
    if n == 0:
        return []
    if budget < n:
        raise ValueError(f"budget {budget} < {n} paths (every path needs a child)")
    total = float(sum(weights))
    w = [1.0 / n] * n if total <= 0 or not math.isfinite(total) else [x / total for x in weights]
    rest = budget - n
    shares = [x * rest for x in w]
    base = [int(math.floor(s + 1e-9)) for s in shares]
    rem = rest - sum(base)
    tie = torch.rand(n, generator=generator).tolist() if generator is not None else [0.0] * n
    order = sorted(range(n), key=lambda i: (-(shares[i] - base[i]), tie[i], i))
    for i in order[:rem]:
        base[i] += 1
    return [1 + b for b in base]


def has_repetition(text: str, substring: int = 32, count: int = 8) -> bool:
    """TreePO's "mumbling" detector: some ``substring``-character string occurs at least
    ``count`` times (non-overlapping) in ``text``."""
    if len(text) < substring * count:
        return False
    grams = Counter(text[i : i + substring] for i in range(len(text) - substring + 1))
    return any(text.count(g) >= count for g, c in grams.items() if c >= count)


_MAX_TOKEN_CHARS: dict[int, int] = {}


def _text_decoder(tok) -> Callable[[list[int]], str]:
    """``tok.decode(ids, skip_special_tokens=True)``; for a ``tokenizers``-backed tokenizer
    that does no clean-up, the backend's own decode, which gives the same text without
    transformers' per-call argument conversion (a third of the time; the sampler decodes
    every finished path for the answer check)."""
    backend = getattr(tok, "_tokenizer", None)
    fast = type(tok).__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
    plain = fast and not getattr(tok, "clean_up_tokenization_spaces", True)
    if backend is not None and plain and hasattr(backend, "decode"):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tok.decode(ids, skip_special_tokens=True)



# ----- metrics -------------------------------------------------------------------------------
def tree_metrics(trees: Sequence[RolloutTree]) -> dict[str, float]:
    """``tree/*`` metrics of sampled trees: shape, finish reasons, token savings.

    ``tree/decoded_tokens`` counts each shared prefix once; ``tree/independent_equivalent_tokens``
    is what sampling the same leaves independently would decode; their ratio is
    ``tree/decoded_ratio`` (1 - ratio = the token saving).
    """
    leaves = [(t, l) for t in trees for l in t.leaves(include_mc=False)]
    n_prompts = max(len(trees), 1)
    decoded = sum(t.num_generated_tokens() for t in trees)
    indep = sum(t.independent_equivalent_tokens() for t in trees)
    fb = [t[0].info.get(NodeInfo.TREEPO, {}).get("fallback_points", 0) for t in trees]
    m = {
        "tree/depth_mean": sum(t[l].depth for t, l in leaves) / max(len(leaves), 1),
        "tree/depth_max": float(max((t[l].depth for t, l in leaves), default=0)),
        "tree/leaves": len(leaves) / n_prompts,
        "tree/fallbacks_per_prompt": sum(fb) / n_prompts,
        "tree/prompt_fallback_ratio": sum(1 for x in fb if x) / n_prompts,
        "tree/decoded_tokens": float(decoded),
        "tree/independent_equivalent_tokens": float(indep),
        "tree/decoded_ratio": decoded / indep if indep else 1.0,
    }
    for r in ALL_REASONS:
        m[f"tree/finish_reason/{r}"] = sum(1 for t, l in leaves if t[l].finish_reason == r) / max(len(leaves), 1)
    return m


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    """Uniform integer in ``[lo, hi]`` from the engine's generator (checkpointed with it)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))

