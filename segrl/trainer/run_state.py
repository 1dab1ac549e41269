"""The trainer's position in a run, as plain JSON (``trainer_state.json`` of a checkpoint).

Besides the weights and the optimizer, resuming a run exactly needs: the step, the data cursor,
the token counts, the skipped updates, the reward error windows, the algorithm's own state, the
python/numpy/torch/engine RNG states, how many bytes ``metrics.jsonl`` / ``rollouts.jsonl``
had, and the run's resolved config. :func:`capture` collects them; :func:`parse` checks a
loaded file completely (types included) *before* :func:`restore` changes anything, so an
unreadable state is reported as such and the next checkpoint can be tried.

RNG states are stored as JSON, never pickled: a checkpoint must never run code on load.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..configs import to_dict

#: every trainer_state.json must have these, with these types
REQUIRED = {"step": int, "epoch": int, "cursor": int, "num_tokens": int, "skipped_updates": int, "rng": dict}
RNG_KEYS = ("python", "numpy", "torch", "engine")
LOGS = ("metrics.jsonl", "rollouts.jsonl")


class StateError(ValueError):
    """A trainer_state.json that cannot be restored (the message says what is wrong)."""


def rng_to_json(obj):
    """RNG states as plain JSON (no pickle: a checkpoint must never run code on load)."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj.tolist()}
    if isinstance(obj, np.ndarray):
        return {"ndarray": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (tuple, list)):
        return {"seq": [rng_to_json(x) for x in obj], "tuple": isinstance(obj, tuple)}
    if isinstance(obj, dict):
        return {"dict": {k: rng_to_json(v) for k, v in obj.items()}}
    return obj


def rng_from_json(obj):
    if isinstance(obj, dict):
        if "tensor" in obj:
            return torch.tensor(obj["tensor"], dtype=torch.uint8)
        if "ndarray" in obj:
            return np.array(obj["ndarray"], dtype=obj["dtype"])
        if "seq" in obj:
            items = [rng_from_json(x) for x in obj["seq"]]
            return tuple(items) if obj["tuple"] else items
        if "dict" in obj:
            return {k: rng_from_json(v) for k, v in obj["dict"].items()}
    return obj


def capture(tr, extra: dict) -> dict:
    """Everything of trainer ``tr`` that a checkpoint must hold besides weights/optimizer."""
    return {
        "step": tr.step,
        **tr.prompts.state_dict(),  # epoch, cursor
        "num_tokens": tr.num_tokens,
        "generated_tokens": tr.generated_tokens,
        "elapsed_s": tr._clock(),
        "eval_s": tr.eval_s,
        "skipped_updates": tr.skipped_updates,
        # where metrics.jsonl / rollouts.jsonl ended when this checkpoint was taken: a
        # resumed run cuts them back here so they equal an uninterrupted run's files
        "log_bytes": {name: tr.run.size(name) for name in LOGS},
        "reward_error_windows": [list(w) for w in getattr(tr.scorer.computer, "_windows", [])],
        "algorithm": tr.algorithm.state_dict(),  # e.g. TreePO's dynamic-sampling keep rate
        "rng": {
            "python": rng_to_json(random.getstate()),
            "numpy": rng_to_json(np.random.get_state()),
            "torch": rng_to_json(torch.get_rng_state()),
            "engine": rng_to_json(tr.engine.state_dict()),
        },
        # the run's resolved settings: a resume restores them from here (not from config.yaml)
        "config": to_dict(tr.cfg),
        **extra,
    }


@dataclass
class ParsedState:
    """A checked trainer state plus its decoded RNG states (nothing applied yet)."""

    raw: dict
    python: Any
    numpy: Any
    torch: torch.Tensor
    engine: Any


def parse(st: Any) -> ParsedState:
    """Check a loaded trainer_state.json and decode its RNG states; :class:`StateError` if
    anything is missing, mistyped or not a valid RNG state."""
    if not isinstance(st, dict):
        raise StateError(f"expected a JSON object, got {type(st).__name__}")
    for key, tp in REQUIRED.items():
        if key not in st:
            raise StateError(f"no {key!r}")
        if not isinstance(st[key], tp) or isinstance(st[key], bool):
            raise StateError(f"{key!r} is {type(st[key]).__name__}, expected {tp.__name__}")
    if st["step"] < 0 or st["cursor"] < 0 or st["epoch"] < 0:
        raise StateError("negative step/epoch/cursor")
    missing = [k for k in RNG_KEYS if k not in st["rng"]]
    if missing:
        raise StateError(f"no RNG state for {missing}")
    logs = st.get("log_bytes", {})
    if not isinstance(logs, dict) or not all(isinstance(v, int) and v >= 0 for v in logs.values()):
        raise StateError("'log_bytes' is not a mapping of file sizes")
    try:  # decode and try each RNG state on a scratch generator: a bad one fails here
        py, npy, tch = (rng_from_json(st["rng"][k]) for k in ("python", "numpy", "torch"))
        random.Random().setstate(py)
        np.random.RandomState().set_state(npy)
        torch.Generator().set_state(tch)
        engine = rng_from_json(st["rng"]["engine"])
        if not isinstance(engine, dict):
            raise TypeError("the engine state is not a mapping")
        for v in engine.values():  # generator states (the engine's own format otherwise)
            if isinstance(v, torch.Tensor):
                torch.Generator().set_state(v)
    except Exception as e:  # noqa: BLE001 - any malformed RNG state
        raise StateError(f"invalid RNG state ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return ParsedState(st, py, npy, tch, engine)


def restore(tr, parsed: ParsedState) -> None:
    """Put trainer ``tr`` back where ``parsed`` says (after weights/optimizer are loaded)."""
    st = parsed.raw
    for w, saved in zip(getattr(tr.scorer.computer, "_windows", []), st.get("reward_error_windows", [])):
        w.clear()
        w.extend(saved)
    tr.step = st["step"]
    tr.prompts.load_state_dict(st)
    tr.num_tokens, tr.skipped_updates = st["num_tokens"], st["skipped_updates"]
    # (older checkpoints lack these: a token budget then counts from the resume)
    tr.generated_tokens = st.get("generated_tokens", 0)
    tr.elapsed_s, tr.eval_s = st.get("elapsed_s", 0.0), st.get("eval_s", 0.0)
    random.setstate(parsed.python)
    np.random.set_state(parsed.numpy)
    torch.set_rng_state(parsed.torch)
    tr.engine.load_state_dict(parsed.engine)
    tr.algorithm.load_state_dict(st.get("algorithm", {}))
