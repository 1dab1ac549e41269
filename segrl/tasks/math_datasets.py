"""The GSM8K and MATH-500 tasks (embedded data, or your own files in their format).

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

Train/test split. Both embedded files are *test* sets, so a task splits one file in two with
:func:`segrl.tasks.rows.split_rows` (deterministic, by hash of the row ids); the default
``test_fraction=0.2`` gives GSM8K 1,055 train / 264 test and MATH-500 400 / 100.
``test_fraction=0`` puts everything in train, ``1`` everything in test. If you have a real
training file, pass it as ``path`` and the evaluation file as ``test_path``: then no split is
made. A ``datasets.DatasetDict`` with ``train`` and ``test`` splits is used as is.

Sources: any source :func:`segrl.tasks.rows.load_rows` reads. The row reader
(:mod:`segrl.tasks.rows`) and :func:`~segrl.tasks.file_task.file_task` are re-exported here.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from segrl.rewards.math_grading import extract_boxed, extract_gsm8k_answer, gsm8k_accuracy, math_accuracy
from segrl.tasks.base import Task
from segrl.tasks.file_task import file_task
from segrl.tasks.rows import (
    DatasetError,
    LoadedRows,
    RowSpec,
    format_prompt,
    load_rows,
    make_splits,
    read_rows,
    report_skipped,
    split_rows,
)

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

_EMBEDDED = {"gsm8k": "gsm8k_test.jsonl", "math500": "math500_test.jsonl"}


def embedded_data_path(name: str) -> Path:
    """Path of an embedded data file: ``"gsm8k"`` or ``"math500"``."""
    if name not in _EMBEDDED:
        raise KeyError(f"unknown embedded data set {name!r}; have {sorted(_EMBEDDED)}")
    return Path(str(importlib.resources.files("segrl").joinpath("data", _EMBEDDED[name])))


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
        spec = RowSpec("question", "answer", template, gold, "id", "gsm8k-test" if embedded else "gsm8k", "solution")
        loaded = read_rows(src, spec, skip_bad_rows=skip_bad_rows, split=sp or split)
        report_skipped(src, loaded.skipped)
        return loaded.rows

    train, test = make_splits(load_one, path, test_path, test_fraction, split_seed, limit_train, limit_test)
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
        spec = RowSpec("problem", "answer", template, gold, "unique_id", "math", None)
        loaded = read_rows(src, spec, skip_bad_rows=skip_bad_rows, split=sp or split)
        report_skipped(src, loaded.skipped)
        return loaded.rows

    train, test = make_splits(load_one, path, test_path, test_fraction, split_seed, limit_train, limit_test)
    return Task(
        name="math500",
        train=train,
        test=test,
        correctness=math_accuracy,
        stop_strings=MATH_STOP_STRINGS,
    )
