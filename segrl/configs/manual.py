"""``segrl config``: the manual of every field (type, default, meaning), for one algorithm's
recipe and any options given, optionally one section or algorithm at a time."""

from __future__ import annotations

from typing import Any

from .checks import algorithm_class, algorithm_names
from .loader import ConfigError, describe


def select(names: list[str], sections: list[str]) -> tuple[list[str], str | None]:
    """``segrl config NAME...``: the sections to show and the algorithm named (if any).

    A name is a section (``spo``) or an algorithm (``spo_tree``: its section, with its recipe)."""
    shown, algo, algos = [], None, algorithm_names()
    for n in names:
        if n in sections:
            shown.append(n)
        elif n in algos:
            if algo not in (None, n):
                raise ConfigError(f"one algorithm at a time (got {algo} and {n})")
            algo = n
            shown.append(algorithm_class(n).config_section)
        else:
            raise ConfigError(f"{n!r} is neither a section ({', '.join(sections)}) nor an algorithm ({', '.join(algos)})")
    return list(dict.fromkeys(shown)), algo


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"spo": {"branch_factors": x}}`` -> ``{"spo.branch_factors": x}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _value(cfg, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def manual(cfg, recipe: dict, user: set[str], sections: list[str] | None = None, header: bool = False) -> list[str]:
    """Lines of the manual for ``cfg``: each field's type, default and help, plus its value
    here and where it comes from when that differs from the default (the algorithm's
    ``recipe``, or ``user``: set by the config file or the command line). The first line
    says what the recipe sets when there is one (or ``header`` asks for it)."""
    algo, task = cfg.train.algo, cfg.data.task
    flat = flatten(recipe)
    lines = []
    if flat or header:
        sets = ", ".join(f"{k}={v!r}" for k, v in flat.items()) or "nothing (the defaults below apply)"
        lines.append(f"# train.algo={algo}, data.task={task}: the recipe (segrl/recipes/) sets {sets}")
    for name, tp, default, help_ in describe(type(cfg)):
        if sections and name.split(".", 1)[0] not in sections:
            continue
        value = _value(cfg, name)
        if value == default:
            lines.append(f"--{name} ({tp}, default {default!r})\n    {help_}")
            continue
        src = f"{algo} recipe" if name in flat and name not in user else "given"
        lines.append(f"--{name} ({tp}, default {default!r}; {src}: {value!r})\n    {help_}")
    return lines
