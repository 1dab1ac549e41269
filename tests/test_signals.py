"""Ctrl-C (SIGINT) and SIGTERM: the training process finishes its step, saves a checkpoint and
exits with status 0; the checkpoint verifies and holds the step it stopped at."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from reliability_helpers import REPO, env, step_lines, tiny_model_dir, train_args
from segrl.trainer import checkpoint as ckpt


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_checkpoint_and_exits_cleanly(tmp_path, sig):
    model = tiny_model_dir(tmp_path)
    run = tmp_path / "run"
    # Long enough that it is still training when the signal comes; checkpoints only at the end.
    args = train_args(model, run, "--log.save_steps", "0", steps=100000)
    out = open(tmp_path / "out.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "segrl.cli", *args], env=env(), cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while len(step_lines(run)) < 2:
            assert proc.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    log = (tmp_path / "out.txt").read_text()
    assert rc == 0, log[-3000:]
    assert f"signal {int(sig)}" in log and "checkpoint saved" in log
    last = ckpt.latest_valid_checkpoint(run / "checkpoints", log=lambda m: None)
    assert last is not None
    ckpt.verify_checkpoint(last)
    state = json.loads((last / "trainer_state.json").read_text())
    steps = [m["step"] for m in step_lines(run)]
    assert state["step"] == steps[-1] >= 2  # the step in progress was finished and saved
    assert not (run / "final_model").exists()  # an interrupted run is not a finished one
