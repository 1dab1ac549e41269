"""A task from your own prompt/answer file (``--data.task file --data.train_file F``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from segrl.rewards.math_grading import answer_accuracy
from segrl.tasks.base import Task
from segrl.tasks.rows import DatasetError, load_rows, make_splits, report_skipped

__all__ = ["file_task"]


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
        report_skipped(src, loaded.skipped)
        if not loaded.rows:
            raise DatasetError(f"{src}: no usable rows")
        return loaded.rows

    train, test = make_splits(load_one, train_file, test_file, test_fraction, split_seed, None, None)
    return Task(
        name=name,
        train=train,
        test=test,
        correctness=correctness if correctness is not None else answer_accuracy,
        stop_strings=tuple(stop_strings),
    )
