"""Reward functions from a spec string (``module:function`` or ``file.py:function``) and their
metric names (TRL's ``__name__`` convention)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["FileRewardFunc", "load_reward_func", "reward_func_name"]


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
                except BaseException as e:
                    del sys.modules[mod_name]
                    if isinstance(e, SystemExit):  # would end the trainer without a word
                        raise ImportError(f"importing {path} called sys.exit({e.code!r})") from None
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
