"""Bad input to ``segrl train`` ends with ONE line on stderr that names the input, a failure status
(2 for a wrong command or config, 1 for a run that fails on its data: tests/test_cli_errors.py),
no traceback, and nothing written (every check here runs before the model is loaded).

The cases the audit listed run as real ``python -m segrl.cli train`` processes; the rest of the
same families run through ``segrl.cli.main`` in-process (the same code path, without an
interpreter start per case). ``-m slow`` runs every case as a process (the attack rerun in
docs/reliability.md).
"""

from __future__ import annotations

import pytest
from bad_inputs import CASES, LISTED, MORE, case_args, make_inputs
from reliability_helpers import (
    one_torch_thread,  # noqa: F401  (autouse fixture)
    run_cli,
    tiny_model_dir,
    train_args,
)

from segrl.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("bad-inputs"))


def _args(tmp_path, inputs, case):
    extra, named = case_args(case, inputs)
    return train_args(tiny_model_dir(tmp_path), tmp_path / "run", *extra, steps=1), named


def _check_process(p, named: str, run_dir) -> None:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode in (1, 2), (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("segrl: ") and named in lines[0], lines[0]
    assert not run_dir.exists(), "something was written before the check"


@pytest.mark.parametrize("case", list(LISTED))
def test_listed_bad_input_is_a_one_line_error(tmp_path, inputs, case):
    args, named = _args(tmp_path, inputs, case)
    _check_process(run_cli(args, timeout=120), named, tmp_path / "run")


@pytest.mark.parametrize("case", list(MORE))
def test_more_bad_input_is_a_one_line_error(tmp_path, inputs, case, capsys):
    args, named = _args(tmp_path, inputs, case)
    try:
        rc = main(args)
        message = capsys.readouterr().err.strip()
    except SystemExit as e:  # argparse-level errors exit with the message or a status
        rc = e.code if isinstance(e.code, int) else 2
        message = capsys.readouterr().err.strip() if isinstance(e.code, int) else str(e.code)
    assert rc in (1, 2)
    lines = [line for line in message.splitlines() if line.strip()]
    assert len(lines) == 1, message
    assert lines[0].startswith("segrl: ") and named in lines[0], lines[0]
    assert not (tmp_path / "run").exists(), "something was written before the check"


def test_a_two_row_file_trains(tmp_path, inputs):
    # two rows: one is held out, one is trained on (it used to hold none out, then crash)
    two = inputs / "two.jsonl"
    two.write_text("".join(line + "\n" for line in (inputs / "good.jsonl").read_text().splitlines()[:2]))
    args = train_args(tiny_model_dir(tmp_path), tmp_path / "run", "--data.task", "file", "--data.train_file", str(two), steps=1)
    assert main(args) == 0


def _classify(case: str, tmp_path, inputs) -> str:
    """One of: "ok" (a one-line error naming the input), "traceback", "hang", "other"."""
    import subprocess

    args, named = _args(tmp_path, inputs, case)
    try:
        p = run_cli(args, timeout=60)
    except subprocess.TimeoutExpired:
        return "hang"
    if "Traceback" in p.stderr:
        return "traceback"
    try:
        _check_process(p, named, tmp_path / "run")
    except AssertionError:
        return "other"
    return "ok"


@pytest.mark.slow
def test_every_bad_input_as_a_cli_process(tmp_path, inputs):
    """The attack rerun of docs/reliability.md: ``pytest tests/test_bad_input.py -m slow -s``."""
    got = {case: _classify(case, tmp_path, inputs) for case in CASES}
    counts = {k: sum(v == k for v in got.values()) for k in ("ok", "traceback", "hang", "other")}
    print(f"\n{len(CASES)} bad inputs: {counts['ok']} one-line errors naming the input, {counts['traceback']} tracebacks, "
          f"{counts['hang']} hangs (60 s), {counts['other']} other (exit 0, several lines, or not naming the input)")
    print({case: v for case, v in got.items() if v != "ok"})
    assert counts["ok"] == len(CASES)

def test_large_integers_keep_every_digit():
    from segrl.configs import ConfigError, load_config

    # read through a float, 12345678901234567891 became 12345678901234567168
    assert load_config(None, {"data.seed": "12345678901234567891"}).data.seed == 12345678901234567891
    assert load_config(None, {"train.seed": " +4294967295 "}).train.seed == 4294967295
    assert load_config(None, {"train.max_steps": "1e2"}).train.max_steps == 100
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, {"train.max_steps": "+-5"})
