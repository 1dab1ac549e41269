"""One factory for rollout engines, backed by a small registry of backends.

``make_engine(cfg, model, tokenizer, seed=...)`` is how training, evaluation, ``segrl eval``
and the benchmarks get an engine (:class:`~segrl.engine.base.RolloutEngine`);
``cfg.sampling.backend`` names the backend:

* ``hf`` (default): decodes with the transformers model itself. The engine picks its KV
  layout (:func:`kv_layout`): the KV-pool engine (:mod:`segrl.engine.cascade_engine`) where
  the architecture is supported, with shared-prefix (cascade) blocks on the CPU and one
  static pool row per path on CUDA (static shapes: CUDA graphs); the ``DynamicCache``
  engine (:mod:`segrl.engine.hf_engine`) for other architectures or when asked for
  (``sampling.kv_sharing=copy``).
* ``vllm``: :mod:`segrl.engine.vllm_engine` (needs vllm installed).

A new backend is one new module with a builder registered under a name
(``@register_backend("name")``) plus one line in :data:`_MODULES`, so that naming it in the
config imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

from .base import RolloutEngine, SamplingParams


class EngineBuilder(Protocol):
    def __call__(self, cfg, model, tokenizer, params: SamplingParams, max_batch_size: int, seed: int) -> RolloutEngine: ...


#: name -> builder ``(cfg, model, tokenizer, params, max_batch_size, seed) -> RolloutEngine``
BACKENDS: dict[str, EngineBuilder] = {}

#: backends whose module registers them on import (loaded when first named)
_MODULES = {"vllm": "segrl.engine.vllm_engine"}


def register_backend(name: str) -> Callable[[EngineBuilder], EngineBuilder]:
    def deco(fn: EngineBuilder) -> EngineBuilder:
        BACKENDS[name] = fn
        return fn

    return deco


def backend_names() -> tuple[str, ...]:
    return tuple(sorted(set(BACKENDS) | set(_MODULES)))


def make_engine(
    cfg, model, tokenizer, *, seed: int = 0, params: SamplingParams | None = None, max_batch_size: int | None = None
) -> RolloutEngine:
    """The rollout engine ``cfg`` asks for, on ``model`` / ``tokenizer``.

    Args:
        cfg: a :class:`~segrl.configs.SegrlConfig` (``sampling.*`` and ``model.*`` are read).
        seed: seed of the engine's random generators.
        params: sampling parameters (default: ``cfg.sampling``'s temperature, top-p, top-k
            and stop strings).
        max_batch_size: rows decoded together (default ``cfg.sampling.max_batch_size``).
    """
    s = cfg.sampling
    if params is None:
        params = SamplingParams(s.temperature, s.top_p, s.top_k, tuple(s.stop_strings))
    name = s.backend
    if name not in BACKENDS and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in BACKENDS:
        raise ValueError(f"sampling.backend: unknown rollout backend {name!r}; known: {', '.join(backend_names())}")
    return BACKENDS[name](cfg, model, tokenizer, params, max_batch_size or s.max_batch_size, seed)


def kv_layout(cfg, model) -> str:
    """How the ``hf`` backend holds the KV: ``copy`` (a ``DynamicCache`` row per path),
    ``cascade`` (KV pools, shared prefixes stored and read once) or ``flat`` (KV pools, one
    row per path: static shapes for CUDA graphs). ``sampling.kv_sharing=auto`` takes
    ``cascade`` on the CPU and ``flat`` on CUDA; the old ``treepo.kv_sharing=copy`` still
    asks for ``copy``. Architectures the pool engine cannot decode get ``copy``."""
    from .model_runner import unsupported_reason

    want = getattr(cfg.sampling, "kv_sharing", "auto")
    if want == "copy" or getattr(getattr(cfg, "treepo", None), "kv_sharing", None) == "copy":
        return "copy"
    if unsupported_reason(model) is not None:
        return "copy"
    if want == "auto":
        return "flat" if next(model.parameters()).device.type == "cuda" else "cascade"
    return want


@register_backend("hf")
def build_hf(cfg, model, tokenizer, params: SamplingParams, max_batch_size: int, seed: int) -> RolloutEngine:
    """The ``hf`` backend: the pool engine or the ``DynamicCache`` engine (:func:`kv_layout`)."""
    layout = kv_layout(cfg, model)
    if layout == "copy":
        from .hf_engine import Engine

        return Engine(model, tokenizer, params, max_batch_size=max_batch_size, seed=seed)
    from .cascade_engine import CascadeEngine

    graphs = bool(getattr(cfg.sampling, "cuda_graphs", True))
    return CascadeEngine(model, tokenizer, params, max_batch_size=max_batch_size, seed=seed, layout=layout, cuda_graphs=graphs)
