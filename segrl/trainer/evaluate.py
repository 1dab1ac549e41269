"""Held-out evaluation: pass@1 (mean over k samples), pass@k and maj@k.

:func:`evaluate_config` is the evaluation a config describes; the trainer's evaluations
(before, during, after) and ``segrl eval`` both run it, so the same model, config and seed
give the same figures.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from ..engine.base import SamplingParams
from ..engine.registry import make_engine
from ..models.loading import encode_prompt
from ..samplers.group import sample_groups
from ..samplers.registry import make_sampler
from ..tasks.base import Task


@dataclass
class EvalResult:
    pass_at_1: float  # mean correctness over all samples
    pass_at_k: float  # fraction of problems with at least one correct sample
    maj_at_k: float  # fraction of problems whose majority answer is correct
    num_problems: int
    k: int
    tokens: int  # tokens decoded
    mean_length: float

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        k = self.k
        return {
            f"{prefix}pass@1": self.pass_at_1,
            f"{prefix}pass@{k}": self.pass_at_k,
            f"{prefix}maj@{k}": self.maj_at_k,
            f"{prefix}tokens": float(self.tokens),
            f"{prefix}mean_length": self.mean_length,
        }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def majority_correct(answers: Sequence[str | None], correct: Sequence[float]) -> float:
    """1.0 if the most frequent non-empty answer is a correct one (ties: first seen)."""
    votes = Counter(a for a in answers if a is not None and a != "")
    if not votes:
        return 0.0
    top = votes.most_common(1)[0][0]
    return max(c for a, c in zip(answers, correct) if a == top)


def _last_line(text: str) -> str | None:
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else None


def evaluate(
    model,
    tokenizer,
    task: Task,
    num_problems: int = 200,
    k: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    top_p: float = 1.0,
    seed: int = 0,
    max_batch_size: int = 512,
    rows: Sequence[dict] | None = None,
    sampler=None,
    cfg=None,
) -> EvalResult:
    """Sample ``k`` completions for each of the first ``num_problems`` test rows and grade them.

    ``sampler(engine, trees)`` may replace independent sampling (e.g. TreePO trees); it must
    leave ``k`` leaves per tree. ``cfg`` (a :class:`~segrl.configs.SegrlConfig`) picks the
    rollout engine (``sampling.backend``, ``sampling.kv_sharing``); default: the ``hf`` backend.
    """
    rows = list(rows if rows is not None else task.test)[:num_problems]
    params = SamplingParams(temperature=temperature, top_p=top_p, stop_strings=tuple(task.stop_strings))
    if cfg is None:
        from ..configs import SegrlConfig

        cfg = SegrlConfig()
    engine = make_engine(cfg, model, tokenizer, seed=seed, params=params, max_batch_size=max_batch_size)
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]  # chat template if set up
    trees = engine.new_trees(prompts, rows)
    if sampler is None:
        sample_groups(engine, trees, k, max_new_tokens)
    else:
        sampler(engine, trees)
    comps, prm, cols, owners = [], [], {}, []
    for t in trees:
        for leaf in t.leaves(include_mc=False):
            comps.append(tokenizer.decode(t.path_token_ids(leaf, include_prompt=False), skip_special_tokens=True))
            prm.append(t.row["prompt"])
            owners.append(t.group)
            for key, v in t.row.items():
                if key != "prompt":
                    cols.setdefault(key, []).append(v)
    scores = [0.0 if s is None else float(s) for s in task.correctness(prm, comps, **cols)]
    extract = task.extract_answer or _last_line
    per: dict[int, list[tuple[str | None, float]]] = {}
    for g, c, s in zip(owners, comps, scores):
        per.setdefault(g, []).append((extract(c), s))
    p1 = sum(scores) / max(len(scores), 1)
    pk = sum(1.0 for v in per.values() if any(s > 0.5 for _, s in v)) / max(len(per), 1)
    mk = sum(majority_correct([a for a, _ in v], [s for _, s in v]) for v in per.values()) / max(len(per), 1)
    ntok = sum(t.num_generated_tokens() for t in trees)
    lens = [t.completion_len(leaf) for t in trees for leaf in t.leaves(include_mc=False)]
    return EvalResult(p1, pk, mk, len(per), k, ntok, sum(lens) / max(len(lens), 1))


#: evaluation samples draw from their own stream, apart from the training rollouts' (seed + 1009 * rank)
EVAL_SEED_OFFSET = 7919


def evaluate_config(model, tokenizer, task: Task, cfg) -> EvalResult:
    """:func:`evaluate` with the settings of a :class:`~segrl.configs.SegrlConfig`: ``eval.*``
    (problems, samples, temperature, rollout), the sampling limits, and the seed
    ``train.seed + EVAL_SEED_OFFSET``."""
    e = cfg.eval
    sampler = make_sampler(e.rollout, cfg, width=e.num_samples)  # exactly num_samples leaves per problem
    return evaluate(
        model,
        tokenizer,
        task,
        num_problems=e.num_problems,
        k=e.num_samples,
        temperature=cfg.sampling.temperature if e.temperature is None else e.temperature,
        max_new_tokens=cfg.sampling.max_completion_length,
        top_p=cfg.sampling.top_p,
        seed=cfg.train.seed + EVAL_SEED_OFFSET,
        max_batch_size=cfg.sampling.max_batch_size,
        sampler=sampler,
        cfg=cfg,
    )
