"""The sampler vocabulary: one set of names for training (``train.rollout``) and evaluation
(``eval.rollout``).

Every entry of :data:`SAMPLERS` is a factory with one signature::

    factory(cfg, width: int | None = None) -> sampler

``cfg`` is the run's :class:`~segrl.configs.SegrlConfig`; ``width`` is given for evaluation
(exactly ``width`` leaves per prompt; only entries registered with ``eval=True``). A sampler
only samples::

    sampler.sample(engine, trees, progress=None) -> metrics    # grows the trees in place
    sampler(engine, trees)                                      # the same, for evaluation

``progress`` is the fraction of training done (TreePO's divergence-temperature schedule).
Scoring, values and advantages belong to the algorithm.

Names: ``group`` (``n`` independent completions per prompt, the GRPO group; old name
``independent``), ``treepo`` (TreePO segment trees), ``spo_tree`` (SPO-tree fixed-shape
segment trees), ``spo_chain`` (SPO-chain trajectories with Monte-Carlo continuations).
``train.rollout=auto`` is the algorithm's own sampler.
"""

from __future__ import annotations

from ..registry import Registry
from .group import GroupSampler
from .spo_chain import chain_sampler
from .spo_tree import SPOTreeSampler
from .treepo import TreePOSampler

SAMPLERS: Registry = Registry("sampler")

#: names a config written before the vocabulary was unified may use
SAMPLER_ALIASES = {"independent": "group"}


@SAMPLERS.register("group", eval=True)
def group_sampler(cfg, width: int | None = None) -> GroupSampler:
    return GroupSampler(width or cfg.train.num_generations, cfg.sampling.max_completion_length)


@SAMPLERS.register("treepo", eval=True)
def treepo_sampler(cfg, width: int | None = None) -> TreePOSampler:
    return TreePOSampler(cfg) if width is None else TreePOSampler.for_eval(cfg, width)


@SAMPLERS.register("spo_tree", eval=False)
def spo_tree_sampler(cfg, width: int | None = None) -> SPOTreeSampler:
    s = cfg.spo
    return SPOTreeSampler(s.branch_factors, s.segment_length, cfg.sampling.max_completion_length, s.last_segment_unbounded)


@SAMPLERS.register("spo_chain", eval=False)
def spo_chain_sampler(cfg, width: int | None = None):
    return chain_sampler(cfg)


def canonical(name: str) -> str:
    """The sampler name behind ``name`` (an alias or itself)."""
    return SAMPLER_ALIASES.get(name, name)


def make_sampler(name: str, cfg, width: int | None = None):
    """The sampler ``name`` (or alias) for ``cfg``; ``width`` for evaluation."""
    return SAMPLERS[canonical(name)](cfg, width)


def sampler_names(for_eval: bool = False) -> tuple[str, ...]:
    """Registered sampler names (those that can evaluate, with ``for_eval``)."""
    return tuple(n for n in SAMPLERS.names() if not for_eval or SAMPLERS.meta(n).get("eval"))
