"""A run directory has one writer: a second ``segrl train`` on it (or a ``--resume`` of a run
still training) is refused at once naming the holder's PID, and a killed run's lock is taken
over. Unusable output directories get one line; a failed start leaves nothing behind; files
get the user's umask; a finished run says where its results are.

Real processes throughout (flock is per process); runs use the tiny model of
``reliability_helpers`` (about 0.05 s per step).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from reliability_helpers import REPO, env, read_metrics, reward_file, run_cli, step_lines, tiny_model_dir, train_args

from segrl.trainer.run_dir import LOCK


def _start(args, out_path):
    out = open(out_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "segrl.cli", *args], env=env(), cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT)
    return proc, out


def _wait_for_steps(proc, run, n, log_path, timeout=90):
    deadline = time.monotonic() + timeout
    while len(step_lines(run)) < n:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


def _stop(proc, out, sig=signal.SIGTERM):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out.close()


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode in (1, 2), (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("segrl: "), r.stderr
    return lines[0]


def test_second_writer_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    model = tiny_model_dir(tmp_path)
    run = tmp_path / "run"
    first, out = _start(train_args(model, run, "--log.save_steps", "2", steps=100000), tmp_path / "first.txt")
    try:
        _wait_for_steps(first, run, 3, tmp_path / "first.txt")
        assert (run / LOCK).read_text().strip() == str(first.pid)
        # a second `segrl train` on the same directory, and a resume of the running run
        t0 = time.monotonic()
        second = run_cli(train_args(model, run, steps=3))
        resume = run_cli(["train", "--threads", "1", "--resume", str(run)])
        for r in (second, resume):
            line = _one_line_error(r)
            assert f"PID {first.pid}" in line and "in use" in line, line
        assert time.monotonic() - t0 < 60  # refused before any model is loaded
        assert first.poll() is None  # the first run goes on
        _wait_for_steps(first, run, len(step_lines(run)) + 2, tmp_path / "first.txt")
        # SIGKILL: the kernel drops the lock; a resume takes it over and says so
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        _stop(first, out)
    steps = [m["step"] for m in step_lines(run)]
    assert steps == list(range(1, len(steps) + 1))  # never a step twice
    r = run_cli(["train", "--threads", "1", "--resume", str(run), "--train.max_steps", str(len(steps) + 1)])
    assert r.returncode == 0, r.stderr[-3000:]
    flat = "".join(r.stdout.split())  # (rich wraps long lines when not on a terminal)
    assert "".join(f"took over the lock of {run} from PID {first.pid} (no longer running)".split()) in flat
    steps = [m["step"] for m in step_lines(run)]
    assert steps == list(range(1, len(steps) + 1))
    assert (run / LOCK).read_text().strip() != str(first.pid)


def test_two_starts_at_once_give_one_run(tmp_path):
    """Two `segrl train` started together on one directory: one trains, the other is
    refused; metrics.jsonl has each step once."""
    model = tiny_model_dir(tmp_path)
    run = tmp_path / "run"
    procs = [_start(train_args(model, run, steps=4), tmp_path / f"p{i}.txt") for i in range(2)]
    codes = []
    for p, out in procs:
        codes.append(p.wait(timeout=180))
        out.close()
    logs = [(tmp_path / f"p{i}.txt").read_text() for i in range(2)]
    assert sorted(codes) == [0, 1], logs
    refused = logs[codes.index(1)]
    assert "in use by another segrl process (PID" in refused and "Traceback" not in refused
    assert [m["step"] for m in step_lines(run)] == [1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["a file", "under a file", "read-only parent"])
def test_unusable_output_dir_is_one_line(tmp_path, kind):
    model = tiny_model_dir(tmp_path)
    if kind == "a file":
        target = tmp_path / "hostname"
        target.write_text("not a directory\n")
        expect = "is a file, not a directory"
    elif kind == "under a file":
        (tmp_path / "f").write_text("x")
        target = tmp_path / "f" / "run"
        expect = "is a file, not a directory"
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        target = ro / "run"
        expect = "cannot create run directory"
    r = run_cli(train_args(model, target, steps=1))
    assert expect in _one_line_error(r)
    if kind == "a file":
        assert target.read_text() == "not a directory\n"


def test_output_dir_etc_hostname(tmp_path):
    """The auditors' input: a system file given as the run directory."""
    if not os.path.isfile("/etc/hostname"):
        pytest.skip("no /etc/hostname here")
    before = open("/etc/hostname").read()
    r = run_cli(["train", "--log.output_dir", "/etc/hostname", "--train.max_steps", "1"])
    assert "/etc/hostname is a file, not a directory" in _one_line_error(r)
    assert open("/etc/hostname").read() == before


def test_failed_start_leaves_no_run_directory(tmp_path):
    model = tiny_model_dir(tmp_path)
    run = tmp_path / "new" / "run"
    # a reward function that cannot be loaded fails after the directory was created
    r = run_cli(train_args(model, run, steps=1, reward=f"{tmp_path}/nosuch.py:f"))
    assert "cannot load" in _one_line_error(r)
    assert not (tmp_path / "new").exists()
    # too-long prompts: the same
    r = run_cli(train_args(model, run, "--data.max_prompt_length", "2", steps=1))
    assert "longer than data.max_prompt_length" in _one_line_error(r)
    assert not (tmp_path / "new").exists()
    # a model that cannot be loaded: the same
    r = run_cli(train_args(tmp_path / "no-model", run, steps=1))
    assert r.returncode != 0 and not (tmp_path / "new").exists()
    # an existing (empty) directory stays
    run.mkdir(parents=True)
    r = run_cli(train_args(model, run, "--data.max_prompt_length", "2", steps=1))
    assert r.returncode == 1 and run.is_dir() and not any(run.iterdir())


def test_fresh_start_into_an_existing_run_is_refused(tmp_path):
    model = tiny_model_dir(tmp_path)
    run = tmp_path / "run"
    assert run_cli(train_args(model, run, steps=2)).returncode == 0
    before = (run / "metrics.jsonl").read_bytes()
    line = _one_line_error(run_cli(train_args(model, run, steps=2)))
    assert "already holds a run" in line and f"--resume {run}" in line
    assert (run / "metrics.jsonl").read_bytes() == before


def test_umask_and_where_the_results_are(tmp_path):
    model = tiny_model_dir(tmp_path)
    run = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-c", "import os, sys; os.umask(0o027); from segrl.cli import main; sys.exit(main(sys.argv[1:]))",
         *train_args(model, run, "--log.report_to", "tensorboard", steps=2, reward=f"{reward_file(tmp_path)}:length_reward")],
        env=env(), cwd=str(REPO), capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    modes = {p.relative_to(run).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o640"}, modes  # 0666 & ~027 everywhere, weights included
    out = r.stdout
    tail = out[out.index("run directory:"):]
    for name in ("report.html", "final_model", "metrics.jsonl"):
        assert str(run / name) in tail, tail
    assert len(read_metrics(run)) >= 2


def test_library_summary_carries_the_run_directory(tmp_path, capsys):
    from segrl.configs import load_config
    from segrl.trainer.trainer import Trainer

    def reward(completions, **kw):
        return [len(c) / 16.0 for c in completions]

    reward.segrl_inline = True
    model = tiny_model_dir(tmp_path)
    cfg = load_config(None, {
        "model.name_or_path": str(model), "train.max_steps": 1, "train.prompts_per_step": 2, "train.num_generations": 2,
        "sampling.max_completion_length": 8, "eval.eval_before": False, "eval.eval_after": False,
        "log.report_to": "none", "log.progress": False, "log.output_dir": str(tmp_path / "lib"),
    })
    summary = Trainer(cfg, reward_funcs=[reward]).train()
    assert summary["run_dir"] == str(tmp_path / "lib")
    assert f"run directory: {tmp_path / 'lib'}" in capsys.readouterr().out
    assert "run_dir" not in (tmp_path / "lib" / "summary.json").read_text()  # the file stays portable
