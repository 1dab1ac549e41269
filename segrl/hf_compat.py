"""The one transformers API difference segrl bridges: the KV cache's name.

transformers 5.24 renamed a model's ``past_key_values`` argument and output field to
``cache`` (the old argument name is deprecated there). segrl passes and reads the cache under
the name of the installed version, so it runs on the transformers releases that vLLM and TRL
accept as well as on the newest (``pyproject.toml`` states the range).
"""

from __future__ import annotations

import re

import transformers


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])


#: keyword a model's forward takes its KV cache by (and the output field that returns it)
CACHE_ARG = "cache" if _release(transformers.__version__) >= (5, 24) else "past_key_values"


def cache_kw(cache) -> dict:
    """``model(..., **cache_kw(cache))``: the cache under this transformers' argument name."""
    return {CACHE_ARG: cache}


def output_cache(out):
    """The KV cache a model's forward returned."""
    return getattr(out, CACHE_ARG)
