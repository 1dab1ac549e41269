import pytest

from segrl.tasks.arithmetic import (
    STOP_STRINGS,
    Difficulty,
    arithmetic_correctness,
    extract_answer,
    make_arithmetic_task,
    make_row,
    solution,
)
from segrl.tasks.base import Task


@pytest.fixture(scope="module")
def task():
    return make_arithmetic_task(n_train=2000, n_test=200, seed=0)


def test_task_shape(task):
    assert isinstance(task, Task)
    assert task.name == "arithmetic"
    assert len(task.train) == 2000 and len(task.test) == 200
    assert task.stop_strings == STOP_STRINGS == (".",)
    assert task.correctness is arithmetic_correctness
    for row in list(task.train[:50]) + list(task.test[:50]):
        assert set(row) == {"prompt", "answer", "id", "difficulty"}
        assert row["prompt"].startswith("Q: ") and row["prompt"].endswith(" =\nA:")
        assert row["difficulty"] in (2, 3)
        # The gold answer is what Python computes (multiplication only ever comes first).
        expr = row["prompt"][3:-5]
        assert str(eval(expr)) == row["answer"]
        assert int(row["answer"]) >= 0


def test_solution_hand_checked():
    row = make_row("17+25-8", "test", 0)
    assert row["prompt"] == "Q: 17+25-8 =\nA:"
    assert row["answer"] == "34"
    assert row["difficulty"] == 2
    assert solution(row) == " 17+25=42\n42-8=34\nanswer: 34."

    row = make_row("3*9-8+40", "test", 1)
    assert row["answer"] == "59" and row["difficulty"] == 3
    assert solution(row) == " 3*9=27\n27-8=19\n19+40=59\nanswer: 59."


def test_solutions_grade_correct_and_are_short(task):
    rows = list(task.train[:500]) + list(task.test)
    sols = [solution(r) for r in rows]
    assert arithmetic_correctness([r["prompt"] for r in rows], sols, [r["answer"] for r in rows]) == [1.0] * len(rows)
    # Character-level tokens + EOS stay within ~48.
    assert max(len(s) for s in sols) + 1 <= 48
    # The only '.' is the final one, so the stop string ends generation right after the answer.
    for s in sols:
        assert s.count(".") == 1 and s.endswith(".")


def test_extract_answer():
    assert extract_answer(" 17+25=42\n42-8=34\nanswer: 34.") == "34"
    assert extract_answer(" 17+25=42\n42-8=34\nanswer: 34") == "34"  # stop string cut away
    assert extract_answer(" 17+25=42\n42-8=34\nanswer: 34.\n") == "34"
    assert extract_answer("answer: 034.") == "34"
    assert extract_answer("answer: -3.") == "-3"
    assert extract_answer("answer: 34.\nanswer: 35.") == "34"  # the first answer line counts
    # Malformed
    assert extract_answer(" 17+25=42\n42-8=34") is None
    assert extract_answer(" 17+25=42\n42-8=34\nanswer:") is None
    assert extract_answer("answer: 34 or 35.") is None
    assert extract_answer("answer: x.") is None
    assert extract_answer("answer: 3.4") is None
    assert extract_answer("") is None
    assert extract_answer("the answer: 34.") is None


def test_correctness_right_wrong_malformed():
    prompts = ["Q: 17+25-8 =\nA:"] * 5
    completions = [
        " 17+25=42\n42-8=34\nanswer: 34.",  # right
        " 17+25=42\n42-8=35\nanswer: 35.",  # wrong
        " 17+25=42\n42-8=34\nanswer: 3",  # wrong (truncated)
        " 17+25=42\n42-8=34",  # malformed
        " 17+25=42\n42-8=34\nanswer: 34",  # right, stop string removed
    ]
    assert arithmetic_correctness(prompts, completions, answer=["34"] * 5, id=["x"] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]
    # Conversational completions: the last message's content is graded.
    assert arithmetic_correctness(prompts[:1], [[{"role": "assistant", "content": "answer: 34."}]], answer=["34"]) == [1.0]


def test_train_test_disjoint(task):
    train = {r["prompt"] for r in task.train}
    test = {r["prompt"] for r in task.test}
    assert len(train) == len(task.train) and len(test) == len(task.test)
    assert not train & test
    assert len({r["id"] for r in task.train} | {r["id"] for r in task.test}) == 2200


def test_reproducible_from_seed(task):
    again = make_arithmetic_task(n_train=2000, n_test=200, seed=0)
    assert list(again.train) == list(task.train) and list(again.test) == list(task.test)
    other = make_arithmetic_task(n_train=2000, n_test=200, seed=1)
    assert [r["prompt"] for r in other.test] != [r["prompt"] for r in task.test]
    # The test split does not depend on the train size.
    small = make_arithmetic_task(n_train=10, n_test=200, seed=0)
    assert list(small.test) == list(task.test)


def test_difficulty_knob_changes_shape():
    hard = make_arithmetic_task(n_train=300, n_test=50, seed=0, difficulty=Difficulty(min_steps=4, max_steps=4))
    for r in list(hard.train) + list(hard.test):
        assert r["difficulty"] == 4
        assert len(solution(r).split("\n")) == 5  # 4 steps + the answer line
    easy = make_arithmetic_task(n_train=50, n_test=10, seed=0, difficulty=dict(min_steps=1, max_steps=1, max_operand=9, p_mul=0.0))
    for r in list(easy.train) + list(easy.test):
        expr = r["prompt"][3:-5]
        assert len(expr) == 3 and expr[1] in "+-"
    assert make_arithmetic_task(n_train=5, n_test=5, difficulty=2).train[0]["difficulty"] == 2
    with pytest.raises(ValueError):
        Difficulty(min_steps=3, max_steps=2)
    with pytest.raises(ValueError):  # too few distinct problems for the request
        make_arithmetic_task(n_train=1000, n_test=10, difficulty=dict(min_steps=1, max_steps=1, max_operand=3, p_mul=0.0))
