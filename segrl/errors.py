"""Errors a user can fix by changing a command, a file or an install.

Their message names the problem and the fix in one line; the ``segrl`` command prints it as
``segrl: MESSAGE`` and exits with status 2 (``--debug`` shows the traceback instead).
Anything else that escapes a command is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib.util


class SegrlError(Exception):
    """A problem with the user's input or environment (not a bug in segrl)."""


class ModelLoadError(SegrlError, OSError):
    """``model.name_or_path`` does not name a model segrl can load (path, cache, files, chat
    template); an ``OSError`` like transformers' own loading errors."""


class DeviceError(SegrlError, RuntimeError):
    """The requested device is not available to this torch build or machine."""


class MissingDependencyError(SegrlError, ImportError):
    """An optional package a feature needs is not installed."""


class MissingFileError(SegrlError, FileNotFoundError):
    """A file the user named (or a package's data file) is not there."""


class StepNotFoundError(SegrlError, LookupError):
    """A run has no saved data for the requested training step."""


def require(module: str, extra: str, feature: str, package: str | None = None, hint: str = "") -> None:
    """Raise :class:`MissingDependencyError` unless ``module`` can be imported.

    Looked up with ``find_spec`` (nothing is imported), so a command can check its optional
    packages before any slow work starts. ``hint`` ends the message (e.g. what works without)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        found = False
    if not found:
        msg = f"{feature} needs {package or module}, which is not installed: pip install 'segrl[{extra}]'"
        raise MissingDependencyError(msg + (f" ({hint})" if hint else ""))
