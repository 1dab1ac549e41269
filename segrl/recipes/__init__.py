"""Per-algorithm (and per-algorithm-and-task) default settings, as YAML recipes.

:func:`segrl.configs.load_config` layers them *under* the user's config file and command-line
overrides, so an algorithm's defaults never clobber an explicit user value::

    dataclass defaults  <  recipes/<algo>.yaml  <  recipes/<algo>_<task>.yaml  <  --config file  <  --section.field

``<algo>`` and ``<task>`` are read from the overrides, else the config file, else the dataclass
defaults. A missing recipe file is simply skipped. Other YAML files in this folder (e.g.
``treepo_paper.yaml``) are presets to pass with ``--config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).resolve().parent


def _pick(overrides: dict[str, Any] | None, file_data: dict, section: str, key: str, default: str) -> str:
    dotted = f"{section}.{key}"
    if overrides and dotted in overrides:
        return str(overrides[dotted])
    sec = file_data.get(section)
    if isinstance(sec, dict) and key in sec:
        return str(sec[key])
    return default


def config_file_data(path: str | Path | None) -> dict:
    """The mapping in the YAML file ``path`` ({} when there is none or it is unreadable)."""
    if path is not None and Path(path).is_file():
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            return loaded if isinstance(loaded, dict) else {}
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError, OSError):
            pass  # the loader reports the bad file itself
    return {}


#: tasks that read data.train_file / data.test_file
FILE_TASKS = ("file", "gsm8k", "math500", "math")


def implied_overrides(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``overrides`` plus what they imply: a ``data.train_file`` with no ``data.task`` set
    (command line or config file) means ``data.task=file``; a task that reads no file
    (arithmetic, reasoning_gym:...) with a train_file is an error, not a silently ignored file."""
    out = dict(overrides or {})
    file_data = config_file_data(path)
    train_file = _pick(out, file_data, "data", "train_file", "")
    if train_file.strip().lower() in ("", "none", "null"):
        return out
    task = _pick(out, file_data, "data", "task", "")
    if not task:
        out["data.task"] = "file"
    elif task not in FILE_TASKS:
        from ..configs.loader import ConfigError

        raise ConfigError(
            f"data.train_file is set but data.task={task} reads no file; drop data.task (a train_file implies task=file) "
            f"or use one of {list(FILE_TASKS)}"
        )
    return out


def recipe_defaults(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """The merged recipe mapping for the algorithm and task the config will select."""
    file_data = config_file_data(path)
    algo = _pick(overrides, file_data, "train", "algo", "grpo")
    task = _pick(overrides, file_data, "data", "task", "arithmetic")
    out: dict = {}
    for name in (f"{algo}.yaml", f"{algo}_{task.replace(':', '_')}.yaml"):
        p = RECIPES_DIR / name
        if p.is_file():
            data = yaml.safe_load(p.read_text()) or {}
            out = _merge(out, data)
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
