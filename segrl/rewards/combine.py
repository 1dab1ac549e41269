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
* **Per-sample isolation.** When a whole-batch call fails (exception, timeout, wrong length),
  the function is called again once per sample to find which samples fail; the others keep
  their real reward. Isolation stops early after ``isolation_max_timeouts`` consecutive
  per-sample timeouts (the remaining samples count as timed out) so that a function that always
  hangs costs about ``(1 + isolation_max_timeouts) * timeout_s`` per batch, not ``n * timeout_s``.
* **Real timeouts.** A hanging pure-Python function cannot be interrupted in a thread, so when
  ``timeout_s`` is set the functions run in a persistent worker process
  (:class:`CallWorker`). Inside the worker a ``SIGALRM`` timer interrupts Python code at
  ``timeout_s`` (cheap: the worker survives); if the function does not give control back
  (C code, a swallowed interrupt, a deadlock) the parent kills the worker at
  ``timeout_s + grace`` and starts a new one (costs one worker start-up).
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
"""

from __future__ import annotations

import atexit
import collections
import importlib
import importlib.util
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # noqa: F401  (registered before our atexit hook, so ours runs first)
import numbers
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "CallResult",
    "CallWorker",
    "RewardComputer",
    "RewardError",
    "RewardOutput",
    "WorkerStartError",
    "load_reward_func",
    "reward_func_name",
]


# ----------------------------------------------------------------------------------------------
# Generic persistent worker with hard deadlines
# ----------------------------------------------------------------------------------------------


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


class _SoftTimeout(BaseException):
    """Raised by the worker's SIGALRM handler. A BaseException so ``except Exception`` in user
    code (and in math-verify) does not swallow it."""


def _alarm_handler(signum, frame):  # pragma: no cover - runs in the worker
    raise _SoftTimeout()


def _set_timer(seconds: float | None) -> None:
    if seconds is not None and seconds > 0:
        signal.setitimer(signal.ITIMER_REAL, seconds)


def _clear_timer() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


def _run_one(
    fn: Callable, args: tuple, kwargs: dict, soft_timeout: float | None, use_timer: bool, inline: bool = False
) -> tuple[str, Any]:
    try:
        if use_timer:
            _set_timer(soft_timeout)
        try:
            value = fn(*args, **kwargs)
        finally:
            if use_timer:
                _clear_timer()
        return "ok", value
    except _SoftTimeout:
        return "timeout", f"interrupted after {soft_timeout:g} s"
    except KeyboardInterrupt:
        if inline:  # Ctrl-C in the caller's process must still stop the caller
            raise
        return "error", traceback.format_exc()
    except BaseException:  # noqa: BLE001 - we report everything, including SystemExit
        return "error", traceback.format_exc()


def _child_loop(conn, funcs: list, init: Callable | None) -> None:  # pragma: no cover - worker side
    """Main loop of a worker process (both start methods)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; it closes us
    except (ValueError, OSError):
        pass
    use_timer = hasattr(signal, "setitimer")
    if use_timer:
        signal.signal(signal.SIGALRM, _alarm_handler)
    try:
        if init is not None:
            init()
    except BaseException:  # noqa: BLE001
        try:
            conn.send(("init_error", traceback.format_exc()))
        finally:
            return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            header = conn.recv()
        except (EOFError, OSError):
            return  # parent is gone or closed the pipe
        if header is None:
            return
        job_id, blob = header
        try:
            shared_kwargs, items, soft_timeout = pickle.loads(blob)
        except BaseException:  # noqa: BLE001 - e.g. a column object whose class is not importable here
            conn.send((job_id, -1, "job_error", traceback.format_exc(), 0.0))
            continue
        for i, (fn_index, args, kwargs) in enumerate(items):
            if shared_kwargs:
                kwargs = {**shared_kwargs, **kwargs}
            t0 = time.monotonic()
            status, value = _run_one(funcs[fn_index], args, kwargs, soft_timeout, use_timer)
            elapsed = time.monotonic() - t0
            try:
                conn.send((job_id, i, status, value, elapsed))
            except (BrokenPipeError, EOFError, OSError):
                return
            except BaseException:  # noqa: BLE001 - unpicklable result
                conn.send((job_id, i, "error", "result could not be sent back (not picklable):\n" + traceback.format_exc(), elapsed))


def _fork_entry(conn, parent_end, funcs, init):  # pragma: no cover - worker side
    parent_end.close()  # so we see EOF when the parent dies
    _child_loop(conn, funcs, init)


def _subprocess_entry(fd: int) -> None:  # pragma: no cover - worker side
    """Entry point of a ``python -c`` worker: receive the pickled functions, then serve."""
    conn = multiprocessing.connection.Connection(fd)
    try:
        sys_path, blob = conn.recv()
        for p in reversed(sys_path):
            if p not in sys.path:
                sys.path.insert(0, p)
        funcs, init = pickle.loads(blob)
    except BaseException:  # noqa: BLE001
        try:
            conn.send(("init_error", traceback.format_exc()))
        finally:
            return
    _child_loop(conn, funcs, init)


def _is_transferable(obj: Any) -> bool:
    """True when a fresh interpreter can unpickle ``obj`` (by reference, no ``__main__``)."""
    try:
        blob = pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - lambdas, closures, local classes, ...
        return False
    return b"__main__" not in blob and b"__mp_main__" not in blob


_LIVE_WORKERS: "weakref.WeakSet[CallWorker]" = weakref.WeakSet()


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


class _Proc:
    """A started worker: the process handle and our end of the pipe."""

    def __init__(self, handle: Any, conn: Any, kind: str):
        self.handle = handle
        self.conn = conn
        self.kind = kind
        self.ready = False
        self.pid = handle.pid

    def alive(self) -> bool:
        if self.kind == "subprocess":
            return self.handle.poll() is None
        return self.handle.is_alive()

    def exitcode(self):
        return self.handle.poll() if self.kind == "subprocess" else self.handle.exitcode

    def kill(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.handle.kill()
        except Exception:  # noqa: BLE001
            pass
        try:
            if self.kind == "subprocess":
                self.handle.wait(timeout=5)
            else:
                self.handle.join(timeout=5)
        except Exception:  # noqa: BLE001
            pass

    def stop(self, timeout: float = 2.0) -> None:
        """Ask politely (send None / close the pipe), then kill."""
        try:
            self.conn.send(None)
        except Exception:  # noqa: BLE001
            pass
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            if self.kind == "subprocess":
                self.handle.wait(timeout=timeout)
            else:
                self.handle.join(timeout=timeout)
        except Exception:  # noqa: BLE001
            pass
        if self.alive():
            self.kill()


def _finalize_proc(holder: list) -> None:
    proc = holder[0] if holder else None
    if proc is not None:
        proc.stop(timeout=1.0)
        holder[0] = None


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
    ):
        self.funcs = list(funcs)
        self.init = init
        self.name = name
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self.start_method = self._pick_start_method(start_method)
        self._lock = threading.RLock()
        self._holder: list = [None]  # [_Proc | None], shared with the finalizer
        self._finalizer = weakref.finalize(self, _finalize_proc, self._holder)
        self._job = 0
        self._closed = False
        self.stats = {"starts": 0, "kills": 0, "timeouts": 0, "errors": 0, "calls": 0}
        _LIVE_WORKERS.add(self)

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

    def _launch(self) -> "_Proc":
        self.stats["starts"] += 1
        if self.start_method == "subprocess":
            parent_end, child_end = multiprocessing.Pipe(duplex=True)
            fd = child_end.fileno()
            env = os.environ.copy()
            paths = [p if p else os.getcwd() for p in sys.path]
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
            code = f"from segrl.rewards.combine import _subprocess_entry; _subprocess_entry({fd})"
            handle = subprocess.Popen(
                [sys.executable, "-c", code],
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                env=env,
                close_fds=True,
            )
            child_end.close()
            proc = _Proc(handle, parent_end, "subprocess")
            try:
                parent_end.send((paths, pickle.dumps((self.funcs, self.init))))
            except (BrokenPipeError, OSError):
                pass  # reported by _wait_ready
        else:
            ctx = multiprocessing.get_context("fork")
            parent_end, child_end = ctx.Pipe(duplex=True)
            handle = ctx.Process(
                target=_fork_entry, args=(child_end, parent_end, self.funcs, self.init), name=self.name, daemon=False
            )
            handle.start()
            child_end.close()
            proc = _Proc(handle, parent_end, "fork")
        self._holder[0] = proc
        return proc

    def _wait_ready(self, proc: "_Proc") -> None:
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
                    code = proc.exitcode()
                    self._drop(proc)
                    raise WorkerStartError(f"{self.name}: worker process exited during start-up (exit code {code})")
                if msg[0] == "ready":
                    proc.ready = True
                    return
                if msg[0] == "init_error":
                    self._drop(proc)
                    raise WorkerStartError(f"{self.name}: worker failed to start", msg[1])
                continue
            if left <= 0:
                self._drop(proc)
                raise WorkerStartError(f"{self.name}: worker not ready after {self.startup_timeout_s:g} s")

    def _drop(self, proc: "_Proc") -> None:
        proc.kill()
        if self._holder[0] is proc:
            self._holder[0] = None

    def start(self, wait: bool = False) -> "CallWorker":
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
        old = signal.signal(signal.SIGALRM, _alarm_handler) if use_timer else None
        try:
            for fn_index, args, kwargs in items:
                if stop_after_timeouts is not None and consecutive >= stop_after_timeouts:
                    results.append(CallResult("timeout", "not attempted (too many consecutive timeouts)", 0.0))
                    continue
                t0 = time.monotonic()
                status, value = _run_one(
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
        consecutive = 0
        i = 0
        while i < n:
            if stop_after_timeouts is not None and consecutive >= stop_after_timeouts:
                for k in range(i, n):
                    results[k] = CallResult("timeout", "not attempted (too many consecutive timeouts)", 0.0)
                break
            try:
                blob = pickle.dumps((shared_kwargs, items[i:], timeout_s))
            except Exception as e:  # noqa: BLE001
                raise TypeError(f"{self.name}: call arguments cannot be pickled for the worker process: {e}") from e
            proc = self._holder[0]
            if proc is None or not proc.alive():
                if proc is not None:
                    self._drop(proc)
                proc = self._launch()
            self._wait_ready(proc)
            self._job += 1
            job = self._job
            try:
                proc.conn.send((job, blob))
            except (BrokenPipeError, EOFError, OSError):
                self._drop(proc)
                self._launch()
                continue  # resend to a fresh worker
            base = i
            while i < n:
                if stop_after_timeouts is not None and consecutive >= stop_after_timeouts:
                    # The worker may still be busy with items we no longer want: replace it.
                    self._replace(proc)
                    break
                t0 = time.monotonic()
                try:
                    got = proc.conn.poll(hard)
                except (EOFError, OSError):
                    got = True
                if not got:  # hard deadline passed: the worker is stuck
                    results[i] = CallResult("timeout", f"no result after {hard:g} s; worker killed", time.monotonic() - t0)
                    consecutive += 1
                    i += 1
                    self.stats["kills"] += 1
                    self._replace(proc)
                    break
                try:
                    job_id, k, status, value, elapsed = proc.conn.recv()
                except (EOFError, OSError):
                    code = proc.exitcode()
                    results[i] = CallResult(
                        "error", f"worker process died while running this call (exit code {code})", time.monotonic() - t0
                    )
                    consecutive = 0
                    i += 1
                    self._replace(proc)
                    break
                if job_id != job:
                    continue
                if status == "job_error":
                    for kk in range(i, n):
                        results[kk] = CallResult("error", value, 0.0)
                    i = n
                    break
                if base + k != i:  # should not happen; be safe
                    continue
                results[i] = CallResult(status, value, elapsed)
                consecutive = consecutive + 1 if status == "timeout" else 0
                i += 1
        return [r if r is not None else CallResult("error", "no result", 0.0) for r in results]

    def _replace(self, proc: "_Proc") -> None:
        """Kill ``proc`` and start its replacement right away (it warms up in the background)."""
        self._drop(proc)
        if not self._closed:
            self._launch()

    def close(self) -> None:
        """Stop the worker process (idempotent)."""
        with self._lock:
            self._closed = True
            _finalize_proc(self._holder)
            self._finalizer.detach()
            _LIVE_WORKERS.discard(self)

    def __enter__(self) -> "CallWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Reward functions: naming and loading
# ----------------------------------------------------------------------------------------------


def reward_func_name(func: Any) -> str:
    """The metric name of a reward function, as TRL does it (``__name__``), with fallbacks for
    ``functools.partial`` objects and callable instances."""
    name = getattr(func, "__name__", None)
    if name is None and hasattr(func, "func"):  # functools.partial
        name = getattr(func.func, "__name__", None)
    if name is None:
        name = type(func).__name__
    return str(name)


class FileRewardFunc:
    """A function loaded from a ``.py`` file by :func:`load_reward_func`.

    Picklable (it pickles as the file path and function name and re-loads the file on the other
    side), so it works in a worker process started without your script.
    """

    def __init__(self, path: str | os.PathLike, func_name: str):
        self.path = str(Path(path).resolve())
        self.func_name = func_name
        self.__name__ = func_name
        self._func: Callable | None = None
        self._load()

    def _load(self) -> Callable:
        if self._func is None:
            path = Path(self.path)
            if not path.is_file():
                raise FileNotFoundError(f"reward function file not found: {path}")
            mod_name = f"_segrl_user_{path.stem}_{abs(hash(str(path))) & 0xFFFFFF:x}"
            module = sys.modules.get(mod_name)
            if module is None:
                spec = importlib.util.spec_from_file_location(mod_name, path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot import {path}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[mod_name]
                    raise
            func = getattr(module, self.func_name, None)
            if func is None:
                raise AttributeError(f"{path} has no function {self.func_name!r}")
            if not callable(func):
                raise TypeError(f"{path}:{self.func_name} is not callable")
            self._func = func
        return self._func

    def __call__(self, *args, **kwargs):
        return self._load()(*args, **kwargs)

    def __getstate__(self):
        return {"path": self.path, "func_name": self.func_name}

    def __setstate__(self, state):
        self.path = state["path"]
        self.func_name = state["func_name"]
        self.__name__ = self.func_name
        self._func = None

    def __repr__(self) -> str:
        return f"FileRewardFunc({self.path!r}, {self.func_name!r})"


def load_reward_func(spec: str) -> Callable:
    """Load a reward function from a CLI-style spec.

    * ``"package.module:function"`` (or ``"package.module.function"``) imports the module;
    * ``"path/to/file.py:function"`` loads the file (returns a picklable :class:`FileRewardFunc`).

    Raises ``ValueError`` for a malformed spec, ``ImportError``/``FileNotFoundError``/
    ``AttributeError`` when the module, file or function is missing, ``TypeError`` when the
    object is not callable.
    """
    spec = spec.strip()
    if ":" in spec:
        target, func_name = spec.rsplit(":", 1)
    elif "." in spec and not spec.endswith(".py"):
        target, func_name = spec.rsplit(".", 1)
    else:
        raise ValueError(f"reward function spec must be 'module.path:function' or 'file.py:function', got {spec!r}")
    if not target or not func_name or not func_name.isidentifier():
        raise ValueError(f"reward function spec must be 'module.path:function' or 'file.py:function', got {spec!r}")
    if target.endswith(".py") or os.sep in target or "/" in target:
        return FileRewardFunc(target, func_name)
    module = importlib.import_module(target)
    func = getattr(module, func_name, None)
    if func is None:
        raise AttributeError(f"module {target!r} has no attribute {func_name!r}")
    if not callable(func):
        raise TypeError(f"{spec} is not callable")
    return func


# ----------------------------------------------------------------------------------------------
# RewardComputer
# ----------------------------------------------------------------------------------------------


class RewardError(RuntimeError):
    """Too many reward-function failures. ``traceback`` holds the original traceback text (or the
    validation message) of the most recent failure; ``func_name`` names the function."""

    def __init__(self, message: str, func_name: str = "", traceback_text: str = ""):
        full = message
        if traceback_text:
            who = f" of {func_name!r}" if func_name else ""
            full += f"\n\nMost recent failure{who}:\n{traceback_text}"
        super().__init__(full)
        self.func_name = func_name
        self.traceback = traceback_text


@dataclass
class RewardOutput:
    """Result of one :class:`RewardComputer` call.

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


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    m = math.fsum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    var = math.fsum((v - m) ** 2 for v in values) / (len(values) - 1)  # unbiased, like TRL's nanstd
    return m, math.sqrt(var)


def _to_float(v: Any) -> tuple[float | None, str | None]:
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


def _validate(ret: Any, n: int) -> tuple[list[float | None] | None, list[str | None] | None, str | None]:
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
        f, problem = _to_float(v)
        values.append(f)
        problems.append(problem)
    return values, problems, None


def _slice_columns(columns: dict, n: int, i: int) -> dict:
    out = {}
    for k, v in columns.items():
        if isinstance(v, (list, tuple)) and len(v) == n:
            out[k] = type(v)([v[i]]) if isinstance(v, tuple) else [v[i]]
        elif hasattr(v, "__getitem__") and hasattr(v, "shape") and len(getattr(v, "shape", ())) > 0 and v.shape[0] == n:
            out[k] = v[i : i + 1]
        else:
            out[k] = v
    return out


class RewardComputer:
    """Weighted sum of TRL-style reward functions with contained failures and real timeouts.

    Args:
        funcs: reward functions ``f(prompts, completions, **columns) -> list[float | None]``
            (called with keyword arguments, like TRL). Strings are loaded with
            :func:`load_reward_func`.
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
        isolation_max_timeouts: during per-sample isolation, give up after this many consecutive
            per-sample timeouts (the rest count as timed out).
        start_method: worker start method, see :class:`CallWorker` (``"auto"`` picks
            ``"subprocess"`` when every function is importable by a fresh interpreter, else
            ``"fork"``).
        names: metric names (default: the functions' ``__name__``; duplicates get ``_2``...).

    Calling the object returns a :class:`RewardOutput`. Call :meth:`close` (or use ``with``)
    to stop the worker; it is also stopped at interpreter exit.
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
        isolation_max_timeouts: int = 2,
        start_method: str = "auto",
        names: Sequence[str] | None = None,
        startup_timeout_s: float = 120.0,
    ):
        funcs = [load_reward_func(f) if isinstance(f, str) else f for f in funcs]
        if not funcs:
            raise ValueError("RewardComputer needs at least one reward function")
        for f in funcs:
            if not callable(f):
                raise TypeError(f"reward function {f!r} is not callable")
        if weights is None:
            weights = [1.0] * len(funcs)
        weights = [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise ValueError(f"got {len(weights)} weights for {len(funcs)} reward functions")
        if not math.isfinite(fallback):
            raise ValueError("fallback must be finite")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError("timeout_s must be positive or None")
        self.funcs = funcs
        self.weights = weights
        self.timeout_s = timeout_s
        self.fallback = float(fallback)
        self.max_error_fraction = max_error_fraction
        self.error_window = int(error_window)
        self.error_min_samples = int(error_min_samples)
        self.isolation_max_timeouts = isolation_max_timeouts
        if names is None:
            names = [reward_func_name(f) for f in funcs]
        if len(names) != len(funcs):
            raise ValueError("names must match funcs")
        seen: dict[str, int] = {}
        self.names: list[str] = []
        for nm in names:
            seen[nm] = seen.get(nm, 0) + 1
            self.names.append(nm if seen[nm] == 1 else f"{nm}_{seen[nm]}")
        self._windows = [collections.deque(maxlen=self.error_window) for _ in funcs]
        self._last_error: list[str] = [""] * len(funcs)
        self.total_errors = 0
        self.total_samples = 0
        self._lock = threading.Lock()
        # Which functions go to the worker.
        self._inline = [bool(getattr(f, "segrl_inline", False)) or timeout_s is None for f in funcs]
        remote = [f for f, inl in zip(funcs, self._inline) if not inl]
        self._remote_index = {}
        k = 0
        for j, inl in enumerate(self._inline):
            if not inl:
                self._remote_index[j] = k
                k += 1
        self._worker = (
            CallWorker(remote, start_method=start_method, startup_timeout_s=startup_timeout_s, name="segrl-reward-worker")
            if remote
            else None
        )
        self._local = CallWorker(funcs, start_method="inline", name="segrl-reward-inline")
        if self._worker is not None:
            self._worker.start(wait=False)  # warms up while the caller does other things

    def start(self, wait: bool = True) -> "RewardComputer":
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

    def _call(self, j: int, kwargs_list: list[dict], shared: dict, stop_after_timeouts=None) -> list[CallResult]:
        """Run function j once per kwargs in ``kwargs_list`` (merged over ``shared``)."""
        if self._inline[j] or self._worker is None:
            return self._local.run([(j, (), kw) for kw in kwargs_list], None, shared, stop_after_timeouts)
        k = self._remote_index[j]
        try:
            return self._worker.run([(k, (), kw) for kw in kwargs_list], self.timeout_s, shared, stop_after_timeouts)
        except WorkerStartError as e:
            raise RewardError(
                f"reward worker could not start for {self.names[j]!r}: {e.args[0].splitlines()[0]}",
                self.names[j],
                e.traceback,
            ) from e
        except TypeError as e:
            if "cannot be pickled" not in str(e):
                raise
            logger.warning("%s; calling %r in-process without a timeout", e, self.names[j])
            return self._local.run([(j, (), kw) for kw in kwargs_list], None, shared, stop_after_timeouts)

    def _call_batch_all(self, shared: dict) -> list[CallResult]:
        """One whole-batch call per function: remote functions in one worker round trip."""
        out: list[CallResult | None] = [None] * len(self.funcs)
        remote_js = [j for j in range(len(self.funcs)) if not self._inline[j] and self._worker is not None]
        if remote_js:
            try:
                res = self._worker.run([(self._remote_index[j], (), {}) for j in remote_js], self.timeout_s, shared)
                for j, r in zip(remote_js, res):
                    out[j] = r
            except WorkerStartError as e:
                j = remote_js[0]
                raise RewardError(
                    f"reward worker could not start: {e.args[0].splitlines()[0]}", self.names[j], e.traceback
                ) from e
            except TypeError as e:
                if "cannot be pickled" not in str(e):
                    raise
                logger.warning("%s; calling reward functions in-process without a timeout", e)
                for j in remote_js:
                    out[j] = self._local.run([(j, (), {})], None, shared)[0]
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
        prompts = list(prompts)
        completions = list(completions)
        shared = {"prompts": prompts, "completions": completions, **columns}
        nf = len(self.funcs)
        values: list[list[float | None]] = [[None] * n for _ in range(nf)]
        failed: list[list[bool]] = [[False] * n for _ in range(nf)]
        timed_out = 0
        errors: list[tuple[str, str]] = []
        if n == 0:
            return self._finish(values, failed, errors, 0, 0)

        batch_results = self._call_batch_all(shared)
        for j, res in enumerate(batch_results):
            batch_problem = None
            if res.status == "ok":
                vals, problems, batch_problem = _validate(res.value, n)
                if batch_problem is None:
                    for i in range(n):
                        if problems[i] is not None:
                            failed[j][i] = True
                            errors.append((self.names[j], f"sample {i}: {problems[i]}"))
                        else:
                            values[j][i] = vals[i]
                    continue
                batch_text = f"{self.names[j]} {batch_problem}"
            elif res.status == "timeout":
                batch_text = f"{self.names[j]} timed out on the whole batch ({res.value})"
            else:
                batch_text = res.value
            # Whole-batch failure: isolate per sample.
            logger.debug("reward function %s failed on the whole batch; isolating samples", self.names[j])
            per = [_slice_columns(shared, n, i) for i in range(n)]
            single = self._call(j, per, {}, stop_after_timeouts=self.isolation_max_timeouts)
            for i, r in enumerate(single):
                if r.status == "ok":
                    vals, problems, bp = _validate(r.value, 1)
                    problem = bp or (problems[0] if problems else None)
                    if problem is None:
                        values[j][i] = vals[0]
                        continue
                    text = f"sample {i}: {self.names[j]} {problem}"
                else:
                    text = r.value
                    if r.status == "timeout":
                        timed_out += 1
                        text = f"sample {i}: {self.names[j]} timed out ({r.value})"
                failed[j][i] = True
                errors.append((self.names[j], text if text else batch_text))
            if not any(failed[j]):
                level = logging.WARNING if res.status == "timeout" else logging.DEBUG
                logger.log(
                    level,
                    "%s failed on the whole batch but on no single sample (%s); if it is just slow, raise timeout_s",
                    self.names[j],
                    batch_text.strip().splitlines()[-1] if batch_text else res.status,
                )
        return self._finish(values, failed, errors, timed_out, n)

    def _finish(self, values, failed, errors, timed_out, n) -> RewardOutput:
        nf = len(self.funcs)
        used: list[list[float | None]] = []
        for j in range(nf):
            used.append([self.fallback if failed[j][i] else values[j][i] for i in range(n)])
        totals = []
        for i in range(n):
            s = 0.0
            for j in range(nf):
                v = used[j][i]
                if v is not None:
                    s += self.weights[j] * v
            totals.append(s)
        metrics: dict[str, float] = {}
        n_err = 0
        for j, name in enumerate(self.names):
            real = [values[j][i] for i in range(n) if not failed[j][i] and values[j][i] is not None]
            m, s = _mean_std(real)
            metrics[f"rewards/{name}/mean"] = m
            metrics[f"rewards/{name}/std"] = s
            e = sum(failed[j])
            metrics[f"rewards/{name}/errors"] = float(e)
            n_err += e
        tm, ts = _mean_std(totals)
        metrics["reward"] = tm
        metrics["reward_std"] = ts
        metrics["rewards/errors"] = float(n_err)
        metrics["rewards/timeouts"] = float(timed_out)
        self.total_errors += n_err
        self.total_samples += n
        if errors:
            for name, text in errors[:3]:
                logger.warning("reward function %s failed: %s", name, text.strip().splitlines()[-1] if text else "")
        out = RewardOutput(
            rewards=totals,
            per_func={nm: used[j] for j, nm in enumerate(self.names)},
            failed={nm: failed[j] for j, nm in enumerate(self.names)},
            metrics=metrics,
            errors=errors,
        )
        self._update_error_budget(failed, errors)
        return out

    def _update_error_budget(self, failed, errors) -> None:
        last_text: dict[str, str] = {}
        for name, text in errors:
            last_text[name] = text
        for j, name in enumerate(self.names):
            self._windows[j].extend(1 if f else 0 for f in failed[j])
            if name in last_text:
                self._last_error[j] = last_text[name]
        if self.max_error_fraction is None or self.max_error_fraction >= 1.0:
            return
        need = min(self.error_window, self.error_min_samples)
        for j, name in enumerate(self.names):
            win = self._windows[j]
            if len(win) >= need and win:
                frac = sum(win) / len(win)
                if frac > self.max_error_fraction:
                    raise RewardError(
                        f"reward function {name!r} failed on {frac:.0%} of the last {len(win)} samples "
                        f"(max_error_fraction={self.max_error_fraction})",
                        name,
                        self._last_error[j],
                    )

    def reset_error_window(self) -> None:
        """Forget past failures (e.g. after fixing something between runs)."""
        for w in self._windows:
            w.clear()

    def close(self) -> None:
        """Stop the worker process (idempotent)."""
        if self._worker is not None:
            self._worker.close()

    def __enter__(self) -> "RewardComputer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
