"""Starting and stopping one worker process (see :class:`segrl.rewards.workers.CallWorker`)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from .worker_child import fork_entry


def describe_exit(code: int | None) -> str:
    """``"exit code 1"``, ``"killed by signal SIGSEGV"``, or ``"exit status unknown"``."""
    if code is None:
        return "exit status unknown (still running)"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _quietly(fn: Callable, *args: Any) -> None:
    """Call ``fn``; a pipe or process that is already gone is not an error here."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001
        pass


class Proc:
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

    def _wait(self, timeout: float) -> None:
        try:
            if self.kind == "subprocess":
                self.handle.wait(timeout=timeout)
            else:
                self.handle.join(timeout=timeout)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired, a closed handle
            pass

    def exitcode(self, wait: float = 0.0) -> int | None:
        """The exit status (negative: killed by that signal); waits up to ``wait`` seconds for
        a process whose pipe just closed to be reaped."""
        if wait > 0:
            self._wait(wait)
        return self.handle.poll() if self.kind == "subprocess" else self.handle.exitcode

    def kill(self) -> None:
        _quietly(self.conn.close)
        _quietly(self.handle.kill)
        self._wait(5)

    def stop(self, timeout: float = 2.0) -> None:
        """Ask politely (send None / close the pipe), then kill."""
        _quietly(self.conn.send, None)
        _quietly(self.conn.close)
        self._wait(timeout)
        if self.alive():
            self.kill()


def finalize_proc(holder: list) -> None:
    """Stop the worker in ``holder[0]`` (a list shared with a ``weakref.finalize``)."""
    proc = holder[0] if holder else None
    if proc is not None:
        proc.stop(timeout=1.0)
        holder[0] = None


def launch_subprocess(funcs: list, init: Callable | None, memory_mb: float | None, name: str) -> Proc:
    """A fresh ``python -c`` interpreter that receives the pickled functions (not ``__main__``)."""
    parent_end, child_end = multiprocessing.Pipe(duplex=True)
    fd = child_end.fileno()
    env = os.environ.copy()
    paths = [p if p else os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    code = f"from segrl.rewards.worker_child import subprocess_entry; subprocess_entry({fd})"
    handle = subprocess.Popen(
        [sys.executable, "-c", code], pass_fds=(fd,), stdin=subprocess.DEVNULL, env=env, close_fds=True
    )
    child_end.close()
    proc = Proc(handle, parent_end, "subprocess")
    try:
        parent_end.send((paths, pickle.dumps((funcs, init, memory_mb))))
    except (BrokenPipeError, OSError):
        pass  # reported by CallWorker._wait_ready
    return proc


def launch_fork(funcs: list, init: Callable | None, memory_mb: float | None, name: str) -> Proc:
    """A ``multiprocessing`` fork: the worker inherits the functions (lambdas, closures)."""
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=True)
    handle = ctx.Process(
        target=fork_entry,
        args=(child_end, parent_end, funcs, init, memory_mb),
        name=name,
        daemon=False,
    )
    handle.start()
    child_end.close()
    return Proc(handle, parent_end, "fork")
