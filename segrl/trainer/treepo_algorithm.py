"""TreePO as a training algorithm (``segrl train --algo treepo``; arXiv 2508.17445).

* rollout: :class:`~segrl.samplers.treepo.TreePOSampler` segment trees, then DAPO dynamic
  sampling: prompts whose leaves all have the same *raw* correctness (``info['correct']``,
  not the shaped reward) are dropped and the batch is topped up with more prompts, for at most
  ``treepo.max_extra_rounds`` extra generation rounds;
* advantages: :mod:`segrl.algos.treepo` (sub-group averaging over the tree, then batch
  whitening or group-std scaling), broadcast to every token (or per segment);
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
from ..algos.treepo import (
    normalize_token_advantages,
    normalize_tree_advantages,
    segment_token_advantages,
    tree_subgroups,
    treepo_advantage,
    treepo_segment_advantages,
)
from ..samplers.treepo import TreePOSampler, tree_metrics
from .algorithms import Algorithm, register_algorithm


def mixed_correctness(tree) -> bool:
    """True if the tree's leaves do not all have the same raw correctness (DAPO's filter)."""
    vals = {float(tree[l].info.get("correct", tree[l].reward or 0.0)) for l in tree.leaves(include_mc=False)}
    return len(vals) > 1


@register_algorithm("treepo")
class TreePO(Algorithm):
    """TreePO: tree sampling + tree advantages + DAPO update (see module docstring)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sampler = TreePOSampler(cfg)  # validates the cross-section settings up front
        #: running keep rate of dynamic sampling (sizes the first generation round)
        self.keep_rate: float | None = None

    def state_dict(self) -> dict:
        return {"keep_rate": self.keep_rate}

    def load_state_dict(self, state: dict) -> None:
        self.keep_rate = state.get("keep_rate", self.keep_rate)

    # ----- rollout with dynamic sampling -------------------------------------------------
    def rollout(self, engine, trees, scorer):
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
                batch += self.new_trees(want - target)
        while True:
            m = self.sampler.sample(engine, batch, scorer)
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
            batch = self.new_trees(max(n, missing))
            extra += 1
        kept = kept[:target]
        if tp.dynamic_sampling:
            frac = sum(map(mixed_correctness, sampled)) / max(len(sampled), 1)
            self.keep_rate = frac if self.keep_rate is None else 0.7 * self.keep_rate + 0.3 * frac
        metrics = _weighted_mean(calls)
        metrics.update(tree_metrics(sampled))
        metrics["tree/rounds"] = float(sum(m.get("tree/rounds", 0.0) for m, _ in calls))
        leaves = [(t, l) for t in sampled for l in t.leaves(include_mc=False)]
        metrics["dynamic/prompts_sampled"] = float(len(sampled))
        metrics["dynamic/prompts_kept"] = float(len(kept))
        metrics["dynamic/extra_rounds"] = float(extra)
        metrics["dynamic/kept_fraction"] = sum(map(mixed_correctness, sampled)) / max(len(sampled), 1)
        metrics["dynamic/keep_rate_ema"] = float(self.keep_rate or 0.0)
        metrics["dynamic/correct_all"] = sum(float(t[l].info.get("correct", 0.0)) for t, l in leaves) / max(len(leaves), 1)
        metrics["dynamic/reward_all"] = sum(float(t[l].reward or 0.0) for t, l in leaves) / max(len(leaves), 1)
        metrics["_trees"] = kept
        return metrics

    # ----- advantages -> samples ----------------------------------------------------------
    def samples(self, trees):
        tp, t = self.cfg.treepo, self.cfg.train
        idx = tree_subgroups(trees, dedup=tp.dedup_subgroups) if trees else None
        if idx is None or not idx.refs:
            if tp.normalization == "batch_whiten":  # torchrun: the other ranks wait for this one's sums
                segrl_dist.global_mean_std(torch.zeros(0))
            return [], {}
        rewards = torch.tensor([float(tr[l].reward) for tr, l in idx.refs], dtype=torch.float64)
        raw = treepo_advantage(
            rewards, idx.pair_leaf, idx.pair_group, idx.is_root,
            aggregation=tp.advantage_aggregation,
            reject_zero_std=tp.reject_zero_std_subgroups,
            include_root=tp.include_root,
        )
        for (tree, leaf), a in zip(idx.refs, raw.tolist()):
            tree[leaf].info["advantage"] = float(a)  # saved with the tree: the raw (unnormalised) tree advantage
        if tp.advantage_level == "trajectory":
            adv = normalize_tree_advantages(raw, tp.normalization, idx.lengths, rewards, idx.group, stats=segrl_dist.global_mean_std)
            values = adv.tolist()
            out = [
                trajectory_sample(tree, leaf, float(a), t.mask_truncated_completions, self.rho)
                for (tree, leaf), a in zip(idx.refs, values)
            ]
            flat = adv
        else:
            seg: dict[int, dict[int, float]] = {}
            for tree in trees:
                r = {l: float(tree[l].reward) for l in tree.leaves(include_mc=False)}
                seg[id(tree)] = treepo_segment_advantages(tree, r)
                for node, a in seg[id(tree)].items():
                    tree[node].info["advantage"] = float(a)  # a segment's own credit (leaves: their segment's)
            per_leaf = [segment_token_advantages(tree, leaf, seg[id(tree)]) for tree, leaf in idx.refs]
            per_leaf = normalize_token_advantages(per_leaf, tp.normalization, rewards, idx.group, stats=segrl_dist.global_mean_std)
            out = [
                trajectory_sample(tree, leaf, a, t.mask_truncated_completions, self.rho)
                for (tree, leaf), a in zip(idx.refs, per_leaf)
            ]
            flat = torch.tensor([x for row in per_leaf for x in row] or [0.0], dtype=torch.float64)
        metrics = {
            "advantages/mean": float(flat.mean()),
            "advantages/std": float(flat.std()) if flat.numel() > 1 else 0.0,
            "advantages/raw_abs_mean": float(raw.abs().mean()),
            "advantages/zero_fraction": float((raw.abs() < 1e-12).to(torch.float64).mean()),
        }
        return out, metrics


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
