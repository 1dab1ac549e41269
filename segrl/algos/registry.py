"""Name registries of the pure functions in :mod:`segrl.algos` (verl ``core_algos`` style).

One registry per kind of function, and one signature per registry:

* :data:`OUTCOME_ESTIMATORS` (:mod:`segrl.algos.advantages`): one reward per trajectory ->
  one advantage per trajectory::

      f(rewards [N], index [N], *, scale_rewards: str = "group", stats: MeanStd | None = None) -> [N]

  ``index`` is the prompt (group) id of each trajectory; ``scale_rewards`` is
  ``train.scale_rewards``; ``stats`` computes batch statistics (all ranks under torchrun).
* :data:`TREE_ESTIMATORS` (:mod:`segrl.algos.spo`, :mod:`segrl.algos.treepo`,
  :mod:`segrl.algos.treepo_segment`): scored explicit trees (parent pointers, token spans) ->
  the advantage of every segment of every trajectory (a :class:`TreeEstimate`)::

      f(trees: Sequence[RolloutTree], cfg) -> TreeEstimate

  ``cfg`` is the run's :class:`~segrl.configs.SegrlConfig` (each estimator reads its own
  section). The trajectories are the trees' ``leaves(include_mc=False)`` in batch order.
* :data:`LOSS_AGGREGATIONS` (:mod:`segrl.algos.losses`): TRL's ``loss_type``::

      f(per_token [B, T], mask [B, T], norm: LossNormalizer) -> scalar

Adding an estimator is one function and one registration, e.g.::

    @OUTCOME_ESTIMATORS.register("my_estimator")
    def my_estimator(rewards, index, *, scale_rewards="group", stats=None):
        ...

after which ``--train.adv_estimator my_estimator`` selects it (:func:`estimator_names`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import Registry


@dataclass
class TreeEstimate:
    """What a tree estimator returns for a batch of ``T`` trees with ``N`` trajectory leaves
    (``leaves(include_mc=False)`` of each tree, in batch order). Exactly one of the first three
    is set, the most compact that describes the estimate:

    Attributes:
        per_trajectory: ``[N]`` one advantage per trajectory (every token of it).
        per_node: ``T`` lists of ``[len(tree)]``: each segment's (node's) own advantage,
            whichever trajectory it is trained in (0 for the root).
        per_segment: ``N`` lists of ``[depth]``: the advantage of each segment on the
            trajectory's path (``tree.path(leaf)[1:]``), when it depends on the trajectory.
        values: optional ``T`` lists of ``[len(tree)]`` node values the advantages came from
            (written to ``node.value`` for the tree viewer; NaN where a node has none).
    """

    per_trajectory: torch.Tensor | None = None
    per_node: list[list[float]] | None = None
    per_segment: list[list[float]] | None = None
    values: list[list[float]] | None = None

    def __post_init__(self):
        if sum(x is not None for x in (self.per_trajectory, self.per_node, self.per_segment)) != 1:
            raise ValueError("a TreeEstimate holds exactly one of per_trajectory, per_node, per_segment")


OUTCOME_ESTIMATORS: Registry = Registry("outcome advantage estimator")
TREE_ESTIMATORS: Registry = Registry("tree advantage estimator")
LOSS_AGGREGATIONS: Registry = Registry("loss_type")


def estimator_names() -> tuple[str, ...]:
    """Every registered advantage estimator (outcome, then tree), for ``train.adv_estimator``."""
    _load()
    return OUTCOME_ESTIMATORS.names() + TREE_ESTIMATORS.names()


def loss_types() -> tuple[str, ...]:
    _load()
    return LOSS_AGGREGATIONS.names()


def _load() -> None:
    # The built-in functions register themselves when their modules are imported.
    from . import advantages, losses, spo, treepo, treepo_segment  # noqa: F401
