"""A name registry: ``name -> function`` (or factory) with per-entry metadata.

Used for every kind of extension point (advantage estimators and losses in
:mod:`segrl.algos.registry`, samplers in :mod:`segrl.samplers.registry`); each registry
documents the one signature its entries share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """``name -> function`` with per-entry metadata; names are registered once."""

    def __init__(self, kind: str):
        self.kind = kind
        self._fns: dict[str, F] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[F], F]:
        """Decorator: make ``fn`` available as ``registry[name]`` (``meta``: e.g. ``level``)."""

        def deco(fn: F) -> F:
            if name in self._fns and self._fns[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._fns[name] = fn
            self._meta[name] = dict(meta)
            return fn

        return deco

    def unregister(self, name: str) -> None:
        self._fns.pop(name, None)
        self._meta.pop(name, None)

    def __getitem__(self, name: str) -> F:
        try:
            return self._fns[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def meta(self, name: str) -> dict[str, Any]:
        self[name]  # the one-line error for an unknown name
        return self._meta[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._fns)
