"""Final-answer extraction and math answer grading (math-verify) with hard timeouts.

Extraction (:func:`extract_gsm8k_answer`, :func:`extract_boxed`, :func:`extract_gsm8k_prediction`,
:func:`extract_final_answer`, :func:`completion_text`) lives in :mod:`segrl.rewards.extract`
and is re-exported here.

Grading: :func:`grade` / :func:`grade_batch` decide whether a predicted answer equals a gold
answer, with `math-verify <https://github.com/huggingface/Math-Verify>`_ (symbolic and numeric
equivalence: ``\\boxed{\\frac{1}{2}}`` equals ``0.5``).

math-verify's own timeout uses ``signal.alarm`` and only works in the main thread of the main
interpreter; sympy can also hang on adversarial answers (``10^{10^{10}}``). So grading runs in a
small persistent worker process (:class:`segrl.rewards.workers.CallWorker`) with math-verify's
timeouts disabled:

* a ``SIGALRM`` timer inside the worker interrupts a comparison at ``timeout_s`` (the worker
  lives on); if the comparison is stuck in C code the parent kills the worker at
  ``timeout_s + max(1 s, timeout_s / 4)`` and starts a new one. Either way the answer counts as
  wrong and the timeout is counted (:meth:`MathGrader.stats`, :func:`grading_stats`);
* a batch is graded in one worker round trip (results stream back one by one, each comparison
  has its own deadline); identical (prediction, gold) pairs are graded once; parsed gold
  answers are cached in the worker;
* plain numbers on both sides (``"1,234"`` vs ``"1234"``, ``"18.00"`` vs ``"18"``) are decided
  in the calling process without the worker (exact rational comparison).

The default grader (used by :func:`grade`, :func:`grade_batch` and the reward functions) starts
its worker on first use; start-up is about one second (interpreter + sympy/math-verify import).
It is stopped at interpreter exit, or explicitly with :func:`shutdown_grader`. It works from any
thread and from inside other worker processes.

TRL-style reward functions (1.0/0.0): :func:`gsm8k_accuracy`, :func:`math_accuracy`, and
:func:`answer_accuracy` for user data sets.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from segrl.rewards.extract import (
    completion_text,
    extract_boxed,
    extract_final_answer,
    extract_gsm8k_answer,
    extract_gsm8k_prediction,
)
from segrl.rewards.workers import CallWorker

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MathGrader",
    "answer_accuracy",
    "extract_final_answer",
    "completion_text",
    "extract_boxed",
    "extract_gsm8k_answer",
    "extract_gsm8k_prediction",
    "get_grader",
    "grade",
    "grade_batch",
    "grading_stats",
    "gsm8k_accuracy",
    "math_accuracy",
    "shutdown_grader",
]

DEFAULT_TIMEOUT_S = 5.0

# ----------------------------------------------------------------------------------------------
# Fast path for plain numbers
# ----------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _as_number(s: str | None) -> Fraction | None:
    """Exact value of a plain number (``-1,234.50``, ``$18``, ``18.``), else ``None``."""
    if s is None:
        return None
    s = s.strip()
    if s.startswith("$") and s.endswith("$") and len(s) >= 2:
        s = s[1:-1].strip()
    for prefix in ("\\$", "$"):
        if s.startswith(prefix):
            s = s[len(prefix) :].strip()
    s = s.replace("{,}", ",").replace("\\!", "")
    if s.endswith(".") and len(s) > 1 and s[-2].isdigit():
        s = s[:-1]
    if _GROUPED.fullmatch(s):
        s = s.replace(",", "")
    if not _PLAIN.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _fast_decision(pred_core: str | None, gold_core: str | None) -> bool | None:
    a, b = _as_number(pred_core), _as_number(gold_core)
    if a is None or b is None:
        return None
    if a == b:
        return True
    if abs(a - b) > Fraction(1, 10_000) * max(1, abs(b)):
        return False
    return None  # very close decimals: let math-verify apply its rounding rules


# ----------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------

_GOLD_CACHE: dict[str, Any] = {}


def _worker_init() -> None:  # pragma: no cover - runs in the worker
    import math_verify.grader
    import math_verify.parser

    # We disable math-verify's signal timeouts on purpose (the worker enforces deadlines).
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    from math_verify import parse, verify

    verify(parse("\\boxed{\\frac{1}{2}}", parsing_timeout=None), parse("0.5", parsing_timeout=None), timeout_seconds=None)


def _mv_grade(pred_text: str, gold_text: str, pred_fallback: str | None = None) -> bool:
    """math-verify comparison (no internal timeout; call it under a deadline)."""
    from math_verify import parse, verify

    gold = _GOLD_CACHE.get(gold_text)
    if gold is None:
        gold = parse(gold_text, parsing_timeout=None)
        if len(_GOLD_CACHE) > 4096:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gold_text] = gold
    if not gold:
        return False
    pred = parse(pred_text, parsing_timeout=None)
    if not pred and pred_fallback:
        pred = parse(pred_fallback, parsing_timeout=None)
    if not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


# ----------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------


def _strip_dollars(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    return s


def _prepare(pred: Any, gold: Any) -> tuple[str | None, str | None, str, str, str | None]:
    """(pred_core, gold_core, pred_text, gold_text, pred_fallback) for one pair."""
    pred = "" if pred is None else str(pred)
    gold = "" if gold is None else str(gold)
    gb = extract_boxed(gold)
    gold_core = _strip_dollars(gb if gb is not None else gold)
    gold_text = "\\boxed{" + gold_core + "}"
    pb = extract_boxed(pred)
    if pb is not None:
        pred_core = pb
        pred_text = "\\boxed{" + pb + "}"
        fallback = None
    elif "####" in pred and extract_gsm8k_answer(pred):
        pred_core = extract_gsm8k_answer(pred)
        pred_text = "\\boxed{" + pred_core + "}"
        fallback = None
    else:
        # A short one-line answer is parsed as if it were boxed ("3\\sqrt{13}" would otherwise
        # be read as "3"); the raw text is the fallback. Longer text goes to math-verify as is.
        pred_core = pred.strip()
        if "\n" not in pred_core and 0 < len(pred_core) <= 200:
            pred_text = "\\boxed{" + _strip_dollars(pred_core) + "}"
            fallback = pred
        else:
            pred_text = pred
            fallback = None
    return pred_core, gold_core, pred_text, gold_text, fallback


class MathGrader:
    """Grades (prediction, gold) pairs with math-verify in a worker process under hard deadlines.

    ``pred`` may be a bare answer (``"0.5"``, ``"\\frac{1}{2}"``) or text containing
    ``\\boxed{...}`` (then the last boxed content is graded); ``gold`` is a bare answer (it is
    wrapped in ``\\boxed{}`` for parsing) or a text with ``\\boxed{}``.

    Args:
        timeout_s: per-comparison deadline (seconds).
        start_method: see :class:`segrl.rewards.workers.CallWorker` (``"auto"`` starts a fresh
            interpreter; ``"inline"`` grades in-process, with timeouts only in the main thread).

    ``stats`` counts ``graded`` pairs, ``fast_path`` decisions, ``worker`` comparisons,
    ``timeouts`` and ``errors``. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, *, start_method: str = "auto", startup_timeout_s: float = 120.0):
        if timeout_s is None or timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.timeout_s = float(timeout_s)
        self._worker = CallWorker(
            [_mv_grade], init=_worker_init, start_method=start_method, startup_timeout_s=startup_timeout_s, name="segrl-math-grader"
        )
        self._stats_lock = threading.Lock()
        self.stats = {"graded": 0, "fast_path": 0, "worker": 0, "timeouts": 0, "errors": 0}

    def start(self, wait: bool = True) -> MathGrader:
        """Start the worker now instead of on first use."""
        self._worker.start(wait=wait)
        return self

    def grade(self, pred: Any, gold: Any, timeout_s: float | None = None) -> bool:
        """True if ``pred`` is mathematically equivalent to ``gold``; False on timeout/error."""
        return self.grade_batch([pred], [gold], timeout_s)[0]

    def grade_batch(self, preds: Sequence[Any], golds: Sequence[Any], timeout_s: float | None = None) -> list[bool]:
        """Grade pairs in one worker round trip (fast path and duplicates handled locally)."""
        if len(preds) != len(golds):
            raise ValueError(f"{len(preds)} predictions for {len(golds)} gold answers")
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        out: list[bool | None] = [None] * len(preds)
        pending: dict[tuple[str, str, str | None], list[int]] = {}
        n_fast = 0
        for i, (p, g) in enumerate(zip(preds, golds)):
            if p is None or (isinstance(p, str) and not p.strip()):
                out[i] = False
                n_fast += 1
                continue
            pred_core, gold_core, pred_text, gold_text, fallback = _prepare(p, g)
            if not gold_core:
                out[i] = False
                n_fast += 1
                continue
            d = _fast_decision(pred_core, gold_core)
            if d is not None:
                out[i] = d
                n_fast += 1
                continue
            pending.setdefault((pred_text, gold_text, fallback), []).append(i)
        n_timeouts = n_errors = 0
        if pending:
            keys = list(pending)
            results = self._worker.run([(0, k, {}) for k in keys], timeout)
            for key, r in zip(keys, results):
                ok = r.status == "ok" and bool(r.value)
                if r.status == "timeout":
                    n_timeouts += 1
                elif r.status == "error":
                    n_errors += 1
                for i in pending[key]:
                    out[i] = ok
        with self._stats_lock:
            self.stats["graded"] += len(preds)
            self.stats["fast_path"] += n_fast
            self.stats["worker"] += len(pending)
            self.stats["timeouts"] += n_timeouts
            self.stats["errors"] += n_errors
        return [bool(x) for x in out]

    def close(self) -> None:
        """Stop the worker process (idempotent)."""
        self._worker.close()

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_default: MathGrader | None = None
_default_lock = threading.Lock()


def _reset_after_fork() -> None:
    global _default_lock
    _default_lock = threading.Lock()
    if _default is not None:
        _default._stats_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def get_grader() -> MathGrader:
    """The process-wide default :class:`MathGrader` (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathGrader()
        return _default


def shutdown_grader() -> None:
    """Stop the default grader's worker (a later call starts a new one)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
            _default = None


def grading_stats() -> dict[str, int]:
    """Counters of the default grader (``graded``, ``fast_path``, ``worker``, ``timeouts``, ``errors``)."""
    with _default_lock:
        return dict(_default.stats) if _default is not None else {}


def grade(pred: Any, gold: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True if ``pred`` equals ``gold`` mathematically (math-verify), else False.

    Safe to call from any thread; a comparison that runs past ``timeout_s`` is cut off, returns
    False and is counted in :func:`grading_stats`. ``\\boxed{\\frac{1}{2}}`` vs ``0.5`` -> True.
    """
    return get_grader().grade(pred, gold, timeout_s)


def grade_batch(preds: Sequence[Any], golds: Sequence[Any], timeout_s: float = DEFAULT_TIMEOUT_S) -> list[bool]:
    """:func:`grade` for many pairs in one worker round trip."""
    return get_grader().grade_batch(preds, golds, timeout_s)


# ----------------------------------------------------------------------------------------------
# TRL-style reward functions
# ----------------------------------------------------------------------------------------------


def _gsm8k_gold(answer: Any) -> str:
    s = "" if answer is None else str(answer)
    if "####" in s:
        return extract_gsm8k_answer(s) or ""
    return s.strip()


def gsm8k_accuracy(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **kw: Any) -> list[float]:
    """1.0 if the completion's final answer equals the gold GSM8K answer, else 0.0.

    The prediction is extracted with :func:`extract_gsm8k_prediction` (``####``, then
    ``\\boxed{}``, then "answer is N", then the last number); ``answer`` holds gold final
    answers (a full GSM8K solution with ``####`` also works). Graded with :func:`grade_batch`.
    """
    preds = [extract_gsm8k_prediction(completion_text(c)) for c in completions]
    golds = [_gsm8k_gold(a) for a in answer]
    return [1.0 if ok else 0.0 for ok in grade_batch(preds, golds)]


def math_accuracy(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **kw: Any) -> list[float]:
    """1.0 if the last ``\\boxed{...}`` of the completion is equivalent to the gold answer
    (math-verify), else 0.0. A completion without ``\\boxed{}`` scores 0.0 (the MATH prompt
    asks for it)."""
    preds = []
    for c in completions:
        b = extract_boxed(completion_text(c))
        preds.append(None if b is None or not b.strip() else "\\boxed{" + b + "}")
    golds = ["" if a is None else str(a) for a in answer]
    return [1.0 if ok else 0.0 for ok in grade_batch(preds, golds)]


def _norm_text(s: str) -> str:
    return " ".join(s.strip().strip("\"'`").rstrip(".").split()).lower()


def answer_accuracy(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any], **kw: Any) -> list[float]:
    """Generic correctness for user data sets: 1.0 if the completion's final answer
    (:func:`extract_final_answer`) matches the gold ``answer`` either as text (case and
    whitespace insensitive) or mathematically (:func:`grade_batch`), else 0.0."""
    preds = [extract_final_answer(completion_text(c)) for c in completions]
    golds = ["" if a is None else str(a) for a in answer]
    out: list[float | None] = [None] * len(preds)
    todo = []
    for i, (p, g) in enumerate(zip(preds, golds)):
        if p is None or not g.strip():
            out[i] = 0.0
        elif _norm_text(p) == _norm_text(g):
            out[i] = 1.0
        else:
            todo.append(i)
    if todo:
        for i, ok in zip(todo, grade_batch([preds[i] for i in todo], [golds[i] for i in todo])):
            out[i] = 1.0 if ok else 0.0
    return [float(x) for x in out]


# These enforce their own deadlines: RewardComputer calls them in-process (no extra worker hop).
gsm8k_accuracy.segrl_inline = True  # type: ignore[attr-defined]
math_accuracy.segrl_inline = True  # type: ignore[attr-defined]
answer_accuracy.segrl_inline = True  # type: ignore[attr-defined]
