"""Nested dataclass configs: YAML files, ``--section.field value`` overrides, validation.

Every config section is a dataclass whose fields carry ``metadata={"help": ...}``: that text
is the manual (``segrl train --help-config`` prints it). Values are type-checked when loaded;
an unknown key or an invalid value raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending field."""


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, **kw):
    """A dataclass field with a help text (and optional allowed values)."""
    md = {"help": help}
    if choices is not None:
        md["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=md, **kw)
    return dataclasses.field(default=default, metadata=md, **kw)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Coerce ``value`` (from YAML or a CLI string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)  # exact: through a float, a large integer would lose digits
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(f):  # nan/inf are never a meaningful setting
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls, data: dict | None, where: str = ""):
    """Instantiate dataclass ``cls`` from a (nested) mapping, rejecting unknown keys."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{_did_you_mean(key, names, where)}; known keys here: {sorted(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
            kwargs[key] = build(tp, value, path)
        else:
            v = _convert(value, tp, path)
            choices = names[key].metadata.get("choices")
            if choices and v not in choices:
                raise ConfigError(f"{path}: {v!r} is not one of {list(choices)}")
            kwargs[key] = v
    return cls(**kwargs)  # __post_init__ checks name their field in full


def _did_you_mean(key: Any, names: dict, where: str) -> str:
    close = difflib.get_close_matches(str(key), list(names), n=1, cutoff=0.6)
    return f" (did you mean {(f'{where}.' if where else '') + close[0]!r}?)" if close else ""


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def set_path(data: dict, dotted: str, value: Any) -> None:
    """``set_path(d, "train.learning_rate", "1e-5")`` -> ``d["train"]["learning_rate"]``."""
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"{dotted}: {p!r} is not a section")
    cur[parts[-1]] = value


def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None, base: dict | None = None):
    """Load ``cls`` from an optional YAML file plus dotted overrides (CLI wins over file)."""
    data: dict = dict(base or {})
    if path is not None:
        data = _merge(data, read_yaml(path))
    for k, v in (overrides or {}).items():
        set_path(data, k, v)
    return build(cls, data)


def read_utf8(path: Path) -> tuple[str, str | None]:
    """``(text, problem)``: a file's text (a UTF-8 byte-order mark dropped), or why it cannot be
    read (``"cannot be read (...)"``, ``"not UTF-8 text (byte 0x.. at offset N)"``)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        return "", f"cannot be read ({e.strerror})"
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        return "", f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file, or a one-line :class:`ConfigError` saying what is wrong
    with the file (missing, a directory, unreadable, not UTF-8 text, not YAML, not a mapping)."""
    p = Path(path)
    name = repr(str(p))
    if p.is_dir():
        raise ConfigError(f"config file {name} is a directory, expected a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {name} not found" if not p.exists() else f"config file {name} is not a regular file")
    text, problem = read_utf8(p)
    if problem is not None:
        raise ConfigError(f"config file {name}: {problem}; is it a YAML file?")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        what = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"config file {name} is not valid YAML ({what}{at})") from None
    except RecursionError:
        raise ConfigError(f"config file {name} is not valid YAML (nested too deeply)") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {name} must hold a mapping of sections (train:, data:, ...), got a {type(loaded).__name__}")
    return loaded


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def describe(cls, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(dotted name, type, default, help)`` for every leaf field (the manual)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        rows.append((name, tname, default, f.metadata.get("help", "")))
    return rows


def check(cond: bool, field: str, msg: str) -> None:
    """Raise :class:`ConfigError` naming ``field`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{field}: {msg}")
