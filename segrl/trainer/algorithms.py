"""Algorithms: how a batch of prompt trees is rolled out and turned into training samples.

An :class:`Algorithm` owns two steps of the training loop:

1. :meth:`Algorithm.rollout` grows the trees with the engine and asks the scorer for the
   rewards of their leaves;
2. :meth:`Algorithm.samples` turns the scored trees into :class:`TrainSample` s with
   per-token advantages (pure estimator functions from ``segrl.algos``).

Algorithms register by name (``@register_algorithm("grpo")``); SPO and TreePO register from
their own modules. ``segrl train --algo NAME`` picks one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..algos.advantages import get_advantage
from ..algos.samples import TrainSample, trajectory_sample
from ..engine.hf_engine import Engine
from ..samplers.group import sample_groups
from ..tree import RolloutTree

ALGORITHMS: dict[str, type["Algorithm"]] = {}

#: ``scorer(refs)`` sets ``tree[leaf].reward`` for each ``(tree, leaf)`` and returns metrics.
Scorer = Callable[[Sequence[tuple[RolloutTree, int]]], dict]


def register_algorithm(name: str):
    def deco(cls):
        ALGORITHMS[name] = cls
        cls.name = name
        return cls

    return deco


def get_algorithm(name: str) -> type["Algorithm"]:
    _import_plugins()
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}") from None


def _import_plugins() -> None:
    # SPO / TreePO register themselves on import; they are optional modules.
    import importlib

    for mod in ("segrl.trainer.spo_algorithms", "segrl.trainer.treepo_algorithm"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


class Algorithm:
    """Base class; ``cfg`` is the whole :class:`~segrl.configs.SegrlConfig`."""

    name = "base"
    #: whether the probability mask is on when ``train.use_prob_mask`` is left unset
    default_prob_mask = False

    def __init__(self, cfg):
        self.cfg = cfg
        t = cfg.train
        self.use_prob_mask = self.default_prob_mask if t.use_prob_mask is None else t.use_prob_mask
        self.rho = t.prob_mask_rho if self.use_prob_mask else None

    #: set by the trainer: ``new_trees(n)`` returns root trees for ``n`` more prompts (with
    #: group ids unique within the step), for dynamic sampling that tops a batch up
    new_trees: Callable[[int], list[RolloutTree]]

    def rollout(self, engine: Engine, trees: list[RolloutTree], scorer: Scorer) -> dict:
        """Grow ``trees`` and score their leaves; return metrics. To train on a different
        set of trees (dynamic sampling), return it under the key ``"_trees"``."""
        raise NotImplementedError

    def samples(self, trees: list[RolloutTree]) -> tuple[list[TrainSample], dict]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """JSON-serialisable state that must survive a resume (default: none)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # Shared by the outcome-reward algorithms -----------------------------------------
    def _leaf_arrays(self, trees):
        refs = [(t, leaf) for t in trees for leaf in t.leaves(include_mc=False)]
        rewards = torch.tensor([float(t[leaf].reward) for t, leaf in refs], dtype=torch.float64)
        index = torch.tensor([t.group for t, _ in refs])
        return refs, rewards, index


def _outcome_advantage(fn, rewards: torch.Tensor, index: torch.Tensor, scale: str, eps: float = 1e-4) -> torch.Tensor:
    """``fn(rewards, index, scale_rewards=scale)``; under torchrun ``batch`` scaling divides by
    the reward std over *all* ranks' trajectories (groups never span ranks, so group
    statistics are already exact locally)."""
    from .. import distributed as segrl_dist

    if scale == "batch" and segrl_dist.get_world_size() > 1:
        n, _, std = segrl_dist.global_mean_std(rewards)
        adv = fn(rewards, index, scale_rewards="none")
        return adv / (std + eps) if n > 1 else adv
    return fn(rewards, index, scale_rewards=scale)


@register_algorithm("grpo")
class GRPO(Algorithm):
    """GRPO (arXiv 2402.03300) with TRL's options; ``train.rollout=treepo`` samples the
    group as a TreePO segment tree instead ("GRPO w/ TreePO sampling")."""

    def rollout(self, engine, trees, scorer):
        if self.cfg.train.rollout == "treepo":
            from ..samplers.treepo import TreePOSampler  # optional: registered by TreePO

            return TreePOSampler(self.cfg).sample(engine, trees, scorer)
        sample_groups(engine, trees, self.cfg.train.num_generations, self.cfg.sampling.max_completion_length)
        return scorer([(t, leaf) for t in trees for leaf in t.leaves()])

    def advantages(self, rewards: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return _outcome_advantage(get_advantage("grpo"), rewards, index, self.cfg.train.scale_rewards)

    def samples(self, trees):
        refs, rewards, index = self._leaf_arrays(trees)
        adv = self.advantages(rewards, index)
        for (tree, leaf), a in zip(refs, adv.tolist()):
            tree[leaf].info["advantage"] = float(a)  # saved with the tree (rollouts.jsonl, the tree viewer)
        t = self.cfg.train
        out = [
            trajectory_sample(tree, leaf, float(a), t.mask_truncated_completions, self.rho)
            for (tree, leaf), a in zip(refs, adv.tolist())
        ]
        return out, {"advantages/mean": float(adv.mean()), "advantages/std": float(adv.std()) if len(adv) > 1 else 0.0}


@register_algorithm("rloo")
class RLOO(GRPO):
    """REINFORCE leave-one-out baseline (arXiv 2402.14740). As in TRL's RLOO, advantages are
    not std-scaled unless ``train.scale_rewards`` is ``batch``."""

    def advantages(self, rewards, index):
        scale = "batch" if self.cfg.train.scale_rewards == "batch" else "none"
        return _outcome_advantage(get_advantage("rloo"), rewards, index, scale)
