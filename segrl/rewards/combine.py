"""Robust, TRL-style reward computation: weighted user reward functions with real timeouts.

Reward functions follow TRL's contract (see :mod:`segrl.tasks.base`)::

    def my_reward(prompts, completions, **columns) -> list[float | None]: ...

They are called with keyword arguments, exactly like TRL's ``GRPOTrainer`` does
(``func(prompts=..., completions=..., **columns)``), so functions written as
``def f(completions, **kwargs)`` work too. ``columns`` are the other dataset columns, each a
list aligned with ``prompts`` (e.g. ``answer``).

:class:`RewardComputer` turns a list of such functions into one reward per sample and makes
sure that a misbehaving function cannot kill a training run:

* **Weighted sum, TRL semantics.** ``reward[i] = sum_j w_j * r_j[i]`` where ``None`` values are
  skipped (TRL stores them as NaN and uses ``nansum``); a sample where every function returned
  ``None`` gets 0.0.
* **Failures are contained.** A function that raises, returns something that is not a sequence
  of the right length, returns NaN/inf or a non-number, or runs past ``timeout_s`` does not
  raise: the affected samples get ``fallback`` as that function's value (weighted as usual) and
  are counted (``rewards/errors`` in the metrics).
* **Per-sample isolation.** When a whole-batch call fails (exception, timeout, wrong length,
  a dead worker), the function is called again once per sample to find which samples fail;
  every other sample keeps its real reward, and only the failing samples count against the
  error budget. Each sample that hangs costs ``timeout_s``; after a whole-batch timeout the
  per-sample calls run on up to ``isolation_workers`` worker processes at once, and they stop
  early only when the failures found already exceed the error budget (the run stops anyway).
* **Real timeouts.** A hanging pure-Python function cannot be interrupted in a thread, so when
  ``timeout_s`` is set the functions run in a persistent worker process
  (:class:`CallWorker`). Inside the worker a ``SIGALRM`` timer interrupts Python code at
  ``timeout_s`` (cheap: the worker survives); if the function does not give control back
  (C code, a swallowed interrupt, a deadlock) the parent kills the worker at
  ``timeout_s + grace`` and starts a new one (costs one worker start-up).
* **Memory limit.** A worker may allocate ``memory_mb`` MiB beyond its start-up size
  (``RLIMIT_AS``); past it the function gets a ``MemoryError`` (an error for its samples). A
  worker that dies (``os._exit``, a segfault, the OOM killer) makes its call an error naming
  the exit code or signal, and a new worker takes over.
* **Error budget.** Failures are tracked per function over a sliding window of the last
  ``error_window`` samples. Once at least ``min(error_window, error_min_samples)`` samples are
  in the window and the failed fraction exceeds ``max_error_fraction``, :class:`RewardError` is
  raised, carrying the original traceback text of the most recent failure, so a broken reward
  function stops the run loudly instead of silently training on fallback rewards.

How functions reach the worker (``start_method="auto"``):

* functions that can be pickled by reference and live in an importable module (anything
  defined in a module, and :func:`load_reward_func` results) run in a fresh
  ``python -c`` subprocess that imports only what the functions need. Your training script is
  *not* re-imported (unlike ``multiprocessing``'s "spawn"), so it needs no
  ``if __name__ == "__main__":`` guard for this;
* lambdas, closures, and functions defined in ``__main__`` (your script, a notebook) cannot be
  imported by a fresh interpreter, so the worker is ``fork``-ed instead and inherits them.
  Create the :class:`RewardComputer` early (before model loading / CUDA initialisation, so the
  first fork happens while the process is small and single-threaded);
* functions marked ``func.segrl_inline = True`` (segrl's own graders, which enforce their own
  deadlines) are always called in the calling process.

Worker life cycle: the worker is started (asynchronously) when the :class:`RewardComputer` is
created and lives until :meth:`RewardComputer.close` (or the context manager exit, or garbage
collection, or interpreter exit). It exits by itself when the parent dies (end of file on its
pipe). Start-up costs one interpreter start plus the imports of your reward modules.

Where the parts live: :mod:`~segrl.rewards.computer` (the reward computer),
:mod:`~segrl.rewards.values` (checking and summing values), :mod:`~segrl.rewards.budget` (the
error budget), :mod:`~segrl.rewards.loading` (loading functions from a spec),
:mod:`~segrl.rewards.workers` / :mod:`~segrl.rewards.worker_child` (the worker process) and
:mod:`~segrl.rewards.pool` (per-sample isolation on several workers). This module re-exports
their public names.
"""

from .budget import RewardError
from .computer import RewardComputer
from .loading import FileRewardFunc, load_reward_func, reward_func_name
from .values import RewardOutput
from .workers import CallResult, CallWorker, WorkerStartError

__all__ = [
    "CallResult",
    "CallWorker",
    "FileRewardFunc",
    "RewardComputer",
    "RewardError",
    "RewardOutput",
    "WorkerStartError",
    "load_reward_func",
    "reward_func_name",
]
