"""The reward error budget: per function, the failed fraction of the last samples.

Each reward function has a sliding window of its last ``window`` samples (1 = failed). Once
at least ``min(window, min_samples)`` are in it and the failed fraction exceeds
``max_fraction``, :class:`RewardError` stops the run with the most recent failure's traceback.
A sample counts as failed only when that function failed on that very sample.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence


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


class ErrorBudget:
    """Failure windows of ``names`` (see the module docstring); ``max_fraction`` ``None`` or
    ``>= 1`` never raises."""

    def __init__(self, names: Sequence[str], max_fraction: float | None, window: int = 256, min_samples: int = 32):
        self.names = list(names)
        self.max_fraction = max_fraction
        self.window = int(window)
        self.min_samples = int(min_samples)
        self.windows = [collections.deque(maxlen=self.window) for _ in self.names]
        self.last_error = [""] * len(self.names)

    @property
    def active(self) -> bool:
        return self.max_fraction is not None and self.max_fraction < 1.0

    def _over(self, win: collections.deque) -> bool:
        need = min(self.window, self.min_samples)
        return self.active and len(win) >= need and len(win) > 0 and sum(win) / len(win) > self.max_fraction

    def record(self, j: int, failed: Sequence[bool], last_text: str | None = None) -> None:
        """Add function ``j``'s per-sample failure flags of one batch."""
        self.windows[j].extend(1 if f else 0 for f in failed)
        if last_text:
            self.last_error[j] = last_text

    def check(self, at_least: bool = False) -> None:
        """Raise :class:`RewardError` for the first function over its limit."""
        for j, name in enumerate(self.names):
            win = self.windows[j]
            if self._over(win):
                frac = sum(win) / len(win)
                raise RewardError(
                    f"reward function {name!r} failed on {'at least ' if at_least else ''}{frac:.0%} of the last "
                    f"{len(win)} samples (max_error_fraction={self.max_fraction})",
                    name,
                    self.last_error[j],
                )

    def certain_to_stop(self, j: int, known: Sequence[bool | None]) -> bool:
        """True when the batch whose flags are ``known`` (``None`` = not known yet) puts function
        ``j`` over its limit even if every unknown sample succeeds: the run stops after this
        batch whatever the rest does, so finding out is wasted time."""
        if not self.active:
            return False
        win = collections.deque(self.windows[j], maxlen=self.window)
        win.extend(1 if f else 0 for f in known)
        return self._over(win)

    def clear(self) -> None:
        for w in self.windows:
            w.clear()
