"""Name registries of the pure functions in :mod:`segrl.algos` (verl ``core_algos`` style).

One registry per kind of function, and one signature per registry:

* :data:`OUTCOME_ESTIMATORS` (:mod:`segrl.algos.advantages`): one reward per trajectory ->
  one advantage per trajectory::

      f(rewards [N], index [N], *, scale_rewards: str = "group", stats: MeanStd | None = None) -> [N]

  ``index`` is the prompt (group) id of each trajectory; ``scale_rewards`` is
  ``train.scale_rewards``; ``stats`` computes batch statistics (all ranks under torchrun).
* :data:`TREE_ESTIMATORS` (:mod:`segrl.algos.spo`, :mod:`segrl.algos.treepo`): one scored
  explicit tree -> the advantage of every segment of every trajectory::

      f(tree: RolloutTree, cfg) -> TreeEstimate

  ``cfg`` is the run's :class:`~segrl.configs.SegrlConfig` (each estimator reads its own
  section). Registered with ``level="trajectory"`` when every token of a trajectory gets one
  value, ``level="segment"`` when each segment (tree node) gets its own.
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
    """What a tree estimator returns for one tree.

    Attributes:
        paths: one ``[depth]`` tensor per trajectory leaf (``tree.leaves(include_mc=False)``
            order): the advantage of each segment on the leaf's path, root excluded
            (``tree.path(leaf)[1:]``). A ``trajectory``-level estimator repeats one value.
        values: optional ``[len(tree)]`` node values the advantages came from (written to
            ``node.value`` for the tree viewer; NaN where a node has none).
    """

    paths: list[torch.Tensor]
    values: torch.Tensor | None = None


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
