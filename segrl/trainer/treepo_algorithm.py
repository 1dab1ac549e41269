"""TreePO as a training algorithm (``segrl train --algo treepo``; arXiv 2508.17445).

* rollout: :class:`~segrl.samplers.treepo.TreePOSampler` segment trees (or ``train.rollout``),
  then DAPO dynamic sampling: prompts whose leaves all have the same *raw* correctness
  (``NodeInfo.CORRECT``, not the shaped reward) are dropped and the batch is topped up with
  more prompts from the prompt stream, for at most ``treepo.max_extra_rounds`` extra rounds;
* advantages: the ``treepo`` tree estimator (:mod:`segrl.algos.treepo`: sub-group averaging
  over the tree; ``treepo_segment`` per segment, or ``train.adv_estimator``), then batch
  whitening or group-std scaling (``treepo.normalization``);
* update: the trainer's clipped policy gradient with DAPO's settings.

**Algorithm defaults.** TreePO trains with DAPO's objective: clip-higher ``epsilon`` 0.2 /
``epsilon_high`` 0.28, dual clip ``c = 10``, token-mean aggregation (``loss_type: dapo``),
no KL (``beta: 0``). These live in the recipe ``segrl/recipes/treepo.yaml``, which
:func:`segrl.configs.load_config` (and so the CLI) layers *under* the user's YAML file and
command line: an explicit ``--train.epsilon_high 0.2`` or ``--train.dual_clip none`` wins.
A config built directly in Python (``SegrlConfig(...)``) gets no recipe; use
``load_config(overrides={"train.algo": "treepo"})`` to get them.
"""

from __future__ import annotations

import math

import torch

from .. import distributed as segrl_dist
from ..algos.samples import trajectory_sample
from ..algos.treepo import normalize_token_advantages, normalize_tree_advantages
from ..samplers.treepo_rules import tree_metrics
from ..tree import NodeInfo
from .algorithms import Algorithm, Rollout, register_algorithm


def mixed_correctness(tree) -> bool:
    """True if the tree's leaves do not all have the same raw correctness (DAPO's filter)."""
    vals = {float(tree[l].info.get(NodeInfo.CORRECT, tree[l].reward or 0.0)) for l in tree.leaves(include_mc=False)}
    return len(vals) > 1


@register_algorithm("treepo")
class TreePO(Algorithm):
    """TreePO: tree sampling + tree advantages + DAPO update (see module docstring)."""

    default_sampler = "treepo"
    config_section = "treepo"

    @classmethod
    def own_estimator(cls, cfg) -> str:
        return "treepo_segment" if cfg.treepo.advantage_level == "segment" else "treepo"

    def __init__(self, cfg, prompts=None):
        super().__init__(cfg, prompts)
        #: running keep rate of dynamic sampling (sizes the first generation round)
        self.keep_rate: float | None = None

    def state_dict(self) -> dict:
        return {"keep_rate": self.keep_rate}

    def load_state_dict(self, state: dict) -> None:
        self.keep_rate = state.get("keep_rate", self.keep_rate)

    # ----- rollout with dynamic sampling -------------------------------------------------
    def rollout(self, engine, trees, scorer, progress=None) -> Rollout:
        tp = self.cfg.treepo
        target = len(trees)
        sampled, kept = [], []
        calls: list[tuple[dict, int]] = []
        batch, extra = list(trees), 0
        if tp.dynamic_sampling and self.keep_rate is not None:
            # DAPO samples a larger generation batch up front (3x in the script); here its size
            # follows the observed keep rate, so that one round usually suffices.
            want = min(math.ceil(tp.oversample * target), math.ceil(1.1 * target / max(self.keep_rate, 1e-3)))
            if want > target:
                batch += self._more(want - target)
        while True:
            m = super().rollout(engine, batch, scorer, progress).metrics
            calls.append((m, sum(len(t.leaves(include_mc=False)) for t in batch)))
            sampled.extend(batch)
            if not tp.dynamic_sampling:
                kept = list(batch)
                break
            kept.extend(t for t in batch if mixed_correctness(t))
            if len(kept) >= target or extra >= tp.max_extra_rounds:
                break
            missing = target - len(kept)
            rate = len(kept) / len(sampled)
            cap = math.ceil(tp.oversample * missing)
            n = cap if rate == 0 else min(cap, math.ceil(missing / rate))
            batch = self._more(max(n, missing))
            extra += 1
        kept = kept[:target]
        if tp.dynamic_sampling:
            frac = sum(map(mixed_correctness, sampled)) / max(len(sampled), 1)
            self.keep_rate = frac if self.keep_rate is None else 0.7 * self.keep_rate + 0.3 * frac
        return Rollout(kept, self._rollout_metrics(calls, sampled, kept, extra))

    def _more(self, n: int):
        if self.prompts is None:
            raise ValueError("TreePO dynamic sampling needs more prompts: pass prompts= (a PromptStream) to TreePO")
        return self.prompts.next_trees(n)

    def _rollout_metrics(self, calls, sampled, kept, extra: int) -> dict[str, float]:
        metrics = _weighted_mean(calls)
        metrics.update(tree_metrics(sampled))
        metrics["tree/rounds"] = float(sum(m.get("tree/rounds", 0.0) for m, _ in calls))
        leaves = [(t, l) for t in sampled for l in t.leaves(include_mc=False)]
        metrics["dynamic/prompts_sampled"] = float(len(sampled))
        metrics["dynamic/prompts_kept"] = float(len(kept))
        metrics["dynamic/extra_rounds"] = float(extra)
        metrics["dynamic/kept_fraction"] = sum(map(mixed_correctness, sampled)) / max(len(sampled), 1)
        metrics["dynamic/keep_rate_ema"] = float(self.keep_rate or 0.0)
        metrics["dynamic/correct_all"] = sum(float(t[l].info.get(NodeInfo.CORRECT, 0.0)) for t, l in leaves) / max(len(leaves), 1)
        metrics["dynamic/reward_all"] = sum(float(t[l].reward or 0.0) for t, l in leaves) / max(len(leaves), 1)
        return metrics

    # ----- advantages -> samples ----------------------------------------------------------
    def samples(self, trees):
        tp, t = self.cfg.treepo, self.cfg.train
        adv = self.estimate(trees)
        if not adv.refs:
            if tp.normalization == "batch_whiten":  # torchrun: the other ranks wait for this one's sums
                segrl_dist.global_mean_std(torch.zeros(0))
            return [], {}
        rewards = torch.tensor([float(tr[l].reward) for tr, l in adv.refs], dtype=torch.float64)
        group = torch.tensor([tr.group for tr, _ in adv.refs], dtype=torch.long)
        if adv.scalar is not None:
            raw = torch.tensor(adv.scalar, dtype=torch.float64)
            lengths = torch.tensor(_completion_lengths(adv.refs), dtype=torch.long)
            flat = normalize_tree_advantages(raw, tp.normalization, lengths, rewards, group, stats=segrl_dist.global_mean_std)
            per_leaf: list = flat.tolist()
        else:
            per_leaf = [adv.tokens(i) for i in range(len(adv.refs))]
            per_leaf = normalize_token_advantages(per_leaf, tp.normalization, rewards, group, stats=segrl_dist.global_mean_std)
            flat = torch.tensor([x for row in per_leaf for x in row] or [0.0], dtype=torch.float64)
            raw = torch.tensor([a for i in range(len(adv.refs)) for a in adv.segments(i)], dtype=torch.float64)
        out = [
            trajectory_sample(tree, leaf, a, t.mask_truncated_completions, self.rho)
            for (tree, leaf), a in zip(adv.refs, per_leaf)
        ]
        metrics = {
            "advantages/mean": float(flat.mean()),
            "advantages/std": float(flat.std()) if flat.numel() > 1 else 0.0,
            "advantages/raw_abs_mean": float(raw.abs().mean()),
            "advantages/zero_fraction": float((raw.abs() < 1e-12).to(torch.float64).mean()),
        }
        return out, metrics


def _completion_lengths(refs) -> list[int]:
    """``tree.completion_len(leaf)`` of every ``(tree, leaf)``, one pass over each tree."""
    by_tree: dict[int, list[int]] = {}
    out = []
    for tree, leaf in refs:
        lens = by_tree.get(id(tree))
        if lens is None:
            lens = by_tree[id(tree)] = [0] * len(tree)
            for i in tree.subtree(0)[1:]:  # pre-order: parents first
                lens[i] = lens[tree[i].parent] + len(tree[i].token_ids)
        out.append(lens[leaf])
    return out


def _weighted_mean(calls: list[tuple[dict, int]]) -> dict[str, float]:
    """Per-key mean of several calls' metrics, weighted by their leaf counts."""
    tot: dict[str, float] = {}
    wt: dict[str, float] = {}
    for m, w in calls:
        for k, v in m.items():
            if isinstance(v, (int, float)):
                tot[k] = tot.get(k, 0.0) + float(v) * w
                wt[k] = wt.get(k, 0.0) + w
    return {k: tot[k] / wt[k] for k in tot if wt[k] > 0}
