"""GSM8K and MATH-500 tasks, and a validating row loader for your own prompt/answer files.

Embedded data (``segrl/data``, MIT, see ``segrl/data/LICENSE-DATA.md``):

* ``gsm8k_test.jsonl``: the GSM8K test split, 1,319 problems (``question``, ``answer`` = worked
  solution ending in ``#### <final answer>``);
* ``math500_test.jsonl``: MATH-500, 500 problems (``problem``, ``solution``, ``answer`` =
  final LaTeX answer, ``subject``, ``level``, ``unique_id``).

Rows produced by the task loaders are dicts with

* ``prompt``: the formatted prompt text (see the templates below);
* ``answer``: the gold final answer (GSM8K: the number after ``####``, commas removed;
  MATH: the ``answer`` field, a LaTeX string);
* ``id``: a stable identifier (GSM8K: ``gsm8k-test-<1-based line number>``; MATH-500: its
  ``unique_id``, e.g. ``test/precalculus/807.json``);
* the source columns (GSM8K: ``question``, ``solution`` = the worked solution; MATH-500: ``problem``, ``solution``,
  ``subject``, ``level``, ``unique_id``). TRL-style reward functions receive them as keyword
  arguments and may ignore them.

Prompt templates are plain strings where ``{question}`` is replaced by the problem text (plain
substitution, not ``str.format``: other braces such as ``\\boxed{}`` need no escaping):

* :data:`GSM8K_TEMPLATE`: ``"Question: {question}\\nAnswer: Let's think step by step."``
  (stop string ``"\\nQuestion:"``); graded by
  :func:`segrl.rewards.math_grading.gsm8k_accuracy` (``####`` answer, else ``\\boxed{}``, else
  "answer is N", else the last number).
* :data:`MATH_TEMPLATE`: ``"Problem: {question}\\nSolve the problem step by step and put the
  final answer in \\boxed{}.\\nSolution:"`` (stop string ``"\\nProblem:"``); graded by
  :func:`segrl.rewards.math_grading.math_accuracy` (last ``\\boxed{}`` vs gold, math-verify).

Train/test split. Both embedded files are *test* sets, so a task splits one file in two with a
deterministic rule (:func:`split_rows`): rows are ranked by ``sha256(f"{split_seed}:{id}")``
and the first ``round(test_fraction * n)`` rows form the test part; the rest is the train part
(both keep file order). The rule depends only on the ids and ``split_seed``, not on file order or
machine; the default ``test_fraction=0.2`` gives GSM8K 1,055 train / 264 test and MATH-500
400 / 100. ``test_fraction=0`` puts everything in train, ``1`` everything in test. If you have a
real training file, pass it as ``path`` and the evaluation file as ``test_path``: then no split is
made. A ``datasets.DatasetDict`` with ``train`` and ``test`` splits is used as is.

Sources accepted everywhere: a path to a local ``.jsonl``/``.ndjson``, ``.json`` (an array of
objects, or an object with a ``data``/``rows`` array; JSON Lines content is detected) or
``.parquet`` file, a ``datasets.Dataset``/``DatasetDict`` object (already loaded; nothing is
downloaded), or a list of dicts.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from segrl.rewards.math_grading import (
    answer_accuracy,
    extract_boxed,
    extract_gsm8k_answer,
    gsm8k_accuracy,
    math_accuracy,
)
from segrl.tasks.base import Task

__all__ = [
    "DatasetError",
    "GSM8K_STOP_STRINGS",
    "GSM8K_TEMPLATE",
    "LoadedRows",
    "MATH_STOP_STRINGS",
    "MATH_TEMPLATE",
    "embedded_data_path",
    "file_task",
    "format_prompt",
    "gsm8k_task",
    "load_rows",
    "math500_task",
    "split_rows",
]

GSM8K_TEMPLATE = "Question: {question}\nAnswer: Let's think step by step."
MATH_TEMPLATE = (
    "Problem: {question}\nSolve the problem step by step and put the final answer in \\boxed{}.\nSolution:"
)
GSM8K_STOP_STRINGS = ("\nQuestion:",)
MATH_STOP_STRINGS = ("\nProblem:",)

logger = logging.getLogger(__name__)

_EMBEDDED = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500_test.jsonl"}


class DatasetError(ValueError):
    """A data file or row is malformed. The message names the source, the 1-based row number
    (for JSON Lines files: the line number) and the problem."""


class LoadedRows(NamedTuple):
    """Result of :func:`load_rows`: the valid rows and how many bad rows were skipped."""

    rows: list[dict[str, Any]]
    skipped: int


def embedded_data_path(name: str) -> Path:
    """Path of an embedded data file: ``"gsm8k"`` or ``"math500"``."""
    if name not in _EMBEDDED:
        raise KeyError(f"unknown embedded data set {name!r}; have {sorted(_EMBEDDED)}")
    return Path(str(importlib.resources.files("segrl").joinpath("data", _EMBEDDED[name])))


def format_prompt(template: str, question: str) -> str:
    """Replace ``{question}`` in ``template`` (plain substitution; other braces are kept)."""
    if "{question}" not in template:
        raise ValueError("prompt template must contain '{question}'")
    return template.replace("{question}", question)


# ----------------------------------------------------------------------------------------------
# Reading records
# ----------------------------------------------------------------------------------------------

_BAD = object()  # marker: the record itself could not be read; the problem text follows


def _is_hf(obj: Any, cls_name: str) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets" and type(obj).__name__ == cls_name


def _records(source: Any, split: str | None) -> tuple[str, Iterator[tuple[int, Any, str | None]]]:
    """(label, iterator of (row number, record, problem)). ``problem`` is set when the record
    cannot be read at all (invalid JSON, not an object)."""
    if _is_hf(source, "DatasetDict"):
        names = list(source.keys())
        if split is None:
            if len(names) != 1:
                raise DatasetError(f"DatasetDict has splits {names}; pass split=...")
            split = names[0]
        if split not in source:
            raise DatasetError(f"DatasetDict has no split {split!r} (has {names})")
        label, it = _records(source[split], None)
        return f"{label}[{split}]", it
    if _is_hf(source, "Dataset") or _is_hf(source, "IterableDataset"):
        label = f"datasets.{type(source).__name__}"
        if getattr(source, "split", None):
            label += f"({source.split})"
        return label, ((i, rec, None) for i, rec in enumerate(source, 1))
    if isinstance(source, (list, tuple)):
        return "<list>", ((i, rec, None) for i, rec in enumerate(source, 1))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = str(path)
        if not path.exists():
            raise FileNotFoundError(f"data file not found: {path}")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return label, _jsonl(path)
        if suffix == ".json":
            return label, _json(path)
        if suffix in (".parquet", ".pq"):
            return label, _parquet(path)
        raise DatasetError(f"{label}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    raise TypeError(
        f"unsupported data source {type(source).__name__}: pass a file path, a datasets.Dataset/DatasetDict or a list of dicts"
    )


def _jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, _BAD, f"invalid JSON ({e.msg} at column {e.colno})"
                continue
            yield lineno, rec, None


def _json(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a .json file
            yield from _jsonl(path)
            return
        raise DatasetError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
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


def _check_prompt(value: Any, column: str) -> str | None:
    if value is None:
        return f"missing {column!r}"
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
    if value is None:
        return None, f"missing {column!r}"
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


def _load(
    source: Any,
    prompt_column: str,
    answer_column: str,
    *,
    template: str | None,
    answer_from: Callable[[dict], Any] | None,
    skip_bad_rows: bool,
    split: str | None,
    id_column: str,
    id_prefix: str | None,
    original_answer_column: str | None = None,
) -> LoadedRows:
    if template is not None and "{question}" not in template:
        raise ValueError("prompt template must contain '{question}'")
    label, it = _records(source, split)
    rows: list[dict[str, Any]] = []
    skipped = 0

    def bad(rownum: int, problem: str) -> None:
        nonlocal skipped
        if not skip_bad_rows:
            raise DatasetError(f"{label}: row {rownum}: {problem}")
        skipped += 1

    for rownum, rec, problem in it:
        if problem is not None:
            bad(rownum, problem)
            continue
        if not isinstance(rec, dict):
            bad(rownum, f"expected an object with {prompt_column!r} and {answer_column!r}, got {type(rec).__name__}")
            continue
        prompt = rec.get(prompt_column)
        problem = _check_prompt(prompt, prompt_column)
        if problem is None and template is not None and not isinstance(prompt, str):
            problem = f"{prompt_column!r} must be a string when a prompt template is used"
        if problem is not None:
            bad(rownum, problem)
            continue
        raw_answer = answer_from(rec) if answer_from is not None else rec.get(answer_column)
        answer, problem = _normalize_answer(raw_answer, answer_column)
        if problem is not None:
            bad(rownum, problem)
            continue
        row = dict(rec)
        if original_answer_column is not None and original_answer_column not in row:
            row[original_answer_column] = rec.get(answer_column)
        row["prompt"] = format_prompt(template, prompt) if template is not None else prompt
        row["answer"] = answer
        rid = rec.get(id_column)
        if rid is None or (isinstance(rid, str) and not rid.strip()):
            rid = f"{id_prefix}-{rownum}" if id_prefix else rownum
        row["id"] = rid
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
        DatasetError: a malformed row (missing/empty prompt or answer, wrong type, invalid JSON
            line, non-object row) and ``skip_bad_rows`` is False. The message reads
            ``"<file>: row <n>: <problem>"`` with the 1-based row number (the line number for
            JSON Lines).
        FileNotFoundError: the file does not exist.
    """
    return _load(
        source,
        prompt_column,
        answer_column,
        template=prompt_template,
        answer_from=None,
        skip_bad_rows=skip_bad_rows,
        split=split,
        id_column=id_column,
        id_prefix=None,
    )


# ----------------------------------------------------------------------------------------------
# Splitting
# ----------------------------------------------------------------------------------------------


def split_rows(
    rows: Sequence[dict[str, Any]], test_fraction: float = 0.2, split_seed: int = 0, key: str = "id"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train/test split: rows are ranked by ``sha256(f"{split_seed}:{row[key]}")``
    and the first ``round(test_fraction * len(rows))`` go to test. Both parts keep the input
    order. Returns ``(train, test)``."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    n = len(rows)
    n_test = int(round(test_fraction * n))

    def rank(i: int) -> tuple[bytes, int]:
        return hashlib.sha256(f"{split_seed}:{rows[i][key]}".encode()).digest(), i

    test_idx = set(sorted(range(n), key=rank)[:n_test])
    train = [r for i, r in enumerate(rows) if i not in test_idx]
    test = [r for i, r in enumerate(rows) if i in test_idx]
    return train, test


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------


def _report_skipped(src: Any, skipped: int) -> None:
    if skipped:
        logger.warning("skipped %d malformed row(s) in %s", skipped, src if isinstance(src, (str, os.PathLike)) else type(src).__name__)


def _make_splits(
    load_one: Callable[[Any, str | None], list[dict[str, Any]]],
    path: Any,
    test_path: Any,
    test_fraction: float,
    split_seed: int,
    limit_train: int | None,
    limit_test: int | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if test_path is not None:
        train, test = load_one(path, None), load_one(test_path, None)
    elif _is_hf(path, "DatasetDict") and "train" in path and "test" in path:
        train, test = load_one(path, "train"), load_one(path, "test")
    else:
        train, test = split_rows(load_one(path, None), test_fraction, split_seed)
    if limit_train is not None:
        train = train[:limit_train]
    if limit_test is not None:
        test = test[:limit_test]
    return train, test


def gsm8k_task(
    path: Any = None,
    *,
    test_path: Any = None,
    template: str = GSM8K_TEMPLATE,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    skip_bad_rows: bool = False,
    split: str | None = None,
) -> Task:
    """The GSM8K task (graded by :func:`~segrl.rewards.math_grading.gsm8k_accuracy`).

    Args:
        path: ``None`` for the embedded GSM8K test split (1,319 rows), or any source accepted by
            :func:`load_rows` with GSM8K's columns ``question`` and ``answer`` (a worked
            solution ending in ``#### N``, or just the final answer).
        test_path: an evaluation source; then ``path`` is used whole for training (no split).
        template: prompt template with ``{question}`` (default :data:`GSM8K_TEMPLATE`).
        test_fraction, split_seed: the deterministic split of a single source
            (:func:`split_rows`).
        limit_train, limit_test: keep only the first rows of each part (quick runs).
        skip_bad_rows: skip malformed rows instead of raising :class:`DatasetError`.
        split: split of a ``DatasetDict`` ``path`` (a dict with ``train`` and ``test`` is used as
            is when ``split`` is None).
    """
    def gold(rec: dict) -> Any:
        a = rec.get("answer")
        if isinstance(a, str):
            return extract_gsm8k_answer(a) if "####" in a else a.strip().replace(",", "")
        return a

    def load_one(src: Any, sp: str | None) -> list[dict[str, Any]]:
        embedded = src is None
        if embedded:
            src = embedded_data_path("gsm8k")
        loaded = _load(
            src,
            "question",
            "answer",
            template=template,
            answer_from=gold,
            skip_bad_rows=skip_bad_rows,
            split=sp or split,
            id_column="id",
            id_prefix="gsm8k-test" if embedded else "gsm8k",
            original_answer_column="solution",
        )
        _report_skipped(src, loaded.skipped)
        return loaded.rows

    train, test = _make_splits(load_one, path, test_path, test_fraction, split_seed, limit_train, limit_test)
    return Task(
        name="gsm8k",
        train=train,
        test=test,
        correctness=gsm8k_accuracy,
        stop_strings=GSM8K_STOP_STRINGS,
    )


def math500_task(
    path: Any = None,
    *,
    test_path: Any = None,
    template: str = MATH_TEMPLATE,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    skip_bad_rows: bool = False,
    split: str | None = None,
) -> Task:
    """The MATH-500 task (graded by :func:`~segrl.rewards.math_grading.math_accuracy`).

    Args:
        path: ``None`` for the embedded MATH-500 (500 rows), or any source accepted by
            :func:`load_rows` with MATH's columns ``problem`` and ``answer`` (if ``answer`` is
            missing, the last ``\\boxed{}`` of ``solution`` is used, as in the original MATH
            release). The ``unique_id`` column, if present, is the row id.
        Other arguments: as for :func:`gsm8k_task`.
    """

    def gold(rec: dict) -> Any:
        a = rec.get("answer")
        if a is None or (isinstance(a, str) and not a.strip()):
            sol = rec.get("solution")
            if isinstance(sol, str):
                return extract_boxed(sol)
        return a

    def load_one(src: Any, sp: str | None) -> list[dict[str, Any]]:
        if src is None:
            src = embedded_data_path("math500")
        loaded = _load(
            src,
            "problem",
            "answer",
            template=template,
            answer_from=gold,
            skip_bad_rows=skip_bad_rows,
            split=sp or split,
            id_column="unique_id",
            id_prefix="math",
            original_answer_column=None,
        )
        _report_skipped(src, loaded.skipped)
        return loaded.rows

    train, test = _make_splits(load_one, path, test_path, test_fraction, split_seed, limit_train, limit_test)
    return Task(
        name="math500",
        train=train,
        test=test,
        correctness=math_accuracy,
        stop_strings=MATH_STOP_STRINGS,
    )


def file_task(
    cfg: Any = None,
    *,
    train_file: Any = None,
    test_file: Any = None,
    prompt_column: str | None = None,
    answer_column: str | None = None,
    prompt_template: str | None = None,
    skip_bad_rows: bool | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    correctness: Callable | None = None,
    stop_strings: tuple[str, ...] = (),
    name: str = "file",
) -> Task:
    """A task from your own prompt/answer data (:func:`load_rows` does the reading/validation).

    Settings come from the keyword arguments or, when not given, from ``cfg`` (an object with
    the :class:`segrl.configs.DataConfig` attributes ``train_file``, ``test_file``,
    ``prompt_column``, ``answer_column``, ``skip_bad_rows``).

    Without a test file, the train source is split with :func:`split_rows` (``test_fraction``,
    ``split_seed``). ``correctness`` defaults to
    :func:`segrl.rewards.math_grading.answer_accuracy` (final answer from ``\\boxed{}``,
    ``####``, "answer: X" or the last number; compared as text or mathematically). Prompts are
    used as they are unless ``prompt_template`` (with ``{question}``) is given.
    """

    def pick(value: Any, attr: str, default: Any) -> Any:
        if value is not None:
            return value
        got = getattr(cfg, attr, None) if cfg is not None else None
        return default if got is None else got

    train_file = pick(train_file, "train_file", None)
    test_file = pick(test_file, "test_file", None)
    prompt_column = pick(prompt_column, "prompt_column", "prompt")
    answer_column = pick(answer_column, "answer_column", "answer")
    skip_bad_rows = bool(pick(skip_bad_rows, "skip_bad_rows", False))
    if train_file is None:
        raise DatasetError("task 'file' needs a train file (data.train_file)")

    def load_one(src: Any, sp: str | None) -> list[dict[str, Any]]:
        loaded = load_rows(
            src,
            prompt_column,
            answer_column,
            prompt_template=prompt_template,
            skip_bad_rows=skip_bad_rows,
            split=sp,
        )
        _report_skipped(src, loaded.skipped)
        if not loaded.rows:
            raise DatasetError(f"{src}: no usable rows")
        return loaded.rows

    train, test = _make_splits(load_one, train_file, test_file, test_fraction, split_seed, None, None)
    return Task(
        name=name,
        train=train,
        test=test,
        correctness=correctness if correctness is not None else answer_accuracy,
        stop_strings=tuple(stop_strings),
    )
