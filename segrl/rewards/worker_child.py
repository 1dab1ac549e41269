"""The worker side of :class:`segrl.rewards.workers.CallWorker`: the loop a worker process runs.

A worker receives jobs ``(job_id, pickled (shared_kwargs, items, soft_timeout))`` on its pipe
and streams back one ``(job_id, index, status, value, elapsed)`` per item. It ignores Ctrl-C
(the parent decides), interrupts a call at ``soft_timeout`` with a ``SIGALRM`` timer, and runs
under an address-space limit when one is given, so a function that allocates too much gets a
``MemoryError`` (an error for its samples) instead of pushing the machine into the OOM killer.
It exits quietly when the parent is gone: end of file on its pipe, or a broken pipe on a send.
"""

from __future__ import annotations

import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

#: messages a worker sends before serving: ``("ready", pid)`` or ``("init_error", traceback)``
READY, INIT_ERROR = "ready", "init_error"


class SoftTimeout(BaseException):
    """Raised by the worker's SIGALRM handler. A BaseException so ``except Exception`` in user
    code (and in math-verify) does not swallow it."""


def _alarm_handler(signum, frame):  # pragma: no cover - runs in the worker
    raise SoftTimeout()


def install_alarm() -> Any:
    """Install the SIGALRM handler; returns the previous one."""
    return signal.signal(signal.SIGALRM, _alarm_handler)


def _set_timer(seconds: float | None) -> None:
    if seconds is not None and seconds > 0:
        signal.setitimer(signal.ITIMER_REAL, seconds)


def _clear_timer() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


def run_one(
    fn: Callable, args: tuple, kwargs: dict, soft_timeout: float | None, use_timer: bool, inline: bool = False
) -> tuple[str, Any]:
    """Call ``fn``: ``("ok", value)``, ``("timeout", why)`` or ``("error", traceback text)``."""
    try:
        if use_timer:
            _set_timer(soft_timeout)
        try:
            value = fn(*args, **kwargs)
        finally:
            if use_timer:
                _clear_timer()
        return "ok", value
    except SoftTimeout:
        return "timeout", f"interrupted after {soft_timeout:g} s"
    except KeyboardInterrupt:
        if inline:  # Ctrl-C in the caller's process must still stop the caller
            raise
        return "error", traceback.format_exc()
    except MemoryError:
        return "error", traceback.format_exc().rstrip("\n") + " (over the worker's memory limit, data.reward_memory_mb)\n"
    except BaseException:  # noqa: BLE001 - we report everything, including SystemExit
        return "error", traceback.format_exc()


def _vm_bytes() -> int | None:
    """This process's current address-space size (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def set_memory_limit(limit_mb: float | None) -> None:
    """Cap the address space at what the process uses now plus ``limit_mb`` MiB.

    Relative to the current size because a forked worker inherits the trainer's address space
    (a CUDA process reserves far more than it uses). Best effort: no limit where
    ``RLIMIT_AS`` or ``/proc`` is missing."""
    if not limit_mb or limit_mb <= 0:
        return
    try:
        import resource
    except ImportError:  # pragma: no cover - non-POSIX
        return
    now = _vm_bytes()
    if now is None:
        return
    want = now + int(limit_mb * 2**20)
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        if soft == resource.RLIM_INFINITY or want < soft:
            resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    except (ValueError, OSError):  # pragma: no cover - a platform that refuses the limit
        pass


def _send(conn, msg) -> bool:
    """Send to the parent; False when the parent is gone (the worker then exits quietly)."""
    try:
        conn.send(msg)
        return True
    except (BrokenPipeError, EOFError, OSError):
        return False


def _serve_job(conn, funcs: list, job_id: int, blob: bytes, use_timer: bool) -> bool:
    """Run one job's items, streaming results back. False when the parent is gone."""
    try:
        shared_kwargs, items, soft_timeout = pickle.loads(blob)
    except BaseException:  # noqa: BLE001 - e.g. a column object whose class is not importable here
        return _send(conn, (job_id, -1, "job_error", traceback.format_exc(), 0.0))
    for i, (fn_index, args, kwargs) in enumerate(items):
        if shared_kwargs:
            kwargs = {**shared_kwargs, **kwargs}
        t0 = time.monotonic()
        status, value = run_one(funcs[fn_index], args, kwargs, soft_timeout, use_timer)
        elapsed = time.monotonic() - t0
        try:
            conn.send((job_id, i, status, value, elapsed))
        except (BrokenPipeError, EOFError, OSError):
            return False
        except BaseException:  # noqa: BLE001 - unpicklable result
            text = "result could not be sent back (not picklable):\n" + traceback.format_exc()
            if not _send(conn, (job_id, i, "error", text, elapsed)):
                return False
    return True


def child_loop(conn, funcs: list, init: Callable | None, memory_mb: float | None = None) -> None:  # pragma: no cover
    """Main loop of a worker process (both start methods)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent; it closes us
    except (ValueError, OSError):
        pass
    use_timer = hasattr(signal, "setitimer")
    if use_timer:
        install_alarm()
    try:
        if init is not None:
            init()
        set_memory_limit(memory_mb)
    except BaseException:  # noqa: BLE001
        _send(conn, (INIT_ERROR, traceback.format_exc()))
        return
    if not _send(conn, (READY, os.getpid())):
        return
    while True:
        try:
            header = conn.recv()
        except (EOFError, OSError):
            return  # parent is gone or closed the pipe
        if header is None:
            return
        job_id, blob = header
        if not _serve_job(conn, funcs, job_id, blob, use_timer):
            return


def fork_entry(conn, parent_end, funcs, init, memory_mb=None):  # pragma: no cover - worker side
    parent_end.close()  # so we see EOF when the parent dies
    child_loop(conn, funcs, init, memory_mb)


def subprocess_entry(fd: int) -> None:  # pragma: no cover - worker side
    """Entry point of a ``python -c`` worker: receive the pickled functions, then serve."""
    conn = multiprocessing.connection.Connection(fd)
    try:
        sys_path, blob = conn.recv()
        for p in reversed(sys_path):
            if p not in sys.path:
                sys.path.insert(0, p)
        funcs, init, memory_mb = pickle.loads(blob)
    except BaseException:  # noqa: BLE001
        _send(conn, (INIT_ERROR, traceback.format_exc()))
        return
    child_loop(conn, funcs, init, memory_mb)
