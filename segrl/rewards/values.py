"""Reward values: checking what a reward function returned, and the weighted sum with metrics.

Pure functions, no processes: :class:`segrl.rewards.computer.RewardComputer` calls them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardOutput:
    """Result of one :class:`~segrl.rewards.computer.RewardComputer` call.

    * ``rewards``: weighted total per sample.
    * ``per_func``: function name -> value per sample as used in the sum (``None`` when the
      function returned ``None``; ``fallback`` where it failed).
    * ``failed``: function name -> per-sample failure flags.
    * ``metrics``: ``rewards/<name>/mean`` and ``rewards/<name>/std`` (over the values the
      function really returned: no ``None``, no failures; NaN if there are none),
      ``rewards/<name>/errors``, ``rewards/errors`` (failed function-sample pairs in this batch),
      ``rewards/timeouts``, ``reward`` and ``reward_std`` (of the totals).
    * ``errors``: messages/tracebacks of the failures in this batch, ``(func_name, text)``.
    """

    rewards: list[float]
    per_func: dict[str, list[float | None]]
    failed: dict[str, list[bool]]
    metrics: dict[str, float]
    errors: list[tuple[str, str]] = field(default_factory=list)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and unbiased std (like TRL's ``nanstd``); NaN for no values, std 0 for one."""
    if not values:
        return float("nan"), float("nan")
    m = math.fsum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    var = math.fsum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var)


def to_float(v: Any) -> tuple[float | None, str | None]:
    """(value, problem). ``None`` stays ``None``."""
    if v is None:
        return None, None
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:  # numpy / torch scalars
        try:
            v = v.item()
        except Exception:  # noqa: BLE001
            pass
    if isinstance(v, numbers.Real):
        f = float(v)
        if not math.isfinite(f):
            return None, f"returned {f!r} (not finite)"
        return f, None
    return None, f"returned a {type(v).__name__} ({v!r:.60}), expected a float or None"


def validate(ret: Any, n: int) -> tuple[list[float | None] | None, list[str | None] | None, str | None]:
    """Check a reward function's return value: (values, per-sample problems, batch problem)."""
    if hasattr(ret, "tolist") and callable(ret.tolist) and not isinstance(ret, (list, tuple)):
        try:
            ret = ret.tolist()
        except Exception:  # noqa: BLE001
            pass
    if isinstance(ret, (str, bytes, dict)) or not isinstance(ret, Sequence):
        return None, None, f"returned a {type(ret).__name__}, expected a list of {n} floats"
    if len(ret) != n:
        return None, None, f"returned {len(ret)} values for {n} samples"
    values: list[float | None] = []
    problems: list[str | None] = []
    for v in ret:
        f, problem = to_float(v)
        values.append(f)
        problems.append(problem)
    return values, problems, None


def single_value(ret: Any) -> tuple[float | None, str | None]:
    """(value, problem) of a one-sample call's return value."""
    vals, problems, batch_problem = validate(ret, 1)
    if batch_problem is not None:
        return None, batch_problem
    return vals[0], problems[0]


def slice_columns(columns: dict, n: int, i: int) -> dict:
    """The keyword arguments of sample ``i`` alone (columns of length ``n`` sliced to one)."""
    out = {}
    for k, v in columns.items():
        if isinstance(v, (list, tuple)) and len(v) == n:
            out[k] = type(v)([v[i]]) if isinstance(v, tuple) else [v[i]]
        elif hasattr(v, "__getitem__") and hasattr(v, "shape") and len(getattr(v, "shape", ())) > 0 and v.shape[0] == n:
            out[k] = v[i : i + 1]
        else:
            out[k] = v
    return out


def combine(
    names: Sequence[str],
    weights: Sequence[float],
    values: Sequence[Sequence[float | None]],
    failed: Sequence[Sequence[bool]],
    fallback: float,
    timed_out: int,
    errors: list[tuple[str, str]],
) -> RewardOutput:
    """The weighted sum (``None`` skipped, ``fallback`` where a function failed) and metrics."""
    n = len(values[0]) if values else 0
    used = [[fallback if failed[j][i] else values[j][i] for i in range(n)] for j in range(len(names))]
    totals = []
    for i in range(n):
        s = 0.0  # summed in function order
        for w, col in zip(weights, used):
            if col[i] is not None:
                s += w * col[i]
        totals.append(s)
    metrics: dict[str, float] = {}
    n_err = 0
    for j, name in enumerate(names):
        real = [values[j][i] for i in range(n) if not failed[j][i] and values[j][i] is not None]
        metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = mean_std(real)
        e = sum(failed[j])
        metrics[f"rewards/{name}/errors"] = float(e)
        n_err += e
    metrics["reward"], metrics["reward_std"] = mean_std(totals)
    metrics["rewards/errors"] = float(n_err)
    metrics["rewards/timeouts"] = float(timed_out)
    return RewardOutput(
        rewards=totals,
        per_func={nm: used[j] for j, nm in enumerate(names)},
        failed={nm: list(failed[j]) for j, nm in enumerate(names)},
        metrics=metrics,
        errors=errors,
    )
