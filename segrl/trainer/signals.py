"""SIGINT/SIGTERM during training: finish the step, save a checkpoint, exit cleanly.

:func:`stop_signals` installs a handler for the duration of a run (main thread only; a
library call from another thread keeps the process's handlers). The handler only records the
signal; the training loop checks it after each step. A second signal raises
``KeyboardInterrupt`` at once (the last checkpoint is intact).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_signals(handler: Callable[[int, object], None]):
    """Route SIGINT and SIGTERM to ``handler(signum, frame)`` inside the ``with`` block."""
    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
