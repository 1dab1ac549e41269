"""Reading and validating prompt/answer rows, and the deterministic train/test split.

Sources accepted everywhere: a path to a local ``.jsonl``/``.ndjson``, ``.json`` (an array of
objects, or an object with a ``data``/``rows`` array; JSON Lines content is detected) or
``.parquet`` file, a ``datasets.Dataset``/``DatasetDict`` object (already loaded; nothing is
downloaded), or a list of dicts.

Every problem with a source is a :class:`DatasetError` whose message names the source, and for
a problem with one row, the 1-based row number (the line number for JSON Lines): a row that is
not UTF-8 or not JSON (or nested too deeply to parse), that is not an object, or whose prompt or
answer is missing, empty or of the wrong type. A missing file is a ``FileNotFoundError``.

Train/test split (:func:`split_rows`): rows are ranked by ``sha256(f"{split_seed}:{id}")``
and the first ``round(test_fraction * n)`` rows form the test part (at least one row, and at
least one row left to train on, when there are two or more rows and ``0 < test_fraction < 1``);
the rest is the train part (both keep file order). The rule depends only on the ids and
``split_seed``, not on file order or machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from segrl.configs.loader import read_utf8

__all__ = ["DatasetError", "LoadedRows", "RowSpec", "format_prompt", "load_rows", "make_splits", "read_rows", "split_rows"]

logger = logging.getLogger(__name__)

#: file types :func:`load_rows` reads
SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq")


class DatasetError(ValueError):
    """A data file or row is malformed. The message names the source, the 1-based row number
    (for JSON Lines files: the line number) and the problem."""


class LoadedRows(NamedTuple):
    """Result of :func:`load_rows`: the valid rows and how many bad rows were skipped."""

    rows: list[dict[str, Any]]
    skipped: int


def format_prompt(template: str, question: str) -> str:
    """Replace ``{question}`` in ``template`` (plain substitution; other braces are kept)."""
    if "{question}" not in template:
        raise ValueError("prompt template must contain '{question}'")
    return template.replace("{question}", question)


# ----------------------------------------------------------------------------------------------
# Reading records
# ----------------------------------------------------------------------------------------------

_BAD = object()  # marker: the record itself could not be read; the problem text follows


def is_hf(obj: Any, cls_name: str) -> bool:
    """``obj`` is a ``datasets.<cls_name>`` (checked without importing ``datasets``)."""
    return type(obj).__module__.split(".")[0] == "datasets" and type(obj).__name__ == cls_name


def _records(source: Any, split: str | None) -> tuple[str, Iterator[tuple[int, Any, str | None]]]:
    """(label, iterator of (row number, record, problem)). ``problem`` is set when the record
    cannot be read at all (not UTF-8, invalid JSON)."""
    if is_hf(source, "DatasetDict"):
        names = list(source.keys())
        if split is None:
            if len(names) != 1:
                raise DatasetError(f"DatasetDict has splits {names}; pass split=...")
            split = names[0]
        if split not in source:
            raise DatasetError(f"DatasetDict has no split {split!r} (has {names})")
        label, it = _records(source[split], None)
        return f"{label}[{split}]", it
    if is_hf(source, "Dataset") or is_hf(source, "IterableDataset"):
        label = f"datasets.{type(source).__name__}"
        if getattr(source, "split", None):
            label += f"({source.split})"
        return label, ((i, rec, None) for i, rec in enumerate(source, 1))
    if isinstance(source, (list, tuple)):
        return "<list>", ((i, rec, None) for i, rec in enumerate(source, 1))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        _check_file(path)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return str(path), _jsonl(path)
        if suffix == ".json":
            return str(path), _json(path)
        return str(path), _parquet(path)
    raise TypeError(
        f"unsupported data source {type(source).__name__}: pass a file path, a datasets.Dataset/DatasetDict or a list of dicts"
    )


def _check_file(path: Path) -> None:
    """A readable regular file of a supported type, or the error that says why not."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        raise DatasetError(f"{path}: is a directory, expected a .jsonl, .json or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DatasetError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    if not path.is_file():
        raise DatasetError(f"{path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise DatasetError(f"{path}: cannot read the file (permission denied)")


def _decode(raw: bytes, first: bool) -> tuple[str | None, str | None]:
    """(text, problem) of one line's bytes; a UTF-8 byte-order mark opens the file."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"


def _parse(text: str) -> tuple[Any, str | None]:
    """(value, problem) of one JSON text."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return _BAD, f"invalid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return _BAD, "invalid JSON (nested too deeply to read)"


def _jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the file ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            line, problem = _decode(raw, lineno == 1)
            if problem is None and not line.strip():
                continue
            rec = _BAD
            if problem is None:
                rec, problem = _parse(line)
            yield lineno, rec, problem


def _json(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    text, problem = read_utf8(path)
    if problem is not None:
        raise DatasetError(f"{path}: {problem}" + ("; save the file as UTF-8" if "UTF-8" in problem else ""))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file
            yield from _jsonl(path)
            return
        raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise DatasetError(f"{path}: invalid JSON (nested too deeply to read)") from None
    if isinstance(data, dict):
        for key in ("data", "rows"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            yield 1, data, None  # a single object: one row
            return
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, rec in enumerate(data, 1):
        yield i, rec, None


def _parquet(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with datasets
        raise ImportError("reading .parquet files needs pyarrow (pip install pyarrow)") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"{path}: cannot read parquet file: {e}") from e
    for i, rec in enumerate(table.to_pylist(), 1):
        yield i, rec, None


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _missing(rec: dict, column: str, what: str) -> str:
    """``missing 'prompt'``, naming the row's columns when the key is absent (a wrong column)."""
    if column in rec:
        return f"missing {column!r}"
    cols = ", ".join(repr(k) for k in list(rec)[:8]) + (", ..." if len(rec) > 8 else "")
    return f"missing {column!r} (the row has {cols or 'no columns'}; set data.{what}_column to the right one)"


def _check_prompt(value: Any, column: str) -> str | None:
    if isinstance(value, str):
        return None if value.strip() else f"empty {column!r}"
    if isinstance(value, list):  # conversational prompt (TRL): list of {"role", "content"}
        if not value:
            return f"empty {column!r} (no messages)"
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return f"{column!r} is a list but not a list of {{'role': str, 'content': str}} messages"
        return None
    return f"{column!r} has type {type(value).__name__}, expected a string (or a list of chat messages)"


def _normalize_answer(value: Any, column: str) -> tuple[str | None, str | None]:
    if isinstance(value, bool):
        return None, f"{column!r} has type bool, expected a string or a number"
    if isinstance(value, int):
        return str(value), None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, f"{column!r} is {value!r}"
        return (str(int(value)) if value.is_integer() else repr(value)), None
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, f"empty {column!r}")
    return None, f"{column!r} has type {type(value).__name__}, expected a string or a number"


class RowSpec(NamedTuple):
    """How records become rows (see :func:`read_rows`)."""

    prompt_column: str = "prompt"
    answer_column: str = "answer"
    template: str | None = None
    answer_from: Callable[[dict], Any] | None = None
    id_column: str = "id"
    id_prefix: str | None = None
    original_answer_column: str | None = None


def _row(rec: Any, rownum: int, spec: RowSpec) -> tuple[dict[str, Any] | None, str | None]:
    """(row, problem) of one record."""
    pc, ac = spec.prompt_column, spec.answer_column
    if not isinstance(rec, dict):
        return None, f"expected an object with {pc!r} and {ac!r}, got {type(rec).__name__}"
    prompt = rec.get(pc)
    problem = _missing(rec, pc, "prompt") if prompt is None else _check_prompt(prompt, pc)
    if problem is None and spec.template is not None and not isinstance(prompt, str):
        problem = f"{pc!r} must be a string when a prompt template is used"
    if problem is not None:
        return None, problem
    raw_answer = spec.answer_from(rec) if spec.answer_from is not None else rec.get(ac)
    if raw_answer is None:
        return None, _missing(rec, ac, "answer")
    answer, problem = _normalize_answer(raw_answer, ac)
    if problem is not None:
        return None, problem
    row = dict(rec)
    if spec.original_answer_column is not None and spec.original_answer_column not in row:
        row[spec.original_answer_column] = rec.get(ac)
    row["prompt"] = format_prompt(spec.template, prompt) if spec.template is not None else prompt
    row["answer"] = answer
    rid = rec.get(spec.id_column)
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        rid = f"{spec.id_prefix}-{rownum}" if spec.id_prefix else rownum
    row["id"] = rid
    return row, None


def read_rows(source: Any, spec: RowSpec | None = None, *, skip_bad_rows: bool = False, split: str | None = None) -> LoadedRows:
    """:func:`load_rows` with every knob (``spec``: columns, template, gold extraction, ids)."""
    spec = spec or RowSpec()
    if spec.template is not None and "{question}" not in spec.template:
        raise ValueError("prompt template must contain '{question}'")
    label, it = _records(source, split)
    rows: list[dict[str, Any]] = []
    skipped = 0
    for rownum, rec, problem in it:
        row = None
        if problem is None:
            row, problem = _row(rec, rownum, spec)
        if problem is not None:
            if not skip_bad_rows:
                raise DatasetError(f"{label}: row {rownum}: {problem}")
            skipped += 1
            continue
        rows.append(row)
    return LoadedRows(rows, skipped)



def load_rows(
    source: Any,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    *,
    prompt_template: str | None = None,
    skip_bad_rows: bool = False,
    split: str | None = None,
    id_column: str = "id",
) -> LoadedRows:
    """Load and validate prompt/answer rows from a user's data.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet`` path, a ``datasets.Dataset``, a
            ``datasets.DatasetDict`` (with ``split``), or a list of dicts.
        prompt_column: column holding the prompt: a non-empty string, or a non-empty list of
            ``{"role": str, "content": str}`` chat messages (TRL's conversational format).
        answer_column: column holding the gold answer: a non-empty string or a number (numbers
            become strings, ``3.0`` -> ``"3"``).
        prompt_template: if set, the prompt column is a question inserted into this template at
            ``{question}`` (see :func:`format_prompt`).
        skip_bad_rows: skip malformed rows instead of raising.
        split: which split of a ``DatasetDict``.
        id_column: column used as the row id; rows without one get their 1-based row number.

    Returns:
        :class:`LoadedRows` ``(rows, skipped)``: each row is the original record plus
        ``prompt``, ``answer`` (string) and ``id``; ``skipped`` counts skipped bad rows.

    Raises:
        DatasetError: a file that cannot be read (a directory, an unsupported type, not UTF-8,
            invalid JSON in a ``.json`` file), or a malformed row (missing/empty prompt or
            answer, wrong type, a JSON Lines line that is not UTF-8 or not JSON, a non-object
            row) and ``skip_bad_rows`` is False. The message reads
            ``"<file>: row <n>: <problem>"`` with the 1-based row number (the line number for
            JSON Lines).
        FileNotFoundError: the file does not exist.
    """
    spec = RowSpec(prompt_column, answer_column, prompt_template, None, id_column)
    return read_rows(source, spec, skip_bad_rows=skip_bad_rows, split=split)


# ----------------------------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------------------------


def split_rows(
    rows: Sequence[dict[str, Any]], test_fraction: float = 0.2, split_seed: int = 0, key: str = "id"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train/test split: rows are ranked by ``sha256(f"{split_seed}:{row[key]}")``
    and the first ``round(test_fraction * len(rows))`` go to test (at least one, and at least
    one left for train, when there are two or more rows and ``0 < test_fraction < 1``). Both
    parts keep the input order. Returns ``(train, test)``."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    n = len(rows)
    n_test = int(round(test_fraction * n))
    if 0.0 < test_fraction < 1.0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)

    def rank(i: int) -> tuple[bytes, int]:
        return hashlib.sha256(f"{split_seed}:{rows[i][key]}".encode()).digest(), i

    test_idx = set(sorted(range(n), key=rank)[:n_test])
    train = [r for i, r in enumerate(rows) if i not in test_idx]
    test = [r for i, r in enumerate(rows) if i in test_idx]
    return train, test


def report_skipped(src: Any, skipped: int) -> None:
    """Log how many bad rows were skipped in ``src``."""
    if skipped:
        logger.warning("skipped %d malformed row(s) in %s", skipped, src if isinstance(src, (str, os.PathLike)) else type(src).__name__)


def _name(src: Any) -> str:
    return str(src) if isinstance(src, (str, os.PathLike)) else type(src).__name__


def make_splits(
    load_one: Callable[[Any, str | None], list[dict[str, Any]]],
    path: Any,
    test_path: Any,
    test_fraction: float,
    split_seed: int,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and test rows of a task: ``test_path`` as the test part, a ``DatasetDict``'s own
    splits, or :func:`split_rows` of ``path``. Raises :class:`DatasetError` when either part
    would be empty (nothing to train on or to evaluate on) while it was meant to have rows."""
    if test_path is not None:
        train, test = load_one(path, None), load_one(test_path, None)
    elif is_hf(path, "DatasetDict") and "train" in path and "test" in path:
        train, test = load_one(path, "train"), load_one(path, "test")
    else:
        rows = load_one(path, None)
        train, test = split_rows(rows, test_fraction, split_seed)
        if not train and test_fraction < 1.0:
            raise DatasetError(f"{_name(path)}: no usable rows")
        if not test and test_fraction > 0.0:
            raise DatasetError(
                f"{_name(path)}: {len(rows)} usable row(s): too few to hold some out for evaluation; "
                "add rows (2 or more) or give a test file (data.test_file)"
            )
    if test_path is not None and not train:
        raise DatasetError(f"{_name(path)}: no usable rows")
    if test_path is not None and not test:
        raise DatasetError(f"{_name(test_path)}: no usable rows")
    if limit_train is not None:
        train = train[:limit_train]
    if limit_test is not None:
        test = test[:limit_test]
    return train, test
