"""The reward computer: weighted TRL-style reward functions whose failures stay with the samples
that caused them (see :mod:`segrl.rewards.combine` for the whole contract)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .budget import ErrorBudget, RewardError
from .loading import load_reward_func, reward_func_name
from .pool import IsolationPool
from .values import RewardOutput, combine, single_value, slice_columns, validate
from .workers import CallResult, CallWorker, WorkerStartError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MEMORY_MB", "RewardComputer", "RewardError", "RewardOutput"]

#: default cap on what a reward worker may allocate (MiB, on top of its start-up size)
DEFAULT_MEMORY_MB = 8192


class _Batch:
    """What one call of the computer has found so far, per function ``j`` and sample ``i``."""

    def __init__(self, n_funcs: int, n: int):
        self.values: list[list[float | None]] = [[None] * n for _ in range(n_funcs)]
        self.failed: list[list[bool]] = [[False] * n for _ in range(n_funcs)]
        self.errors: list[tuple[str, str]] = []
        self.timed_out = 0


def _dedup(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for nm in names:
        seen[nm] = seen.get(nm, 0) + 1
        out.append(nm if seen[nm] == 1 else f"{nm}_{seen[nm]}")
    return out


class RewardComputer:
    """Weighted sum of TRL-style reward functions with contained failures and real timeouts.

    Args:
        funcs: reward functions ``f(prompts, completions, **columns) -> list[float | None]``
            (called with keyword arguments, like TRL). Strings are loaded with
            :func:`~segrl.rewards.loading.load_reward_func`.
        weights: one weight per function (default 1.0 each).
        timeout_s: deadline per function call (per batch call, and per sample during
            isolation). ``None`` runs everything in-process without timeouts (failures are
            still contained). Default 60 s.
        fallback: value used for a function on a sample where it failed.
        max_error_fraction: raise :class:`RewardError` once a function failed on more than this
            fraction of the samples in its window. ``None`` or ``1.0`` never raises.
        error_window: window length, in samples, per function.
        error_min_samples: the error-fraction check starts once ``min(error_window,
            error_min_samples)`` samples are in the window.
        isolation_workers: when a whole batch times out, its samples are retried one by one on
            up to this many worker processes at once (each hanging sample costs ``timeout_s``).
        memory_mb: how many MiB a worker may allocate beyond its start-up size (``MemoryError``
            past it: an error for that call's samples); ``None`` or 0 = no limit.
        start_method: worker start method, see :class:`~segrl.rewards.workers.CallWorker`
            (``"auto"`` picks ``"subprocess"`` when every function is importable by a fresh
            interpreter, else ``"fork"``).
        names: metric names (default: the functions' ``__name__``; duplicates get ``_2``...).

    Calling the object returns a :class:`RewardOutput`. Call :meth:`close` (or use ``with``)
    to stop the workers; they are also stopped at interpreter exit.
    """

    def __init__(
        self,
        funcs: Sequence[Callable | str],
        weights: Sequence[float] | None = None,
        *,
        timeout_s: float | None = 60.0,
        fallback: float = 0.0,
        max_error_fraction: float | None = 0.25,
        error_window: int = 256,
        error_min_samples: int = 32,
        isolation_workers: int = 4,
        memory_mb: float | None = DEFAULT_MEMORY_MB,
        start_method: str = "auto",
        names: Sequence[str] | None = None,
        startup_timeout_s: float = 120.0,
    ):
        funcs = [load_reward_func(f) if isinstance(f, str) else f for f in funcs]
        self._check_args(funcs, weights, fallback, timeout_s, isolation_workers)
        self.funcs = funcs
        self.weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        self.timeout_s = timeout_s
        self.fallback = float(fallback)
        self.max_error_fraction = max_error_fraction
        names = [reward_func_name(f) for f in funcs] if names is None else list(names)
        if len(names) != len(funcs):
            raise ValueError("names must match funcs")
        self.names = _dedup(names)
        self._budget = ErrorBudget(self.names, max_error_fraction, error_window, error_min_samples)
        self.total_errors = 0
        self.total_samples = 0
        self._lock = threading.Lock()
        # Which functions go to the worker: segrl's own graders keep their own deadlines.
        self._inline = [bool(getattr(f, "segrl_inline", False)) or timeout_s is None for f in funcs]
        self._remote_index = {j: k for k, j in enumerate(j for j, inl in enumerate(self._inline) if not inl)}
        remote = [f for f, inl in zip(funcs, self._inline) if not inl]
        self._worker = None
        self._pool = None
        if remote:
            self._worker = CallWorker(
                remote, start_method=start_method, startup_timeout_s=startup_timeout_s, name="segrl-reward-worker", memory_mb=memory_mb
            )
            self._pool = IsolationPool(self._worker, isolation_workers)
        self._local = CallWorker(funcs, start_method="inline", name="segrl-reward-inline")
        if self._worker is not None:
            self._worker.start(wait=False)  # warms up while the caller does other things

    @staticmethod
    def _check_args(funcs, weights, fallback, timeout_s, isolation_workers) -> None:
        if not funcs:
            raise ValueError("RewardComputer needs at least one reward function")
        for f in funcs:
            if not callable(f):
                raise TypeError(f"reward function {f!r} is not callable")
        if weights is not None and len(weights) != len(funcs):
            raise ValueError(f"got {len(weights)} weights for {len(funcs)} reward functions")
        if not math.isfinite(fallback):
            raise ValueError("fallback must be finite")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError("timeout_s must be positive or None")
        if isolation_workers < 1:
            raise ValueError("isolation_workers must be >= 1")

    def start(self, wait: bool = True) -> RewardComputer:
        """Start the worker now (it is started asynchronously at construction anyway).

        With ``wait=True`` block until it is ready, so that start-up problems (a function that
        cannot be imported by the worker, an import error in your reward module) surface here
        as :class:`RewardError` instead of at the first batch.
        """
        if self._worker is not None:
            try:
                self._worker.start(wait=wait)
            except WorkerStartError as e:
                raise RewardError(f"reward worker could not start: {e.args[0].splitlines()[0]}", "", e.traceback) from e
        return self

    @property
    def start_method(self) -> str | None:
        """How the worker runs functions (``None`` when every function runs inline)."""
        return None if self._worker is None else self._worker.start_method

    # -- running ----------------------------------------------------------------------------

    def _remote(self, j: int) -> bool:
        return not self._inline[j] and self._worker is not None

    def _start_error(self, e: WorkerStartError, j: int, who: str = "") -> RewardError:
        return RewardError(f"reward worker could not start{who}: {e.args[0].splitlines()[0]}", self.names[j], e.traceback)

    def _call(self, j: int, kwargs_list: list[dict], stop: Callable | None = None) -> list[CallResult | None]:
        """Run function j once per kwargs in ``kwargs_list``; with ``stop``, spread over the
        isolation pool (``None`` for calls ``stop`` made unnecessary)."""
        if not self._remote(j):
            return self._local.run([(j, (), kw) for kw in kwargs_list], None)
        items = [(self._remote_index[j], (), kw) for kw in kwargs_list]
        try:
            if stop is not None:
                return self._pool.run(items, self.timeout_s, stop)
            return self._worker.run(items, self.timeout_s)
        except WorkerStartError as e:
            raise self._start_error(e, j, f" for {self.names[j]!r}") from e
        except TypeError as e:
            if "cannot be pickled" not in str(e):
                raise
            logger.warning("%s; calling %r in-process without a timeout", e, self.names[j])
            return self._local.run([(j, (), kw) for kw in kwargs_list], None)

    def _call_batch_all(self, shared: dict) -> list[CallResult]:
        """One whole-batch call per function: remote functions in one worker round trip."""
        out: list[CallResult | None] = [None] * len(self.funcs)
        remote_js = [j for j in range(len(self.funcs)) if self._remote(j)]
        if remote_js:
            try:
                res = self._worker.run([(self._remote_index[j], (), {}) for j in remote_js], self.timeout_s, shared)
                for j, r in zip(remote_js, res):
                    out[j] = r
            except WorkerStartError as e:
                raise self._start_error(e, remote_js[0]) from e
            except TypeError as e:
                if "cannot be pickled" not in str(e):
                    raise
                logger.warning("%s; calling reward functions in-process without a timeout", e)
        for j in range(len(self.funcs)):
            if out[j] is None:
                out[j] = self._local.run([(j, (), {})], None, shared)[0]
        return out  # type: ignore[return-value]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> RewardOutput:
        """Compute rewards for one batch. See the class docstring."""
        with self._lock:
            return self._compute(prompts, completions, columns)

    compute = __call__

    def _compute(self, prompts, completions, columns) -> RewardOutput:
        n = len(prompts)
        if len(completions) != n:
            raise ValueError(f"{len(completions)} completions for {n} prompts")
        shared = {"prompts": list(prompts), "completions": list(completions), **columns}
        acc = _Batch(len(self.funcs), n)
        if n:
            for j, res in enumerate(self._call_batch_all(shared)):
                batch_text = self._take_batch(j, res, n, acc)
                if batch_text is not None:  # whole-batch failure: find the failing samples
                    self._isolate(j, shared, n, res, batch_text, acc)
        return self._finish(acc, n)

    def _take_batch(self, j: int, res: CallResult, n: int, acc: _Batch) -> str | None:
        """Use a whole-batch result; returns the failure text when it is unusable."""
        if res.status == "ok":
            vals, problems, batch_problem = validate(res.value, n)
            if batch_problem is None:
                for i in range(n):
                    if problems[i] is not None:
                        acc.failed[j][i] = True
                        acc.errors.append((self.names[j], f"sample {i}: {problems[i]}"))
                    else:
                        acc.values[j][i] = vals[i]
                return None
            return f"{self.names[j]} {batch_problem}"
        if res.status == "timeout":
            return f"{self.names[j]} timed out on the whole batch ({res.value})"
        return res.value

    def _sample_failed(self, r: CallResult) -> bool:
        return r.status != "ok" or single_value(r.value)[1] is not None

    def _isolate(self, j: int, shared: dict, n: int, res: CallResult, batch_text: str, acc: _Batch) -> None:
        """Call function j once per sample: only the samples that fail alone are failures.

        After a whole-batch timeout the calls are spread over the isolation pool, and they stop
        as soon as the failures found make the error budget stop the run anyway."""
        logger.debug("reward function %s failed on the whole batch; isolating samples", self.names[j])
        per = [slice_columns(shared, n, i) for i in range(n)]
        stop = None
        if res.status == "timeout" and self._remote(j):
            stop = lambda results: self._budget.certain_to_stop(  # noqa: E731
                j, [None if r is None else self._sample_failed(r) for r in results]
            )
        single = self._call(j, per, stop)
        for i, r in enumerate(single):
            if r is None:
                continue
            if r.status == "ok":
                value, problem = single_value(r.value)
                if problem is None:
                    acc.values[j][i] = value
                    continue
                text = f"sample {i}: {self.names[j]} {problem}"
            elif r.status == "timeout":
                acc.timed_out += 1
                text = f"sample {i}: {self.names[j]} timed out ({r.value})"
            else:
                text = r.value
            acc.failed[j][i] = True
            acc.errors.append((self.names[j], text or batch_text))
        if any(r is None for r in single):  # stopped early: the budget is exceeded whatever the rest does
            self._budget.record(j, [bool(f) for f in acc.failed[j]], acc.errors[-1][1] if acc.errors else batch_text)
            self._budget.check(at_least=True)
        if not any(acc.failed[j]):
            level = logging.WARNING if res.status == "timeout" else logging.DEBUG
            logger.log(
                level,
                "%s failed on the whole batch but on no single sample (%s); if it is just slow, raise timeout_s",
                self.names[j],
                batch_text.strip().splitlines()[-1] if batch_text else res.status,
            )

    def _finish(self, acc: _Batch, n: int) -> RewardOutput:
        out = combine(self.names, self.weights, acc.values, acc.failed, self.fallback, acc.timed_out, acc.errors)
        self.total_errors += int(out.metrics["rewards/errors"])
        self.total_samples += n
        for name, text in acc.errors[:3]:
            logger.warning("reward function %s failed: %s", name, text.strip().splitlines()[-1] if text else "")
        last_text: dict[str, str] = {}
        for name, text in acc.errors:
            last_text[name] = text
        for j, name in enumerate(self.names):
            self._budget.record(j, acc.failed[j], last_text.get(name))
        self._budget.check()
        return out

    def reset_error_window(self) -> None:
        """Forget past failures (e.g. after fixing something between runs)."""
        self._budget.clear()

    @property
    def _windows(self):  # the trainer checkpoints the error windows
        return self._budget.windows

    @property
    def _last_error(self) -> list[str]:
        return self._budget.last_error

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        if self._pool is not None:
            self._pool.close()
        if self._worker is not None:
            self._worker.close()

    def __enter__(self) -> RewardComputer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
