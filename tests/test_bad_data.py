"""Bad data and bad configs stop a run before training with a message naming the file and row
(or the config field); with ``--skip-bad-rows`` bad rows are skipped and counted instead.

The CLI is called in-process (``segrl.cli.main``): the same code path as ``segrl train``,
without an interpreter start per case.
"""

from __future__ import annotations

import json
import logging

import pytest
from reliability_helpers import (
    one_torch_thread,  # noqa: F401  (autouse fixture)
    step_lines,
    tiny_model_dir,
    train_args,
)

from segrl.cli import main
from segrl.configs import ConfigError, load_config
from segrl.tasks.math_datasets import DatasetError, load_rows

GOOD = [{"prompt": f"Q: {a}+{b} =\nA:", "answer": str(a + b)} for a in range(1, 6) for b in range(1, 4)]


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


BAD_ROWS = [
    ({"answer": "3"}, "missing 'prompt'"),
    ({"prompt": "Q: 1+2 =\nA:"}, "missing 'answer'"),
    ({"prompt": "   ", "answer": "3"}, "empty 'prompt'"),
    ({"prompt": "Q: 1+2 =\nA:", "answer": ""}, "empty 'answer'"),
    ({"prompt": 12, "answer": "3"}, "'prompt' has type int"),
    ({"prompt": "Q: 1+2 =\nA:", "answer": [3]}, "'answer' has type list"),
    ({"prompt": "Q: 1+2 =\nA:", "answer": True}, "'answer' has type bool"),
    ('{"prompt": "Q: 1+2 =", "answer": ', "invalid JSON"),
    ("[1, 2]", "got list"),
]


@pytest.mark.parametrize("bad, message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_load_rows_names_file_and_row(tmp_path, bad, message):
    f = _jsonl(tmp_path / "data.jsonl", GOOD[:3] + [bad] + GOOD[3:5])
    with pytest.raises(DatasetError) as e:
        load_rows(f)
    assert str(e.value).startswith(f"{f}: row 4: ") and message in str(e.value)
    got = load_rows(f, skip_bad_rows=True)
    assert got.skipped == 1 and len(got.rows) == 5


def _run(tmp_path, *extra, steps=2):
    model = tiny_model_dir(tmp_path)
    return main(train_args(model, tmp_path / "run", "--data.task", "file", *extra, steps=steps))


def test_bad_row_stops_before_training(tmp_path, capsys):
    f = _jsonl(tmp_path / "train.jsonl", GOOD[:6] + [{"prompt": "Q: 1+1 =\nA:", "answer": None}] + GOOD[6:])
    assert _run(tmp_path, "--data.train_file", str(f)) == 1
    err = capsys.readouterr().err
    assert f"DatasetError: {f}: row 7: missing 'answer'" in err
    assert not step_lines(tmp_path / "run")  # not a single training step


def test_missing_train_file_is_a_clean_error(tmp_path, capsys):
    assert _run(tmp_path, "--data.train_file", str(tmp_path / "nope.jsonl")) == 1
    assert "nope.jsonl" in capsys.readouterr().err


def test_too_long_prompt_names_file_and_row(tmp_path, capsys):
    long = {"prompt": "Q: " + "1+" * 40 + "1 =\nA:", "answer": "41"}
    # (the deterministic train/test split may put one copy in the test part, so put two)
    f = _jsonl(tmp_path / "train.jsonl", GOOD[:4] + [long, long] + GOOD[4:])
    assert _run(tmp_path, "--data.train_file", str(f), "--data.max_prompt_length", "40") == 1
    err = capsys.readouterr().err
    assert "longer than data.max_prompt_length=40" in err
    assert f"{f}: row 5" in err or f"{f}: row 6" in err
    assert "--skip-bad-rows" in err


def test_skip_bad_rows_skips_counts_and_trains(tmp_path, capsys, caplog):
    long = {"prompt": "Q: " + "1+" * 40 + "1 =\nA:", "answer": "41"}
    bad = [{"answer": "1"}, '{"oops', {"prompt": "", "answer": "2"}, {"prompt": "Q: 2+2 =\nA:", "answer": {"x": 4}}]
    f = _jsonl(tmp_path / "train.jsonl", GOOD[:5] + bad + GOOD[5:] + [long, long, long])
    with caplog.at_level(logging.WARNING):
        rc = _run(tmp_path, "--data.train_file", str(f), "--data.max_prompt_length", "40", "--skip-bad-rows")
    assert rc == 0
    assert f"skipped 4 malformed row(s) in {f}" in caplog.text
    out = capsys.readouterr().out.replace("\n", " ")
    assert "skipping" in out and "prompt(s) longer than data.max_prompt_length=40" in out
    assert "held-out prompt(s) longer than data.max_prompt_length=40" in out  # test rows too
    steps = step_lines(tmp_path / "run")
    assert [m["step"] for m in steps] == [1, 2]
    for line in (tmp_path / "run" / "rollouts.jsonl").read_text().splitlines():
        assert json.loads(line)["row"]["prompt"] != long["prompt"]  # skipped rows never trained on


@pytest.mark.parametrize(
    "override, field",
    [
        (["--train.no_such_key", "1"], "unknown config key 'train.no_such_key'"),
        (["--nosection.key", "1"], "unknown config key 'nosection'"),
        (["--train.learning_rate", "fast"], "train.learning_rate: expected a number"),
        (["--train.learning_rate", "-1"], "train.learning_rate: must be > 0"),
        (["--train.max_steps", "2.5"], "train.max_steps: expected an integer"),
        (["--train.algo", "ppo"], "train.algo: 'ppo' is not one of"),
        (["--log.progress", "maybe"], "log.progress: expected true/false"),
        (["--data.task", "nosuchtask"], "data.task: unknown task 'nosuchtask'"),
        (["--data.reward_funcs", "/nonexistent/r.py:f"], "data.reward_funcs: cannot load '/nonexistent/r.py:f'"),
        (["--data.reward_weights", "1,2,3"], "data.reward_weights: 3 weights for 1 reward functions"),
    ],
)
def test_invalid_config_stops_at_start_naming_the_field(tmp_path, override, field):
    model = tiny_model_dir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(train_args(model, tmp_path / "run", *override))
    assert "invalid config" in str(e.value) and field in str(e.value)
    assert not step_lines(tmp_path / "run")


def test_unknown_key_in_yaml_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  learning_rate: 1e-4\n  lerning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.lerning_rate'"):
        load_config(y)


def test_small_sources_keep_a_row_on_each_side_of_the_split():
    from segrl.tasks.rows import split_rows

    rows = [{"id": i} for i in range(5)]
    assert [len(p) for p in split_rows(rows[:1])] == [1, 0]  # one row: nothing to hold out
    assert [len(p) for p in split_rows(rows[:2])] == [1, 1]  # round(0.4) = 0 would hold out none
    assert [len(p) for p in split_rows(rows[:3])] == [2, 1]  # round(0.6) = 1, as before
    assert [len(p) for p in split_rows(rows[:2], test_fraction=0.9)] == [1, 1]  # one left to train on
    assert [len(p) for p in split_rows(rows[:2], test_fraction=0.0)] == [2, 0]
    assert [len(p) for p in split_rows(rows[:2], test_fraction=1.0)] == [0, 2]


def test_unreadable_lines_are_bad_rows_naming_their_line(tmp_path):
    f = tmp_path / "d.jsonl"
    good = json.dumps(GOOD[0]).encode()
    f.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + b'{"prompt": "\xff", "answer": "1"}\n' + b"[" * 50_000 + b"\n" + good + b"\n")
    with pytest.raises(DatasetError, match=r"d\.jsonl: row 2: not UTF-8 text \(byte 0xff at column 13\)"):
        load_rows(f)  # the byte-order mark on line 1 is fine
    got = load_rows(f, skip_bad_rows=True)
    assert got.skipped == 2 and [r["id"] for r in got.rows] == [1, 4]
    f.write_bytes(good + b"\n" + b"[" * 50_000 + b"\n")
    with pytest.raises(DatasetError, match=r"row 2: invalid JSON \(nested too deeply to read\)"):
        load_rows(f)


def test_a_missing_column_names_the_columns_the_row_has(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"question": "1+1", "answer": "2"}])
    with pytest.raises(DatasetError, match=r"row 1: missing 'prompt' \(the row has 'question', 'answer'; set data.prompt_column"):
        load_rows(f)
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1", "answer": None}])
    with pytest.raises(DatasetError, match=r"row 1: missing 'answer'$"):  # present but null: no column hint
        load_rows(f)
