"""Validation that needs more than one field: registered names and cross-section checks.

Names (``train.algo``, ``train.adv_estimator``, ``train.loss_type``, ``train.rollout``,
``eval.rollout``) are checked against the registries, read when a config is validated (not
when :mod:`segrl.configs` is imported: the registries fill in as their modules load, and a
user's own estimator registered before the config is built is accepted).

:func:`validate` runs on every :class:`~segrl.configs.SegrlConfig` (its ``__post_init__``)
and again when an algorithm is built from one (a config changed in Python after it was
built). Every error is a :class:`~segrl.configs.ConfigError` naming the field to change.
"""

from __future__ import annotations

from .loader import ConfigError, check


# ----- the registries, imported on first use ------------------------------------------------
def algorithm_class(name: str):
    from ..trainer.algorithms import get_algorithm

    return get_algorithm(name)


def algorithm_names() -> tuple[str, ...]:
    from ..trainer.algorithms import algorithm_names as names

    return names()


def estimator_names() -> tuple[str, ...]:
    from ..algos.registry import estimator_names as names

    return names()


def loss_types() -> tuple[str, ...]:
    from ..algos.registry import loss_types as names

    return names()


def sampler_names(for_eval: bool = False) -> tuple[str, ...]:
    from ..samplers.registry import sampler_names as names

    return names(for_eval)


def canonical_sampler(name: str) -> str:
    """``name`` with old aliases mapped to the sampler vocabulary (``independent`` -> ``group``)."""
    from ..samplers.registry import canonical

    return canonical(name)


def check_name(value: str, field: str, known: tuple[str, ...]) -> None:
    check(value in known, field, f"{value!r} is not one of {list(known)}")


# ----- resolution of ``auto`` ----------------------------------------------------------------
def train_sampler(cfg) -> str:
    """The sampler training uses: ``train.rollout``, or the algorithm's own for ``auto``."""
    r = canonical_sampler(cfg.train.rollout)
    return algorithm_class(cfg.train.algo).default_sampler if r == "auto" else r


def train_estimator(cfg) -> str:
    """The advantage estimator: ``train.adv_estimator``, or the algorithm's own for ``auto``."""
    e = cfg.train.adv_estimator
    return algorithm_class(cfg.train.algo).own_estimator(cfg) if e == "auto" else e


# ----- cross-section checks --------------------------------------------------------------------
def validate(cfg) -> None:
    """Check the settings of a whole :class:`~segrl.configs.SegrlConfig` that span sections."""
    t = cfg.train
    check_name(t.algo, "train.algo", algorithm_names())  # (again: fields may change after construction)
    check_name(t.adv_estimator, "train.adv_estimator", ("auto", *estimator_names()))
    algo = algorithm_class(t.algo)
    sampler, estimator = train_sampler(cfg), train_estimator(cfg)
    if algo.samplers is not None and sampler not in algo.samplers:
        own = ", ".join(algo.samplers)
        raise ConfigError(f"train.rollout: {t.algo} samples with its own sampler ({own}); leave train.rollout=auto, got {t.rollout!r}")
    if estimator == "spo_chain" and sampler != "spo_chain":
        raise ConfigError(f"train.adv_estimator: spo_chain needs the spo_chain sampler's Monte-Carlo values, not train.rollout={sampler!r}")
    tp = cfg.treepo
    if t.algo == "treepo" and tp.normalization == "subgroup_std" and estimator != "treepo":
        msg = f"subgroup_std divides by the std of a leaf's sub-group terms (Eq. 5): only the treepo estimator has them, not {estimator}"
        raise ConfigError(f"treepo.normalization: {msg}")
    if sampler == "treepo":
        _treepo_width(cfg)
    if canonical_sampler(cfg.eval.rollout) == "treepo" and tp.max_rows_in_flight is not None:
        k = cfg.eval.num_samples
        got = tp.max_rows_in_flight
        check(got >= k, "treepo.max_rows_in_flight", f"must be >= eval.num_samples ({k}) so that any prompt's round fits, got {got}")


def _treepo_width(cfg) -> None:
    """TreePO's width (``treepo.width``, default ``train.num_generations``) against the
    settings that must fit in it."""
    tp = cfg.treepo
    width = tp.width or cfg.train.num_generations
    where = "treepo.width" if tp.width is not None else "treepo.width (= train.num_generations)"
    check(width >= tp.initial_width, where, f"width ({width}) must be >= treepo.initial_width ({tp.initial_width})")
    if tp.initial_width_max is not None:
        check(tp.initial_width_max <= width, "treepo.initial_width_max", f"must be <= width ({width}), got {tp.initial_width_max}")
    if tp.budget_mode == "tokens":
        check(tp.min_width <= width, "treepo.min_width", f"must be <= width ({width}), got {tp.min_width}")
    if tp.max_rows_in_flight is not None:
        check(
            tp.max_rows_in_flight >= width,
            "treepo.max_rows_in_flight",
            f"must be >= the width ({width}) so that any prompt's round fits, got {tp.max_rows_in_flight}",
        )
