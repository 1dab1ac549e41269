"""Embedded GSM8K / MATH-500 loaders, the generic row loader and the reasoning-gym adapter."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from segrl.tasks.base import Task
from segrl.tasks.math_datasets import (
    GSM8K_TEMPLATE,
    DatasetError,
    embedded_data_path,
    file_task,
    gsm8k_task,
    load_rows,
    math500_task,
    split_rows,
)


def test_embedded_files_are_the_upstream_files():
    sha = {
        "gsm8k": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
        "math500": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    }
    for name, digest in sha.items():
        assert hashlib.sha256(embedded_data_path(name).read_bytes()).hexdigest() == digest
    assert (embedded_data_path("gsm8k").parent / "LICENSE-DATA.md").is_file()


def test_gsm8k_embedded_counts_and_gold():
    t = gsm8k_task(test_fraction=0.0)
    assert isinstance(t, Task) and t.name == "gsm8k"
    assert len(t.train) == 1319 and t.test == []
    rows = t.train
    # first rows of the upstream file, checked by hand
    assert rows[0]["answer"] == "18"  # Janet's ducks
    assert rows[0]["question"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert rows[0]["prompt"] == GSM8K_TEMPLATE.replace("{question}", rows[0]["question"])
    assert rows[0]["prompt"].endswith("\nAnswer: Let's think step by step.")
    assert rows[0]["solution"].endswith("#### 18")
    assert [r["answer"] for r in rows[:5]] == ["18", "3", "70000", "540", "20"]
    assert rows[0]["id"] == "gsm8k-test-1" and rows[-1]["id"] == "gsm8k-test-1319"
    assert len({r["id"] for r in rows}) == 1319
    # every gold is an integer once commas are removed
    assert all(r["answer"].lstrip("-").isdigit() for r in rows)
    assert t.stop_strings == ("\nQuestion:",)


def test_math500_embedded_counts_and_gold():
    t = math500_task(test_fraction=0.0)
    assert len(t.train) == 500 and t.name == "math500"
    by_id = {r["id"]: r for r in t.train}
    assert len(by_id) == 500
    r = by_id["test/precalculus/807.json"]
    assert r["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert r["subject"] == "Precalculus" and r["level"] == 2
    assert "\\boxed{}" in r["prompt"] and r["prompt"].startswith("Problem: Convert the point")
    assert t.train[1]["answer"] == "p - q"
    subjects = {}
    for row in t.train:
        subjects[row["subject"]] = subjects.get(row["subject"], 0) + 1
    assert subjects["Algebra"] == 124 and subjects["Counting & Probability"] == 38


def test_default_split_is_deterministic_and_disjoint():
    a, b = gsm8k_task(), gsm8k_task()
    assert (len(a.train), len(a.test)) == (1055, 264)
    assert [r["id"] for r in a.test] == [r["id"] for r in b.test]
    assert not {r["id"] for r in a.train} & {r["id"] for r in a.test}
    m = math500_task(test_fraction=0.2, split_seed=1)
    assert (len(m.train), len(m.test)) == (400, 100)
    m0 = math500_task(test_fraction=0.2, split_seed=0)
    assert {r["id"] for r in m.test} != {r["id"] for r in m0.test}
    small = gsm8k_task(limit_train=8, limit_test=4)
    assert len(small.train) == 8 and len(small.test) == 4
    # split does not depend on row order
    rows = [{"id": i} for i in range(50)]
    t1 = split_rows(rows, 0.3)[1]
    t2 = split_rows(list(reversed(rows)), 0.3)[1]
    assert sorted(r["id"] for r in t1) == sorted(r["id"] for r in t2)


def test_custom_template():
    t = gsm8k_task(template="Q: {question}\nPut the answer in \\boxed{}.\nA:", limit_train=1)
    assert t.train[0]["prompt"].startswith("Q: ") and "\\boxed{}" in t.train[0]["prompt"]
    with pytest.raises(ValueError):
        gsm8k_task(template="no placeholder")


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_load_rows_jsonl_and_parquet(tmp_path):
    rows = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": 4, "extra": "x"}]
    p = tmp_path / "d.jsonl"
    _write_jsonl(p, rows)
    got, skipped = load_rows(p)
    assert skipped == 0
    assert [r["answer"] for r in got] == ["2", "4"]
    assert got[1]["extra"] == "x" and got[0]["id"] == 1
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"q": "a?", "a": "1"}, {"q": "b?", "a": "2"}]), tmp_path / "d.parquet")
    got = load_rows(tmp_path / "d.parquet", prompt_column="q", answer_column="a", prompt_template="Q: {question}").rows
    assert [r["prompt"] for r in got] == ["Q: a?", "Q: b?"]
    # .json array, and a HF datasets.Dataset
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert len(load_rows(tmp_path / "d.json").rows) == 2
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "x", "answer": "1"}, {"prompt": "y", "answer": "2"}])
    assert len(load_rows(ds).rows) == 2
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    assert len(load_rows(dd, split="test").rows) == 1
    with pytest.raises(DatasetError, match="pass split"):
        load_rows(dd)
    # conversational prompts are accepted
    chat = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "1"}]
    assert load_rows(chat).rows[0]["prompt"][0]["content"] == "hi"


def test_gsm8k_task_from_user_files(tmp_path):
    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.parquet"
    _write_jsonl(train, [{"question": "q1", "answer": "work\n#### 1,000"}, {"question": "q2", "answer": "7"}])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "q3", "answer": "x #### 3"}]), test)
    t = gsm8k_task(train, test_path=test)
    assert [r["answer"] for r in t.train] == ["1000", "7"]
    assert [r["answer"] for r in t.test] == ["3"]
    assert t.train[0]["solution"] == "work\n#### 1,000"


def test_file_task_from_config(tmp_path):
    from types import SimpleNamespace

    src = tmp_path / "mine.jsonl"
    _write_jsonl(src, [{"q": f"What is {i}+{i}?", "a": 2 * i} for i in range(20)] + [{"q": "", "a": 1}])
    cfg = SimpleNamespace(train_file=str(src), test_file=None, prompt_column="q", answer_column="a", skip_bad_rows=True)
    t = file_task(cfg)
    assert (len(t.train), len(t.test)) == (16, 4)
    assert t.train[0]["prompt"] == "What is 0+0?" and t.train[0]["answer"] == "0"
    assert t.correctness(None, ["so answer: 0.", "\\boxed{7}"], ["0", "0"]) == [1.0, 0.0]
    cfg.skip_bad_rows = False
    with pytest.raises(DatasetError, match=r"mine\.jsonl: row 21: empty 'q'"):
        file_task(cfg)
    t2 = file_task(train_file=src, test_file=src, prompt_column="q", answer_column="a", skip_bad_rows=True)
    assert len(t2.train) == len(t2.test) == 20


def test_malformed_rows_name_file_and_row(tmp_path):
    p = tmp_path / "bad.jsonl"
    _write_jsonl(
        p,
        [
            {"prompt": "ok", "answer": "1"},
            {"prompt": "no answer"},
            "{not json",
            {"prompt": "", "answer": "1"},
            {"prompt": 5, "answer": "1"},
            [1, 2],
            {"prompt": "ok2", "answer": None},
            {"prompt": "ok3", "answer": {"x": 1}},
            {"prompt": "ok4", "answer": "4"},
        ],
    )
    with pytest.raises(DatasetError) as ei:
        load_rows(p)
    msg = str(ei.value)
    assert str(p) in msg and "row 2" in msg and "missing 'answer'" in msg
    got, skipped = load_rows(p, skip_bad_rows=True)
    assert skipped == 7
    assert [r["prompt"] for r in got] == ["ok", "ok4"]
    assert [r["id"] for r in got] == [1, 9]  # 1-based line numbers
    # each problem is reported with its own row number
    for n, expected in [(3, "invalid JSON"), (4, "empty 'prompt'"), (5, "'prompt' has type int"), (6, "got list")]:
        q = tmp_path / f"one{n}.jsonl"
        lines = p.read_text().splitlines()
        _write_jsonl(q, [lines[0]] * (n - 1) + [lines[n - 1]])
        with pytest.raises(DatasetError, match=rf"one{n}\.jsonl: row {n}: .*{expected}"):
            load_rows(q)
    # parquet row numbers too
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": ""}]), tmp_path / "b.parquet")
    with pytest.raises(DatasetError, match=r"b\.parquet: row 2: empty 'answer'"):
        load_rows(tmp_path / "b.parquet")
    with pytest.raises(FileNotFoundError):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_rows(tmp_path / "x.csv")
    # the task loaders skip and count too
    _write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "", "answer": "2"}])
    with pytest.raises(DatasetError, match="row 2"):
        gsm8k_task(tmp_path / "g.jsonl")
    assert len(gsm8k_task(tmp_path / "g.jsonl", skip_bad_rows=True, test_fraction=0).train) == 1


def test_import_does_not_touch_shared_or_optional_packages():
    code = (
        "import sys, builtins\n"
        "real_open = builtins.open\n"
        "def guard(f, *a, **k):\n"
        "    assert '/work/shared' not in str(f), f\n"
        "    return real_open(f, *a, **k)\n"
        "builtins.open = guard\n"
        "import segrl.tasks.math_datasets as m, segrl.tasks.reasoning_gym, segrl.rewards.combine\n"
        "assert 'reasoning_gym' not in sys.modules and 'datasets' not in sys.modules\n"
        "assert len(m.gsm8k_task(test_fraction=0).train) == 1319\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_reasoning_gym_adapter():
    pytest.importorskip("reasoning_gym", reason="optional extra reasoning-gym is not installed")
    from segrl.tasks.reasoning_gym import extract_tagged_answer, reasoning_gym_task

    t = reasoning_gym_task("basic_arithmetic", size=20, seed=3)
    assert len(t.train) == 16 and len(t.test) == 4
    row = t.test[0]
    assert row["question"] in row["prompt"] and "<answer>" in row["prompt"]
    comps = [f"Thinking...\n<answer>{r['answer']}</answer>" for r in t.test]
    comps += ["<answer>123456789</answer>", f"<answer> {row['answer']}"]  # wrong; unclosed (stop string cut)
    answers = [r["answer"] for r in t.test] + [row["answer"]] * 2
    idx = [r["rg_index"] for r in t.test] + [row["rg_index"]] * 2
    assert t.correctness(None, comps, answers, rg_index=idx) == [1.0] * 4 + [0.0, 1.0]
    # works without rg_index, and after pickling (worker processes)
    import pickle

    scorer = pickle.loads(pickle.dumps(t.correctness))
    assert scorer(None, comps, answers) == [1.0] * 4 + [0.0, 1.0]
    assert extract_tagged_answer("no tags") is None


def test_reasoning_gym_unknown_data_set_names_the_closest():
    from types import SimpleNamespace

    from segrl.tasks.reasoning_gym import _check_name

    rg = SimpleNamespace(factory=SimpleNamespace(DATASETS={"basic_arithmetic": None, "chain_sum": None}))
    _check_name(rg, "chain_sum")
    with pytest.raises(LookupError, match=r"no data set 'basic_arithmatic' \(did you mean basic_arithmetic\?\)"):
        _check_name(rg, "basic_arithmatic")
    with pytest.raises(LookupError, match=r"no data set 'nosuch' \(it has 2, e.g. basic_arithmetic, chain_sum\)"):
        _check_name(rg, "nosuch")
