"""Algorithms: how a batch of prompt trees is rolled out and turned into training samples.

An :class:`Algorithm` combines a sampler (``train.rollout``; ``auto`` = its own), an
advantage estimator (``train.adv_estimator``; ``auto`` = its own) and what it does with
the advantages (normalisation, probability mask, which sequences are trained). A training
step is one-way::

    rollout = algorithm.rollout(engine, trees, scorer, progress)   # -> Rollout(trees, metrics)
    samples, metrics = algorithm.samples(rollout.trees)

1. :meth:`Algorithm.rollout` grows the trees with the sampler and scores their leaves;
2. :meth:`Algorithm.samples` computes the advantages once (:meth:`Algorithm.estimate`, pure
   functions from :mod:`segrl.algos.registry`) and turns the trees into
   :class:`TrainSample` s with per-token advantages.

Algorithms register by name (``@register_algorithm("grpo")``); SPO and TreePO register from
their own modules. ``segrl train --algo NAME`` picks one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .. import distributed as segrl_dist
from ..algos.registry import OUTCOME_ESTIMATORS, TREE_ESTIMATORS
from ..algos.samples import TrainSample, trajectory_sample
from ..configs import checks
from ..engine.base import RolloutEngine
from ..samplers.registry import make_sampler
from ..tree import NodeInfo, RolloutTree

ALGORITHMS: dict[str, type[Algorithm]] = {}

#: ``scorer(refs)`` sets ``tree[leaf].reward`` for each ``(tree, leaf)`` and returns metrics.
Scorer = Callable[[Sequence[tuple[RolloutTree, int]]], dict]


class PromptSource(Protocol):
    """Where an algorithm gets more prompts (:class:`~segrl.trainer.prompts.PromptStream`)."""

    def next_trees(self, n: int) -> list[RolloutTree]: ...


@dataclass
class Rollout:
    """What a rollout hands to the rest of the step: the trees to train on (dynamic sampling
    may have replaced the batch) and the sampling and reward metrics."""

    trees: list[RolloutTree]
    metrics: dict[str, float]


def register_algorithm(name: str):
    def deco(cls):
        ALGORITHMS[name] = cls
        cls.name = name
        return cls

    return deco


def get_algorithm(name: str) -> type[Algorithm]:
    _import_plugins()
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}") from None


def algorithm_names() -> tuple[str, ...]:
    _import_plugins()
    return tuple(ALGORITHMS)


def _import_plugins() -> None:
    # SPO / TreePO register themselves on import; they are optional modules.
    import importlib

    for mod in ("segrl.trainer.spo_algorithms", "segrl.trainer.treepo_algorithm"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


@dataclass
class Advantages:
    """The advantages of a batch's trajectories, computed once by :meth:`Algorithm.estimate`:
    ``refs`` (the ``N`` trajectory leaves ``(tree, leaf)`` in batch order) and the estimator's
    own form, exactly one of ``scalar`` (``[N]`` list: one value per trajectory), ``per_node``
    (``id(tree) -> [len(tree)]``: each segment's own value) or ``per_segment`` (``N`` lists of
    ``[depth]``: each segment's value on that trajectory)."""

    refs: list[tuple[RolloutTree, int]]
    scalar: list[float] | None = None
    per_node: dict[int, list[float]] | None = None
    per_segment: list[list[float]] | None = None

    def segments(self, i: int) -> list[float]:
        """The advantage of each segment on trajectory ``i``'s path (``path(leaf)[1:]``)."""
        tree, leaf = self.refs[i]
        if self.scalar is not None:
            return [self.scalar[i]] * tree[leaf].depth
        if self.per_node is not None:
            row = self.per_node[id(tree)]
            return [row[n] for n in tree.path(leaf)[1:]]
        return self.per_segment[i]

    def tokens(self, i: int) -> list[float]:
        """Per-token advantages of trajectory ``i`` (each segment's value on its tokens)."""
        tree, leaf = self.refs[i]
        out: list[float] = []
        for (_, a, b), v in zip(tree.segment_spans(leaf), self.segments(i)):
            out.extend([v] * (b - a))
        return out

    def trajectory(self, i: int) -> float | list[float]:
        """What :func:`trajectory_sample` takes: one value, or one per token."""
        return self.scalar[i] if self.scalar is not None else self.tokens(i)


class Algorithm:
    """Base class; ``cfg`` is the whole :class:`~segrl.configs.SegrlConfig`, ``prompts`` the
    stream dynamic sampling pulls more prompts from."""

    name = "base"
    #: the sampler of ``train.rollout=auto`` (a :mod:`segrl.samplers.registry` name)
    default_sampler = "group"
    #: samplers the algorithm trains with (None: any)
    samplers: tuple[str, ...] | None = None
    #: the estimator of ``train.adv_estimator=auto``
    default_estimator = "grpo"
    #: whether the probability mask is on when ``train.use_prob_mask`` is left unset
    default_prob_mask = False
    #: the config section of the algorithm's own settings (``segrl config ALGO`` shows it)
    config_section = "train"

    @classmethod
    def own_estimator(cls, cfg) -> str:
        return cls.default_estimator

    def __init__(self, cfg, prompts: PromptSource | None = None):
        checks.validate(cfg)
        self.cfg, self.prompts = cfg, prompts
        t = cfg.train
        self.use_prob_mask = self.default_prob_mask if t.use_prob_mask is None else t.use_prob_mask
        self.rho = t.prob_mask_rho if self.use_prob_mask else None
        self.estimator = checks.train_estimator(cfg)
        self.sampler = make_sampler(checks.train_sampler(cfg), cfg)

    def rollout(self, engine: RolloutEngine, trees: list[RolloutTree], scorer: Scorer, progress: float | None = None) -> Rollout:
        """Grow ``trees`` with the sampler and score every leaf (Monte-Carlo continuations
        included). ``progress``: fraction of training done (None outside training)."""
        metrics = self.sampler.sample(engine, trees, progress)
        scored = scorer([(t, leaf) for t in trees for leaf in t.leaves()])
        return Rollout(list(trees), {**scored, **metrics})

    def samples(self, trees: list[RolloutTree]) -> tuple[list[TrainSample], dict]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """JSON-serialisable state that must survive a resume (default: none)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ----- advantages: computed once, here -------------------------------------------------
    def estimate(self, trees: Sequence[RolloutTree]) -> Advantages:
        """Advantages of every trajectory with ``train.adv_estimator``; writes the raw values
        on the trees (``NodeInfo.ADVANTAGE``, node values) for ``rollouts.jsonl`` and the viewer."""
        refs = [(t, leaf) for t in trees for leaf in t.leaves(include_mc=False)]
        if self.estimator in OUTCOME_ESTIMATORS:
            rewards = torch.tensor([float(t[leaf].reward) for t, leaf in refs], dtype=torch.float64)
            adv = Advantages(refs, scalar=self.advantages(rewards, torch.tensor([t.group for t, _ in refs], dtype=torch.long)).tolist())
        else:
            est = TREE_ESTIMATORS[self.estimator](trees, self.cfg)
            scalar = est.per_trajectory.tolist() if est.per_trajectory is not None else None
            per_node = {id(t): row for t, row in zip(trees, est.per_node)} if est.per_node is not None else None
            adv = Advantages(refs, scalar, per_node, est.per_segment)
            for t, vals in zip(trees, est.values or []):
                for n, v in zip(t.nodes, vals):
                    if v == v:  # not NaN
                        n.value = v
        for i, (t, leaf) in enumerate(refs):  # saved with the tree (rollouts.jsonl, the tree viewer)
            if adv.scalar is not None:
                t[leaf].info[NodeInfo.ADVANTAGE] = adv.scalar[i]
            else:
                for node, v in zip(t.path(leaf)[1:], adv.segments(i)):
                    t[node].info[NodeInfo.ADVANTAGE] = v
        return adv

    def advantages(self, rewards: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The outcome estimator on ``rewards [N]`` grouped by ``index [N]``; ``batch``
        statistics over every rank under torchrun (a group never spans ranks)."""
        fn = OUTCOME_ESTIMATORS[self.estimator]
        return fn(rewards, index, scale_rewards=self.cfg.train.scale_rewards, stats=segrl_dist.global_mean_std)


@register_algorithm("grpo")
class GRPO(Algorithm):
    """GRPO (arXiv 2402.03300) with TRL's options; ``train.rollout=treepo`` samples the
    group as a TreePO segment tree instead ("GRPO w/ TreePO sampling")."""

    def samples(self, trees):
        adv = self.estimate(trees)
        t = self.cfg.train
        out = [
            trajectory_sample(tree, leaf, adv.trajectory(i), t.mask_truncated_completions, self.rho)
            for i, (tree, leaf) in enumerate(adv.refs)
        ]
        flat = torch.tensor(adv.scalar if adv.scalar is not None else [a for s in out for a in s.advantages] or [0.0], dtype=torch.float64)
        return out, {"advantages/mean": float(flat.mean()), "advantages/std": float(flat.std()) if len(flat) > 1 else 0.0}


@register_algorithm("rloo")
class RLOO(GRPO):
    """REINFORCE leave-one-out baseline (arXiv 2402.14740). As in TRL's RLOO, advantages are
    not std-scaled unless ``train.scale_rewards`` is ``batch``."""

    default_estimator = "rloo"
