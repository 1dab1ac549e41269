"""A persistent worker process that runs a fixed list of functions under hard deadlines.

:class:`CallWorker` is the parent side (start, send jobs, enforce deadlines, replace a dead or
stuck worker); :mod:`segrl.rewards.worker_child` is the loop the worker runs. The reward
computer (:mod:`segrl.rewards.computer`) and the math grader
(:mod:`segrl.rewards.math_grading`) use it.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # noqa: F401  (registered before our atexit hook, so ours runs first)
import os
import pickle
import signal
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .process import Proc, describe_exit, finalize_proc, launch_fork, launch_subprocess
from .worker_child import INIT_ERROR, READY, install_alarm, run_one

logger = logging.getLogger(__name__)

__all__ = ["CallResult", "CallWorker", "WorkerStartError", "describe_exit"]

NOT_ATTEMPTED = "not attempted (too many consecutive timeouts)"


class WorkerStartError(RuntimeError):
    """The worker process could not start (e.g. a function could not be imported there)."""

    def __init__(self, message: str, traceback_text: str = ""):
        super().__init__(message + (f"\n\nWorker traceback:\n{traceback_text}" if traceback_text else ""))
        self.traceback = traceback_text


class CallResult(NamedTuple):
    """Outcome of one call in a :class:`CallWorker`.

    ``status`` is ``"ok"`` (``value`` is the return value), ``"error"`` (``value`` is the
    traceback text) or ``"timeout"`` (``value`` is a short explanation).
    """

    status: str
    value: Any
    elapsed: float


def _is_transferable(obj: Any) -> bool:
    """True when a fresh interpreter can unpickle ``obj`` (by reference, no ``__main__``)."""
    try:
        blob = pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - lambdas, closures, local classes, ...
        return False
    return b"__main__" not in blob and b"__mp_main__" not in blob


_LIVE_WORKERS: weakref.WeakSet[CallWorker] = weakref.WeakSet()


def _close_all_workers() -> None:
    for w in list(_LIVE_WORKERS):
        try:
            w.close()
        except Exception:  # noqa: BLE001
            pass


atexit.register(_close_all_workers)


def _forget_workers_after_fork() -> None:
    """In a forked child, the workers belong to the parent: never talk to them from here (that
    would interleave messages on the parent's pipes). Close our copies of their pipe ends (so they
    still see end-of-file when the parent dies), reset locks a parent thread may have held, and
    let each worker start its own process if the child uses it."""
    for w in list(_LIVE_WORKERS):
        proc = w._holder[0]
        w._holder[0] = None
        if proc is not None:
            try:
                proc.conn.close()
            except Exception:  # noqa: BLE001
                pass
        w._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_after_fork)


class CallWorker:
    """A persistent worker process that runs a fixed list of functions under hard deadlines.

    ``funcs`` are given once, at construction; calls refer to them by index. One
    :meth:`run` sends a whole list of calls in one message (one round trip); results stream
    back one by one, and each call has its own deadline, measured from the previous result.

    Start methods:

    * ``"subprocess"``: a fresh ``python -c`` interpreter (POSIX) that receives the pickled
      functions; it does not import the caller's ``__main__``. Functions must be picklable by
      reference from an importable module.
    * ``"fork"``: ``multiprocessing``'s fork; the worker inherits the functions (lambdas,
      closures, ``__main__`` functions work). Forking a large multi-threaded process is
      possible but best done early.
    * ``"inline"``: no process; calls run in the caller. Timeouts then only work in the main
      thread (SIGALRM) and cannot interrupt C code. Used automatically where no child process
      can be started (inside a daemonic process, non-POSIX systems).
    * ``"auto"`` (default): ``"subprocess"`` if all functions (and ``init``) are transferable,
      else ``"fork"``.

    Timeouts: at ``timeout_s`` a SIGALRM timer in the worker interrupts Python code (the call
    reports ``"timeout"`` and the worker lives on); at ``timeout_s + grace_s`` the parent kills
    the worker, reports ``"timeout"`` and starts a replacement for the remaining calls.

    ``memory_mb``: the worker's address space may grow by at most this many MiB after start-up
    (``RLIMIT_AS``); an allocation past it raises ``MemoryError`` in the call (an ``"error"``).
    A worker that dies during a call (``os._exit``, a segfault, the OOM killer) makes that call
    an ``"error"`` naming its exit code or signal; a new worker serves the remaining calls.

    Thread-safe (calls are serialised). Close with :meth:`close` (also done at interpreter exit
    and on garbage collection).
    """

    def __init__(
        self,
        funcs: Sequence[Callable],
        *,
        init: Callable[[], None] | None = None,
        start_method: str = "auto",
        startup_timeout_s: float = 120.0,
        grace_s: float | None = None,
        name: str = "segrl-worker",
        memory_mb: float | None = None,
    ):
        self.funcs = list(funcs)
        self.init = init
        self.name = name
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self.memory_mb = memory_mb
        self.start_method = self._pick_start_method(start_method)
        self._lock = threading.RLock()
        self._holder: list = [None]  # [Proc | None], shared with the finalizer
        self._finalizer = weakref.finalize(self, finalize_proc, self._holder)
        self._job = 0
        self._closed = False
        self.stats = {"starts": 0, "kills": 0, "timeouts": 0, "errors": 0, "calls": 0, "deaths": 0}
        _LIVE_WORKERS.add(self)

    def clone(self, name: str | None = None) -> CallWorker:
        """Another worker with the same functions and settings (its own process)."""
        return CallWorker(
            self.funcs,
            init=self.init,
            start_method=self.start_method,
            startup_timeout_s=self.startup_timeout_s,
            grace_s=self.grace_s,
            name=name or self.name,
            memory_mb=self.memory_mb,
        )

    # -- set-up -----------------------------------------------------------------------------

    def _pick_start_method(self, requested: str) -> str:
        if requested not in ("auto", "subprocess", "fork", "inline"):
            raise ValueError(f"start_method must be auto/subprocess/fork/inline, got {requested!r}")
        can_spawn = os.name == "posix" and not multiprocessing.current_process().daemon
        if requested == "inline":
            return "inline"
        if not can_spawn:
            logger.warning(
                "%s: cannot start a worker process here (%s); running functions in-process, "
                "timeouts are best-effort only.",
                self.name,
                "daemonic process" if os.name == "posix" else "non-POSIX system",
            )
            return "inline"
        if requested != "auto":
            return requested
        transferable = all(_is_transferable(f) for f in self.funcs) and (
            self.init is None or _is_transferable(self.init)
        )
        return "subprocess" if transferable else "fork"

    def _grace(self, timeout_s: float) -> float:
        if self.grace_s is not None:
            return self.grace_s
        return max(1.0, 0.25 * timeout_s)

    def _launch(self) -> Proc:
        self.stats["starts"] += 1
        launch = launch_subprocess if self.start_method == "subprocess" else launch_fork
        proc = launch(self.funcs, self.init, self.memory_mb, self.name)
        self._holder[0] = proc
        return proc

    def _wait_ready(self, proc: Proc) -> None:
        if proc.ready:
            return
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                got = proc.conn.poll(max(0.0, min(left, 1.0)))
            except (EOFError, OSError):
                got = True
            if got:
                try:
                    msg = proc.conn.recv()
                except (EOFError, OSError):
                    code = proc.exitcode(wait=2.0)
                    self._drop(proc)
                    raise WorkerStartError(f"{self.name}: worker process exited during start-up ({describe_exit(code)})") from None
                if msg[0] == READY:
                    proc.ready = True
                    return
                if msg[0] == INIT_ERROR:
                    self._drop(proc)
                    raise WorkerStartError(f"{self.name}: worker failed to start", msg[1])
                continue
            if left <= 0:
                self._drop(proc)
                raise WorkerStartError(f"{self.name}: worker not ready after {self.startup_timeout_s:g} s")

    def _drop(self, proc: Proc) -> None:
        proc.kill()
        if self._holder[0] is proc:
            self._holder[0] = None

    def _live_proc(self) -> Proc:
        """The running worker, started (and waited for) if there is none."""
        proc = self._holder[0]
        if proc is None or not proc.alive():
            if proc is not None:
                self._drop(proc)
            proc = self._launch()
        self._wait_ready(proc)
        return proc

    def start(self, wait: bool = False) -> CallWorker:
        """Start the worker now (normally it starts on first use). ``wait=True`` blocks until it
        is ready and raises :class:`WorkerStartError` if it cannot start."""
        if self.start_method == "inline":
            return self
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            proc = self._holder[0]
            if proc is None or not proc.alive():
                if proc is not None:
                    self._drop(proc)
                proc = self._launch()
            if wait:
                self._wait_ready(proc)
        return self

    @property
    def pid(self) -> int | None:
        proc = self._holder[0]
        return proc.pid if proc is not None else None

    # -- calls ------------------------------------------------------------------------------

    def run(
        self,
        items: Sequence[tuple[int, tuple, dict]],
        timeout_s: float | None,
        shared_kwargs: dict | None = None,
        stop_after_timeouts: int | None = None,
    ) -> list[CallResult]:
        """Run ``funcs[i](*args, **shared_kwargs, **kwargs)`` for each ``(i, args, kwargs)``.

        Returns one :class:`CallResult` per item, in order. Never raises for a failing call; it
        raises :class:`WorkerStartError` if no worker can be started at all, and ``TypeError``
        if the arguments cannot be pickled (only with a worker process).

        ``stop_after_timeouts``: after this many consecutive timeouts, the remaining items are
        not run and report ``"timeout"`` ("not attempted").
        """
        items = list(items)
        shared_kwargs = shared_kwargs or {}
        if not items:
            return []
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            self.stats["calls"] += len(items)
            if self.start_method == "inline":
                results = self._run_inline(items, timeout_s, shared_kwargs, stop_after_timeouts)
            else:
                results = self._run_remote(items, timeout_s, shared_kwargs, stop_after_timeouts)
            for r in results:
                if r.status == "timeout":
                    self.stats["timeouts"] += 1
                elif r.status == "error":
                    self.stats["errors"] += 1
            return results

    def _run_inline(self, items, timeout_s, shared_kwargs, stop_after_timeouts) -> list[CallResult]:
        use_timer = (
            timeout_s is not None
            and hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread()
        )
        results: list[CallResult] = []
        consecutive = 0
        old = install_alarm() if use_timer else None
        try:
            for fn_index, args, kwargs in items:
                if stop_after_timeouts is not None and consecutive >= stop_after_timeouts:
                    results.append(CallResult("timeout", NOT_ATTEMPTED, 0.0))
                    continue
                t0 = time.monotonic()
                status, value = run_one(
                    self.funcs[fn_index], args, {**shared_kwargs, **kwargs}, timeout_s, use_timer, inline=True
                )
                results.append(CallResult(status, value, time.monotonic() - t0))
                consecutive = consecutive + 1 if status == "timeout" else 0
        finally:
            if use_timer:
                signal.signal(signal.SIGALRM, old)
        return results

    def _run_remote(self, items, timeout_s, shared_kwargs, stop_after_timeouts) -> list[CallResult]:
        n = len(items)
        results: list[CallResult | None] = [None] * n
        hard = None if timeout_s is None else timeout_s + self._grace(timeout_s)
        state = {"i": 0, "consecutive": 0}
        while state["i"] < n:
            if stop_after_timeouts is not None and state["consecutive"] >= stop_after_timeouts:
                for k in range(state["i"], n):
                    results[k] = CallResult("timeout", NOT_ATTEMPTED, 0.0)
                break
            try:
                blob = pickle.dumps((shared_kwargs, items[state["i"] :], timeout_s))
            except Exception as e:  # noqa: BLE001
                raise TypeError(f"{self.name}: call arguments cannot be pickled for the worker process: {e}") from e
            proc = self._live_proc()
            self._job += 1
            try:
                proc.conn.send((self._job, blob))
            except (BrokenPipeError, EOFError, OSError):
                self._drop(proc)
                self._launch()
                continue  # resend to a fresh worker
            self._collect(proc, self._job, state, results, hard, stop_after_timeouts)
        return [r if r is not None else CallResult("error", "no result", 0.0) for r in results]

    def _collect(self, proc: Proc, job: int, state: dict, results: list, hard, stop_after_timeouts) -> None:
        """Receive the results of ``job`` into ``results`` from ``state["i"]`` on; returns when
        the job is done or the worker had to be replaced (stuck, dead, or no longer wanted)."""
        base, n = state["i"], len(results)
        while state["i"] < n:
            i = state["i"]
            if stop_after_timeouts is not None and state["consecutive"] >= stop_after_timeouts:
                self._replace(proc)  # it may still be busy with items we no longer want
                return
            t0 = time.monotonic()
            try:
                got = proc.conn.poll(hard)
            except (EOFError, OSError):
                got = True
            if not got:  # hard deadline passed: the worker is stuck
                results[i] = CallResult("timeout", f"no result after {hard:g} s; worker killed", time.monotonic() - t0)
                state["consecutive"] += 1
                state["i"] += 1
                self.stats["kills"] += 1
                self._replace(proc)
                return
            try:
                job_id, k, status, value, elapsed = proc.conn.recv()
            except (EOFError, OSError):
                why = describe_exit(proc.exitcode(wait=2.0))
                results[i] = CallResult("error", f"worker process died while running this call ({why})", time.monotonic() - t0)
                self.stats["deaths"] += 1
                state["consecutive"] = 0
                state["i"] += 1
                self._replace(proc)
                return
            if job_id != job:
                continue
            if status == "job_error":
                for kk in range(i, n):
                    results[kk] = CallResult("error", value, 0.0)
                state["i"] = n
                return
            if base + k != i:  # should not happen; be safe
                continue
            results[i] = CallResult(status, value, elapsed)
            state["consecutive"] = state["consecutive"] + 1 if status == "timeout" else 0
            state["i"] += 1

    def _replace(self, proc: Proc) -> None:
        """Kill ``proc`` and start its replacement right away (it warms up in the background)."""
        self._drop(proc)
        if not self._closed:
            self._launch()

    def close(self) -> None:
        """Stop the worker process (idempotent)."""
        with self._lock:
            self._closed = True
            finalize_proc(self._holder)
            self._finalizer.detach()
            _LIVE_WORKERS.discard(self)

    def __enter__(self) -> CallWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
