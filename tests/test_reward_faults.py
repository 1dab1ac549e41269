"""Reward code that fails, through the trainer (``segrl train --data.reward_funcs file.py:fn``).

A user reward function that raises, returns NaN/inf/a non-number, returns the wrong number of
values, or hangs (even one that ignores the timeout signal) fails only on the samples it fails
on: those get the fallback reward 0.0, are counted in ``rewards/errors`` (and
``rewards/<fn>/errors``), and training goes on. A function that keeps failing stops the run
with its traceback once more than ``data.max_reward_error_fraction`` of recent samples failed.
"""

from __future__ import annotations

import math

import pytest
from reliability_helpers import (
    one_torch_thread,  # noqa: F401  (autouse fixture)
    reward_file,
    step_lines,
    tiny_model_dir,
    train_args,
)

from segrl.cli import main
from segrl.trainer import checkpoint as ckpt

FUNCS = '''
import math, time

def _bad(c):
    # about a third of the completions, decided by their text (deterministic)
    return sum(map(ord, c)) % 3 == 0

def _ok(c):
    return len(c) / 16.0

def raises(completions, **kw):
    out = []
    for c in completions:
        if _bad(c):
            raise ValueError("user bug on " + repr(c))
        out.append(_ok(c))
    return out

def nan(completions, **kw):
    return [float("nan") if _bad(c) else _ok(c) for c in completions]

def inf(completions, **kw):
    return [float("inf") if _bad(c) else _ok(c) for c in completions]

def not_a_number(completions, **kw):
    return ["high" if _bad(c) else _ok(c) for c in completions]

def wrong_length(completions, **kw):
    out = [_ok(c) for c in completions]
    return out + [0.0] if any(_bad(c) for c in completions) else out

def hangs(completions, **kw):
    if any(_bad(c) for c in completions):
        time.sleep(600)
    return [_ok(c) for c in completions]

def hangs_hard(completions, **kw):
    # swallows the soft timeout: only killing the worker process stops it
    if any(_bad(c) for c in completions):
        while True:
            try:
                time.sleep(600)
            except BaseException:
                pass
    return [_ok(c) for c in completions]

def always_raises(completions, **kw):
    raise RuntimeError("reward service unreachable (user bug)")
'''


def _failing_per_step(run_dir, model_dir) -> dict[int, int]:
    """How many of each step's completions the FUNCS fail on (``_bad``), decoded as the scorer does."""
    from transformers import AutoTokenizer

    from segrl.tree import load_jsonl

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out: dict[int, int] = {}
    for t in load_jsonl(run_dir / "rollouts.jsonl"):
        for leaf in t.leaves():
            c = tok.decode(t.path_token_ids(leaf, include_prompt=False), skip_special_tokens=True)
            out[t.row["step"]] = out.get(t.row["step"], 0) + (sum(map(ord, c)) % 3 == 0)
    return out


def _train(tmp_path, fn, *extra, steps):
    model = tiny_model_dir(tmp_path)
    rew = f"{reward_file(tmp_path, FUNCS, 'user_rewards.py')}:{fn}"
    timeout = "0.3" if fn.startswith("hangs") else "20"  # generous where nothing should time out
    return main(train_args(model, tmp_path / "run", "--data.reward_timeout", timeout, *extra, steps=steps, reward=rew))


@pytest.mark.parametrize(
    "fn, steps",
    [("raises", 5), ("nan", 5), ("inf", 5), ("not_a_number", 5), ("wrong_length", 5), ("hangs", 3), ("hangs_hard", 1)],
)
def test_failing_samples_get_fallback_and_training_goes_on(tmp_path, fn, steps):
    assert _train(tmp_path, fn, steps=steps) == 0
    lines = step_lines(tmp_path / "run")
    assert [m["step"] for m in lines] == list(range(1, steps + 1))  # every step ran
    errors = sum(m["rewards/errors"] for m in lines)
    assert errors > 0, "the fault was never triggered"
    assert errors == sum(m[f"rewards/{fn}/errors"] for m in lines)
    assert errors < sum(m["train/samples"] for m in lines)  # only the failing samples
    # exactly the samples the function fails on, step by step (a hang used to cost its
    # neighbours too: "not attempted (too many consecutive timeouts)")
    bad = _failing_per_step(tmp_path / "run", tiny_model_dir(tmp_path))
    assert [m[f"rewards/{fn}/errors"] for m in lines] == [float(bad.get(m["step"], 0)) for m in lines]
    for m in lines:
        assert math.isfinite(m["reward"]) and math.isfinite(m["loss"])
    if fn.startswith("hangs"):
        assert [m["rewards/timeouts"] for m in lines] == [m["rewards/errors"] for m in lines]
    assert (tmp_path / "run" / "final_model").is_dir()


def test_reward_that_keeps_failing_stops_with_its_traceback(tmp_path, capsys):
    assert _train(tmp_path, "always_raises", steps=20) == 1
    err = capsys.readouterr().err
    assert "RewardError" in err and "'always_raises' failed on 100%" in err
    assert "Traceback" in err and "RuntimeError: reward service unreachable (user bug)" in err
    lines = step_lines(tmp_path / "run")
    # The window needs 32 samples (4 steps of 8) before it judges: steps 1-3 ran on fallbacks.
    assert [m["rewards/errors"] for m in lines] == [8.0, 8.0, 8.0]
    # The run stopped during step 4; the checkpoint of step 3 is intact for --resume.
    last = ckpt.latest_valid_checkpoint(tmp_path / "run" / "checkpoints", log=lambda m: None)
    assert last is not None and last.name == "step-000003"


def test_math_verify_grading_always_has_a_timeout():
    from segrl.rewards.math_grading import MathGrader

    for bad in (None, 0, -1):
        with pytest.raises(ValueError, match="timeout"):
            MathGrader(timeout_s=bad)
