"""Pick the task named in :class:`~segrl.configs.DataConfig`."""

from __future__ import annotations

from .base import Task


def load_task(cfg) -> Task:
    """Build the :class:`Task` for ``data.task`` (arithmetic, gsm8k, math500, reasoning_gym:X, file)."""
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
        from .reasoning_gym import reasoning_gym_task

        return reasoning_gym_task(name.split(":", 1)[1], seed=cfg.seed)
    if name == "file":
        from .math_datasets import file_task

        return file_task(cfg)
    from ..configs import ConfigError

    raise ConfigError(f"data.task: unknown task {name!r} (arithmetic, gsm8k, math500, reasoning_gym:<name>, file)")
