"""Single calls spread over a few worker processes: per-sample isolation of a batch that timed out.

When a reward function hangs on some samples, finding which ones costs one deadline per
hanging sample. :class:`IsolationPool` runs the per-sample calls on up to ``size`` workers at
once (the reward computer's own worker plus clones started on first need and kept for later
batches), so that cost is divided by ``size``. Each worker is driven by its own thread; a call
that hangs past its deadline is killed with its worker, as in :class:`CallWorker`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from .workers import CallResult, CallWorker

#: ``stop(results)`` is asked after every result; True ends the run (the rest stay ``None``)
StopRule = Callable[[Sequence[CallResult | None]], bool]


class IsolationPool:
    """Runs ``(fn_index, args, kwargs)`` items one call at a time on up to ``size`` workers."""

    def __init__(self, main: CallWorker, size: int):
        self.main = main
        self.size = max(1, int(size))
        self._helpers: list[CallWorker] = []

    def _workers(self, n_items: int) -> list[CallWorker]:
        want = min(self.size, n_items)
        if self.main.start_method == "inline":
            want = 1  # no processes: calls run in the caller, one at a time
        while len(self._helpers) < want - 1:
            # started here, in the calling thread: a fork from a helper thread could copy a
            # lock another thread holds
            self._helpers.append(self.main.clone(f"{self.main.name}-{len(self._helpers) + 2}").start())
        return [self.main, *self._helpers[: want - 1]]

    def run(
        self, items: Sequence[tuple[int, tuple, dict]], timeout_s: float | None, stop: StopRule | None = None
    ) -> list[CallResult | None]:
        """One result per item, in order; ``None`` for items not run because ``stop`` said so.

        Raises what :meth:`CallWorker.run` raises (``WorkerStartError``, ``TypeError``)."""
        items = list(items)
        results: list[CallResult | None] = [None] * len(items)
        if not items:
            return results
        workers = self._workers(len(items))
        lock = threading.Lock()
        state = {"next": 0, "stop": False, "error": None}

        def drive(w: CallWorker) -> None:
            while True:
                with lock:
                    if state["stop"] or state["error"] is not None or state["next"] >= len(items):
                        return
                    k = state["next"]
                    state["next"] += 1
                try:
                    res = w.run([items[k]], timeout_s)[0]
                except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                    with lock:
                        state["error"] = e
                    return
                with lock:
                    results[k] = res
                    if stop is not None and not state["stop"] and stop(results):
                        state["stop"] = True

        if len(workers) == 1:
            drive(workers[0])
        else:
            threads = [threading.Thread(target=drive, args=(w,), name=f"{w.name}-driver", daemon=True) for w in workers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if state["error"] is not None:
            raise state["error"]
        return results

    def close(self) -> None:
        for w in self._helpers:
            w.close()
        self._helpers.clear()
