"""Answer extraction and math-verify grading with timeouts."""

from __future__ import annotations

import threading
import time

import pytest

from segrl.rewards.math_grading import (
    MathGrader,
    answer_accuracy,
    extract_boxed,
    extract_final_answer,
    extract_gsm8k_answer,
    extract_gsm8k_prediction,
    grade,
    grade_batch,
    grading_stats,
    gsm8k_accuracy,
    math_accuracy,
)


@pytest.fixture(scope="module", autouse=True)
def _grader_worker():
    from segrl.rewards.math_grading import get_grader, shutdown_grader

    get_grader().start(wait=True)
    yield
    shutdown_grader()


def test_extract_gsm8k_answer():
    assert extract_gsm8k_answer("She makes 9 * 2 = $18.\n#### 18") == "18"
    assert extract_gsm8k_answer("#### 1,234") == "1234"
    assert extract_gsm8k_answer("a #### 1 then #### -2,000\nQuestion: next") == "-2000"
    assert extract_gsm8k_answer("no marker 42") is None
    assert extract_gsm8k_answer("####   \n") is None
    assert extract_gsm8k_answer(None) is None


def test_extract_boxed():
    assert extract_boxed("so \\boxed{5}.") == "5"
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces are not nesting
    assert extract_boxed("answer: \\boxed 5$.") == "5"
    assert extract_boxed("\\fbox{x+1}") == "x+1"
    assert extract_boxed("\\boxed{12") is None  # truncated
    assert extract_boxed("no box here") is None
    assert extract_boxed("") is None


def test_extract_gsm8k_prediction():
    assert extract_gsm8k_prediction("... #### 1,234") == "1234"
    assert extract_gsm8k_prediction("so \\boxed{72}") == "72"
    assert extract_gsm8k_prediction("The answer is 18 (from step 3).") == "18"
    assert extract_gsm8k_prediction("3 + 4 = 7, then 7 * 2 = 14.") == "14"
    assert extract_gsm8k_prediction("no numbers") is None


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("#### 1,234", "1234"),
        ("1,234", "1234"),
        ("18.00", "18"),
        ("$18", "18"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("3\\sqrt{13}", "3\\sqrt{13}"),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("The final answer is \\boxed{\\dfrac{2}{1005}}.", "\\frac{2}{1005}"),
        ("106", "106^\\circ"),
    ],
)
def test_grade_correct(pred, gold):
    assert grade(pred, gold) is True


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("#### 1,235", "1234"),
        ("17", "18"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("\\boxed{3}", "3\\sqrt{13}"),
        ("", "5"),
        (None, "5"),
        ("no answer here", "\\frac{1}{2}"),
    ],
)
def test_grade_wrong(pred, gold):
    assert grade(pred, gold) is False


def test_grade_batch_one_round_trip_and_fast_path():
    from segrl.rewards.math_grading import get_grader

    g = get_grader()
    before = dict(g.stats)
    starts = g._worker.stats["starts"]
    preds = ["1,234", "7", "\\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{2}}", "x"]
    golds = ["1234", "8", "0.5", "0.5", "\\frac{1}{2}"]
    assert grade_batch(preds, golds) == [True, False, True, True, False]
    assert g.stats["fast_path"] - before["fast_path"] == 2  # plain numbers: no worker
    assert g.stats["worker"] - before["worker"] == 2  # the duplicate pair is graded once
    assert g._worker.stats["starts"] == starts  # same worker process


def test_pathological_answer_is_cut_off_by_timeout():
    # sympy tries to evaluate 10^(10^10): without a deadline this runs for a very long time.
    before = grading_stats()["timeouts"]
    t0 = time.monotonic()
    assert grade("\\boxed{10^{10^{10}}}", "1", timeout_s=0.5) is False
    assert time.monotonic() - t0 < 5
    assert grading_stats()["timeouts"] == before + 1
    assert grade("\\boxed{\\frac{1}{2}}", "0.5") is True  # the grader still works


def test_hard_deadline_when_soft_timeout_is_ignored(monkeypatch):
    """A comparison that ignores the in-worker SIGALRM is killed by the parent's deadline."""
    import segrl.rewards.math_grading as mg

    # Through the same worker mechanism: the grader's function is replaced before the worker
    # forks (the module-level stand-in is inherited by the forked worker).
    monkeypatch.setattr(mg, "_mv_grade", _stubborn_compare)
    with MathGrader(timeout_s=0.3, start_method="fork") as g:
        g._worker.grace_s = 0.3
        t0 = time.monotonic()
        assert g.grade_batch(["\\boxed{x}", "\\boxed{y}"], ["1", "2"]) == [False, False]
        assert time.monotonic() - t0 < 10
        assert g.stats["timeouts"] == 2
        assert g._worker.stats["kills"] == 2


def _stubborn_compare(pred, gold, fallback=None):
    import signal

    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    while True:
        time.sleep(0.05)


def test_grade_from_thread_counts_timeouts():
    before = grading_stats().get("timeouts", 0)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", grade("\\boxed{10^{10^{10}}}", "1", timeout_s=0.5)))
    th.start()
    th.join(timeout=20)
    assert out["r"] is False
    assert grading_stats()["timeouts"] == before + 1


def test_reward_functions():
    comps = [
        "Janet sells 9 eggs, 9 * 2 = 18.\n#### 18",
        "The answer is 1,234.",
        "so the result is 17",
        [{"role": "assistant", "content": "#### 18"}],  # conversational completion
    ]
    assert gsm8k_accuracy(None, comps, ["18", "1234", "18", "18"]) == [1.0, 1.0, 0.0, 1.0]
    # a raw GSM8K solution as gold also works
    assert gsm8k_accuracy(None, ["#### 5"], ["2 + 3 = 5\n#### 5"]) == [1.0]
    mcomps = [
        "Simplify... so the answer is $\\boxed{\\frac{1}{2}}$.",
        "\\boxed{0.5}",
        "The answer is 1/2",  # no \boxed: 0 by design
        "\\boxed{\\frac{1}{3}}",
    ]
    assert math_accuracy(None, mcomps, ["0.5", "\\frac12", "\\frac{1}{2}", "\\frac{1}{2}"]) == [1.0, 1.0, 0.0, 0.0]


def test_generic_answer_accuracy():
    assert extract_final_answer("17+25=42\n42-8=34\nanswer: 34.") == "34"
    assert extract_final_answer("The final answer is $\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert extract_final_answer("so \\boxed{Paris}") == "Paris"
    comps = ["answer: 34.", "The answer is Paris.", "\\boxed{0.5}", "answer: 35", "nothing"]
    golds = ["34", "paris", "\\frac{1}{2}", "34", "1"]
    assert answer_accuracy(None, comps, golds) == [1.0, 1.0, 1.0, 0.0, 0.0]
