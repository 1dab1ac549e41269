"""Pick the task named in :class:`~segrl.configs.DataConfig`."""

from __future__ import annotations

from ..configs.loader import ConfigError
from .base import Task


def load_task(cfg) -> Task:
    """Build the :class:`Task` for ``data.task`` (arithmetic, gsm8k, math500, reasoning_gym:X, file).

    Also loads ``data.reward_funcs`` once (the trainer calls this before loading the model, so
    a typo in a reward function spec fails fast; loaded modules are cached for the trainer)."""
    _check_reward_funcs(getattr(cfg, "reward_funcs", ()))
    name = cfg.task
    if name == "arithmetic":
        from .arithmetic import make_arithmetic_task

        return make_arithmetic_task(n_train=cfg.num_train, seed=cfg.seed, difficulty=cfg.difficulty)
    if name == "gsm8k":
        from .math_datasets import gsm8k_task

        return gsm8k_task(cfg.train_file, test_path=cfg.test_file, skip_bad_rows=cfg.skip_bad_rows)
    if name in ("math500", "math"):
        from .math_datasets import math500_task

        return math500_task(cfg.train_file, test_path=cfg.test_file, skip_bad_rows=cfg.skip_bad_rows)
    if name.startswith("reasoning_gym:"):
        return _reasoning_gym(name, cfg.seed)
    if name == "file":
        from .file_task import file_task

        return file_task(cfg)
    raise ConfigError(f"data.task: unknown task {name!r} (arithmetic, gsm8k, math500, reasoning_gym:<name>, file)")


def _reasoning_gym(name: str, seed: int) -> Task:
    """``reasoning_gym:<data set>``; a missing package or data set is an invalid config value."""
    from .reasoning_gym import reasoning_gym_task

    ds = name.split(":", 1)[1].strip()
    if not ds:
        raise ConfigError(f"data.task: {name!r} names no data set (reasoning_gym:<name>, e.g. reasoning_gym:basic_arithmetic)")
    try:
        return reasoning_gym_task(ds, seed=seed)
    except ImportError:
        raise ConfigError(f"data.task: {name!r} needs the optional package reasoning-gym: pip install 'segrl[reasoning-gym]'") from None
    except LookupError as e:  # an unknown data set name
        raise ConfigError(f"data.task: {name!r}: {e.args[0] if e.args else e}") from None


def _check_reward_funcs(specs) -> None:
    from ..rewards.loading import load_reward_func

    for spec in specs:
        try:
            load_reward_func(spec)
        except Exception as e:  # noqa: BLE001 - a missing file/module/function, a syntax error
            raise ConfigError(f"data.reward_funcs: cannot load {spec!r}: {type(e).__name__}: {e}") from None
