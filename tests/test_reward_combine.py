"""RewardComputer: weights, None, failures contained, real timeouts, error budget; CallWorker."""

from __future__ import annotations

import math
import signal
import threading
import time

import pytest

from segrl.rewards.combine import (
    CallWorker,
    RewardComputer,
    RewardError,
    WorkerStartError,
    load_reward_func,
    reward_func_name,
)

# Module-level functions: importable by a fresh worker interpreter ("subprocess" start method).


def const_one(prompts, completions, **kw):
    return [1.0] * len(completions)


def by_text(prompts, completions, **kw):
    table = {"a": 1.0, "b": 0.0, "none": None}
    return [table.get(c, 0.5) for c in completions]


def half_or_none(prompts, completions, **kw):
    return [None if c == "none" else 0.5 for c in completions]


def uses_answer(prompts, completions, answer, **kw):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


def only_completions(completions, **kwargs):  # TRL docs style: no `prompts` parameter
    return [float(len(c)) for c in completions]


def raises_on_bad(prompts, completions, **kw):
    for c in completions:
        if c == "bad":
            raise ValueError("boom on bad sample")
    return [1.0] * len(completions)


def always_raises(prompts, completions, **kw):
    raise ValueError("boom always")


def wrong_length(prompts, completions, **kw):
    return [1.0] * (len(completions) + 1)


def nan_on_second(prompts, completions, **kw):
    return [float("nan") if c == "nan" else (math.inf if c == "inf" else 1.0) for c in completions]


def not_a_number(prompts, completions, **kw):
    return ["x" if c == "str" else 1.0 for c in completions]


def hangs_on_hang(prompts, completions, **kw):
    if "hang" in completions:
        while True:  # pure-Python busy loop: cannot be interrupted from a thread
            pass
    return [1.0] * len(completions)


def sleepy(prompts, completions, **kw):
    if "hang" in completions:
        time.sleep(3600)
    return [2.0] * len(completions)


def stubborn(x):
    """Ignores the worker's soft SIGALRM timeout: only the parent's hard kill stops it."""
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    while True:
        time.sleep(0.05)


def _explode_on_unpickle():
    raise ImportError("reward module cannot be imported in the worker")


class BreaksInWorker:
    """Pickles fine here, fails to unpickle in the worker (like a module that fails to import)."""

    __name__ = "breaks_in_worker"

    def __call__(self, prompts, completions, **kw):
        return [0.0] * len(completions)

    def __reduce__(self):
        return (_explode_on_unpickle, ())


def square(x):
    return x * x


def fails(x):
    raise KeyError(x)


P3 = ["p1", "p2", "p3"]


@pytest.fixture
def rc_factory():
    made = []

    def make(*args, **kw):
        rc = RewardComputer(*args, **kw)
        made.append(rc)
        return rc

    yield make
    for rc in made:
        rc.close()


def test_weights_and_none(rc_factory):
    rc = rc_factory([by_text, half_or_none], weights=[2.0, 1.0], timeout_s=None)
    out = rc(P3, ["a", "b", "none"])
    assert out.rewards == [2.5, 0.5, 0.0]  # None skipped; all-None sample -> 0
    assert out.per_func["by_text"] == [1.0, 0.0, None]
    assert out.metrics["rewards/by_text/mean"] == pytest.approx(0.5)
    assert out.metrics["rewards/by_text/std"] == pytest.approx(math.sqrt(0.5))
    assert out.metrics["rewards/half_or_none/mean"] == pytest.approx(0.5)
    assert out.metrics["rewards/errors"] == 0
    with pytest.raises(ValueError):
        RewardComputer([by_text], weights=[1.0, 2.0])


def test_columns_and_keyword_calling(rc_factory):
    rc = rc_factory([uses_answer, only_completions], timeout_s=None)
    out = rc(["p", "q"], ["x", "yy"], answer=["x", "z"])
    assert out.per_func["uses_answer"] == [1.0, 0.0]
    assert out.per_func["only_completions"] == [1.0, 2.0]
    assert out.rewards == [2.0, 2.0]


def test_failures_contained_in_worker(rc_factory):
    rc = rc_factory(
        [const_one, raises_on_bad, wrong_length, nan_on_second, not_a_number],
        timeout_s=5.0,
        fallback=-1.0,
        max_error_fraction=None,
    )
    assert rc.start_method == "subprocess"
    out = rc(["p"] * 4, ["ok", "bad", "nan", "str"])
    # raising function: batch call fails, per-sample isolation blames only sample 1
    assert out.per_func["raises_on_bad"] == [1.0, -1.0, 1.0, 1.0]
    assert out.failed["raises_on_bad"] == [False, True, False, False]
    assert any("boom on bad sample" in text for name, text in out.errors if name == "raises_on_bad")
    # wrong length: every sample fails
    assert out.failed["wrong_length"] == [True] * 4
    assert out.per_func["wrong_length"] == [-1.0] * 4
    # NaN / non-number only at their positions
    assert out.failed["nan_on_second"] == [False, False, True, False]
    assert out.failed["not_a_number"] == [False, False, False, True]
    assert out.metrics["rewards/errors"] == 1 + 4 + 1 + 1
    assert out.metrics["rewards/raises_on_bad/errors"] == 1
    # totals: fallback is weighted like a value
    assert out.rewards[0] == 1 + 1 - 1 + 1 + 1
    assert out.metrics["rewards/raises_on_bad/mean"] == 1.0  # failures excluded from metrics


def test_inf_and_inline_failures(rc_factory):
    rc = rc_factory([nan_on_second, raises_on_bad], timeout_s=None, max_error_fraction=None)
    out = rc(["p"] * 3, ["inf", "bad", "ok"])
    assert out.failed["nan_on_second"] == [True, False, False]
    assert out.failed["raises_on_bad"] == [False, True, False]
    assert out.rewards == [1.0, 1.0, 2.0]


def test_hanging_function_times_out(rc_factory):
    rc = rc_factory([const_one, hangs_on_hang, sleepy], timeout_s=0.6, max_error_fraction=None)
    rc._worker.start(wait=True)
    t0 = time.monotonic()
    out = rc(P3, ["x", "hang", "y"])
    elapsed = time.monotonic() - t0
    assert out.failed["hangs_on_hang"] == [False, True, False]
    assert out.failed["sleepy"] == [False, True, False]
    assert out.per_func["hangs_on_hang"] == [1.0, 0.0, 1.0]
    assert out.per_func["sleepy"] == [2.0, 0.0, 2.0]
    assert out.metrics["rewards/timeouts"] == 2
    assert out.rewards == [4.0, 1.0, 4.0]
    assert elapsed < 12, elapsed
    # the worker still works afterwards
    assert rc(["p"], ["fine"]).rewards == [4.0]


def test_timeout_holds_in_a_thread(rc_factory):
    rc = rc_factory([sleepy], timeout_s=0.5, max_error_fraction=None)
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("out", rc(["p"], ["hang"])))
    th.start()
    th.join(timeout=20)
    assert not th.is_alive()
    assert box["out"].failed["sleepy"] == [True]


def test_lambda_uses_fork_worker(rc_factory):
    k = 3.0
    rc = rc_factory([lambda prompts, completions, **kw: [k] * len(completions)], timeout_s=5.0)
    assert rc.start_method == "fork"
    out = rc(["p", "q"], ["a", "b"])
    assert out.rewards == [3.0, 3.0]
    assert "rewards/<lambda>/mean" in out.metrics


def test_error_budget_raises_with_traceback(rc_factory):
    rc = rc_factory([const_one, always_raises], timeout_s=None, max_error_fraction=0.5, error_min_samples=4)
    out = rc(["p", "q"], ["a", "b"])  # 2 samples in the window: below the minimum
    assert out.failed["always_raises"] == [True, True]
    with pytest.raises(RewardError) as ei:
        rc(["p", "q"], ["a", "b"])
    err = ei.value
    assert err.func_name == "always_raises"
    assert "ValueError: boom always" in err.traceback
    assert "Traceback" in err.traceback and "always_raises" in err.traceback
    assert "boom always" in str(err)


def test_error_budget_from_worker_traceback(rc_factory):
    rc = rc_factory([always_raises], timeout_s=5.0, max_error_fraction=0.25, error_min_samples=2)
    with pytest.raises(RewardError) as ei:
        rc(["p", "q"], ["a", "b"])
    assert "ValueError: boom always" in ei.value.traceback
    assert "test_reward_combine.py" in ei.value.traceback  # the original frames, from the worker


def test_call_worker_hard_kill_and_restart():
    with CallWorker([square, stubborn, fails], grace_s=0.5) as w:
        assert w.start_method == "subprocess"
        w.start(wait=True)
        pid0 = w.pid
        t0 = time.monotonic()
        res = w.run([(0, (3,), {}), (1, (0,), {}), (0, (4,), {}), (2, ("k",), {})], timeout_s=0.5)
        assert time.monotonic() - t0 < 10
        assert [r.status for r in res] == ["ok", "timeout", "ok", "error"]
        assert res[0].value == 9 and res[2].value == 16
        assert "KeyError" in res[3].value
        assert w.stats["kills"] == 1
        assert w.pid != pid0  # replaced
        # consecutive timeouts stop early
        res = w.run([(1, (0,), {}), (1, (0,), {}), (1, (0,), {})], timeout_s=0.3, stop_after_timeouts=1)
        assert [r.status for r in res] == ["timeout"] * 3
        assert "not attempted" in res[2].value


def test_worker_start_error_is_reported():
    def _init():
        raise RuntimeError("cannot init")

    w = CallWorker([square], init=_init, start_method="fork", startup_timeout_s=20)
    try:
        with pytest.raises(WorkerStartError) as ei:
            w.run([(0, (2,), {})], timeout_s=1.0)
        assert "cannot init" in str(ei.value)
    finally:
        w.close()


def test_worker_start_failure_raises_reward_error(rc_factory):
    rc = rc_factory([BreaksInWorker()], timeout_s=5.0)
    with pytest.raises(RewardError, match="could not start") as ei:
        rc.start(wait=True)
    assert "reward module cannot be imported in the worker" in ei.value.traceback
    with pytest.raises(RewardError):
        rc(["p"], ["c"])


def test_load_reward_func(tmp_path):
    f = load_reward_func("segrl.rewards.math_grading:gsm8k_accuracy")
    assert f.__name__ == "gsm8k_accuracy"
    p = tmp_path / "my_rewards.py"
    p.write_text("def length_reward(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    g = load_reward_func(f"{p}:length_reward")
    assert reward_func_name(g) == "length_reward"
    assert g(["p"], ["abc"]) == [3.0]
    with RewardComputer([f"{p}:length_reward"], timeout_s=5.0) as rc:
        assert rc.start_method == "subprocess"  # file functions pickle by path
        assert rc(["p", "q"], ["ab", "abcd"]).rewards == [2.0, 4.0]
    with pytest.raises(AttributeError):
        load_reward_func(f"{p}:missing")
    with pytest.raises(FileNotFoundError):
        load_reward_func(f"{tmp_path}/nope.py:f")
    with pytest.raises(ValueError):
        load_reward_func("no_colon_or_dot")
    with pytest.raises(ImportError):
        load_reward_func("segrl.no_such_module:f")


def test_forked_worker_does_not_share_the_parents_grader(rc_factory):
    from segrl.rewards.math_grading import get_grader, grade

    parent_grader = get_grader().start(wait=True)
    parent_pid = parent_grader._worker.pid
    rc = rc_factory([lambda prompts, completions, **kw: [1.0 if grade(c, "0.5") else 0.0 for c in completions]], timeout_s=20.0)
    assert rc.start_method == "fork"
    assert rc(["p", "q"], ["\\boxed{\\frac{1}{2}}", "3"]).rewards == [1.0, 0.0]
    # the parent's grader worker was not touched by the child and still answers
    assert parent_grader._worker.pid == parent_pid
    assert grade("\\frac{1}{2}", "0.5") is True
