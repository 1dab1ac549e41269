"""Reward isolation with real worker processes: a failure belongs to the samples that failed.

A function that hangs (or crashes its worker, or allocates too much) on some samples costs
only those samples: every other sample gets its real reward, and only the failing ones count
against ``max_error_fraction``. Small timeouts keep each case to a few seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segrl.rewards.combine import CallWorker, RewardComputer, RewardError

REPO = Path(__file__).resolve().parents[1]

# Module-level functions: a fresh worker interpreter imports them ("subprocess" start method).
# A sample is "bad" when its completion starts with "bad".


def _bad(c: str) -> bool:
    return c.startswith("bad")


def hangs_on_bad(prompts, completions, **kw):
    if any(_bad(c) for c in completions):
        time.sleep(3600)
    return [float(len(c)) for c in completions]


def hangs_hard_on_bad(prompts, completions, **kw):
    """Ignores the worker's SIGALRM: only the parent's hard kill stops it."""
    if any(_bad(c) for c in completions):
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        while True:
            time.sleep(0.05)
    return [float(len(c)) for c in completions]


def exits_on_bad(prompts, completions, **kw):
    if any(_bad(c) for c in completions):
        os._exit(3)
    return [float(len(c)) for c in completions]


def segfaults_on_bad(prompts, completions, **kw):
    if any(_bad(c) for c in completions):
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return [float(len(c)) for c in completions]


def allocates_on_bad(prompts, completions, **kw):
    if any(_bad(c) for c in completions):
        # calloc'd (mmap'd zero pages): costs address space, not memory, when no limit stops it
        block = bytes(2 << 30)
        return [float(len(block) > 0)] * len(completions)
    return [float(len(c)) for c in completions]


@pytest.fixture
def make_rc():
    """Makes RewardComputers; closes them (and their worker processes) after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda *args, **kw: stack.enter_context(RewardComputer(*args, **kw))


def _batch(n: int, bad: set[int]) -> list[str]:
    return [("bad" if i in bad else "ok") + "x" * i for i in range(n)]


def test_hang_on_a_third_costs_only_the_hanging_samples(make_rc):
    # 9 samples, 3 hang, placed so that two hanging samples are neighbours (the case that used
    # to give up on the rest of the batch as "not attempted")
    bad = {1, 2, 6}
    rc = make_rc([hangs_on_bad], timeout_s=0.3, max_error_fraction=0.5, error_min_samples=16)
    rc.start(wait=True)
    comps = _batch(9, bad)
    for _ in range(2):  # 18 samples, 6 failed: a third, under the 0.5 limit
        t0 = time.monotonic()
        out = rc(["p"] * 9, comps)
        assert time.monotonic() - t0 < 15
        assert out.failed["hangs_on_bad"] == [i in bad for i in range(9)]
        assert out.rewards == [0.0 if i in bad else float(len(c)) for i, c in enumerate(comps)]
        assert out.metrics["rewards/errors"] == 3 and out.metrics["rewards/timeouts"] == 3
        assert all("timed out" in text for _, text in out.errors) and len(out.errors) == 3
    assert list(rc._budget.windows[0]) == [int(i in bad) for i in range(9)] * 2


def test_error_fraction_is_the_failing_samples_fraction(make_rc):
    # 6 of 9 samples hang: 67% > 50% once 16 samples are in the window, so the second batch
    # stops the run, naming the real fraction
    bad = {0, 1, 3, 4, 6, 7}
    rc = make_rc([hangs_on_bad], timeout_s=0.3, max_error_fraction=0.5, error_min_samples=16)
    out = rc(["p"] * 9, _batch(9, bad))  # 9 in the window: not judged yet
    assert out.metrics["rewards/errors"] == 6
    with pytest.raises(RewardError) as ei:
        rc(["p"] * 9, _batch(9, bad))
    msg = str(ei.value)
    assert "'hangs_on_bad' failed on" in msg and "(max_error_fraction=0.5)" in msg
    # stops early (at least 51% of 18 known) or at the end (12/18 = 67%): never more than 67%
    pct = int(msg.split("failed on ")[1].split("%")[0].replace("at least ", ""))
    assert 50 < pct <= 67


def test_a_function_that_ignores_the_timeout_is_killed_per_sample(make_rc):
    bad = {0, 3}
    rc = make_rc([hangs_hard_on_bad], timeout_s=0.3, max_error_fraction=None)
    rc.start(wait=True)
    comps = _batch(5, bad)
    out = rc(["p"] * 5, comps)
    assert out.failed["hangs_hard_on_bad"] == [i in bad for i in range(5)]
    assert out.rewards == [0.0 if i in bad else float(len(c)) for i, c in enumerate(comps)]
    assert any("worker killed" in text for _, text in out.errors)
    assert rc(["p"], ["fine"]).rewards == [4.0]  # a fresh worker serves the next batch


@pytest.mark.parametrize(
    "fn, reported", [(exits_on_bad, "exit code 3"), (segfaults_on_bad, "killed by signal SIGSEGV")], ids=["os._exit", "segfault"]
)
def test_a_dying_worker_is_reported_with_its_exit_status(make_rc, fn, reported):
    bad = {2}
    rc = make_rc([fn], timeout_s=5.0, max_error_fraction=None)
    comps = _batch(4, bad)
    out = rc(["p"] * 4, comps)
    assert out.failed[fn.__name__] == [False, False, True, False]
    assert out.rewards == [0.0 if i in bad else float(len(c)) for i, c in enumerate(comps)]
    texts = [text for _, text in out.errors]
    assert texts and all(f"worker process died while running this call ({reported})" in t for t in texts), texts
    assert "None" not in " ".join(texts)


def test_memory_limit_makes_a_big_allocation_an_error_for_its_samples(make_rc):
    comps = _batch(3, {1})
    unlimited = make_rc([allocates_on_bad], timeout_s=10.0, memory_mb=None, max_error_fraction=None)
    assert unlimited(["p"] * 3, comps).failed["allocates_on_bad"] == [False] * 3  # 2 GiB of address space is fine
    limited = make_rc([allocates_on_bad], timeout_s=10.0, memory_mb=256, max_error_fraction=None)
    out = limited(["p"] * 3, comps)
    assert out.failed["allocates_on_bad"] == [False, True, False]
    assert out.rewards == [2.0, 0.0, 4.0]
    (text,) = [t for _, t in out.errors]
    assert "MemoryError" in text and "data.reward_memory_mb" in text
    assert limited(["p"], ["ok"]).rewards == [2.0]  # the worker lives on


def test_call_worker_memory_limit_in_a_forked_worker():
    # a forked worker starts as big as its parent: the limit counts from there
    with CallWorker([lambda n: len(bytes(n))], memory_mb=128, start_method="fork") as w:
        small, big = w.run([(0, (1 << 20,), {}), (0, (1 << 30,), {})], timeout_s=10.0)
    assert (small.status, small.value) == ("ok", 1 << 20)
    assert big.status == "error" and "MemoryError" in big.value


_CLOSE_WHILE_STARTING = """
import time
from segrl.rewards.combine import RewardComputer
from test_reward_isolation import exits_on_bad
for _ in range(3):
    rc = RewardComputer([exits_on_bad], timeout_s=5.0, max_error_fraction=None)
    out = rc(["p"] * 2, ["ok", "bad"])       # the worker dies; its replacement starts at once
    assert out.failed["exits_on_bad"] == [False, True], out.failed
    rc.close()                                # closed while the replacement is still starting
    rc = RewardComputer([exits_on_bad], timeout_s=5.0, max_error_fraction=None)
    rc.close()                                # closed before its first worker is ready
time.sleep(1.5)                               # the abandoned workers reach their first send
print("done")
"""


def test_no_stray_traceback_when_a_worker_is_abandoned():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", _CLOSE_WHILE_STARTING], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "done"
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr
