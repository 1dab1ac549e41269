"""``segrl train --resume`` never resumes wrongly and never writes before its checks pass.

* what is not a run (a missing directory, a typo, an empty or unrelated directory, /tmp) is
  refused with one line, and nothing in it is touched;
* the run's settings come from its checkpoint (also when config.yaml was deleted), and only
  the fields listed in ``checkpointing.RESUMABLE`` may be changed; anything else is refused
  before a byte is written;
* a deleted or shortened metrics.jsonl is refused (never resumed with rows missing);
* a checkpoint that matches its manifest but cannot be read (the manifest recomputed after
  tampering) is skipped with one line and the previous one is used: the resumed run equals
  the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import yaml
from reliability_helpers import assert_metrics_equal, read_metrics, reward_file, run_cli, step_lines, tiny_model_dir, train_args

STEPS = 3


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished 3-step RLOO run with a checkpoint after every step (all three kept)."""
    root = tmp_path_factory.mktemp("resume-checks")
    model = tiny_model_dir(root)
    run = root / "base"
    args = train_args(model, run, "--algo", "rloo", "--log.save_total_limit", "5", steps=STEPS, reward=f"{reward_file(root)}:length_reward")
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def _flat(text: str) -> str:
    """Console text without whitespace (rich wraps long lines when not on a terminal)."""
    return "".join(text.split())


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


def _refused(args: list[str]) -> str:
    r = run_cli(args, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("segrl: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("kind", ["missing", "typo", "empty", "unrelated", "tmp"])
def test_resume_refuses_what_is_not_a_run(run, tmp_path, kind):
    target = {
        "missing": tmp_path / "nosuch",
        "typo": Path(str(run) + "-"),
        "empty": tmp_path / "empty",
        "unrelated": tmp_path / "project",
        "tmp": Path("/tmp"),
    }[kind]
    if kind == "empty":
        target.mkdir()
    if kind == "unrelated":
        target.mkdir()
        (target / "metrics.jsonl").write_text('{"precious": 1}\n')
        (target / "notes.txt").write_text("keep me\n")
    before = _snapshot(target) if kind in ("empty", "unrelated") else None
    line = _refused(["train", "--threads", "1", "--resume", str(target)])
    expect = "no such directory" if kind in ("missing", "typo") else "not a segrl run directory"
    assert expect in line and str(target) in line, line
    if before is not None:
        assert _snapshot(target) == before
    assert not target.exists() or kind != "missing"


@pytest.mark.parametrize(
    "option, value, field",
    [
        ("--algo", "spo_tree", "train.algo"),
        ("--lora.r", "4", "lora.r"),
        ("--train.seed", "5", "train.seed"),
        ("--data.num_train", "10", "data.num_train"),
        ("--train.num_generations", "2", "train.num_generations"),
        ("--model.name_or_path", "/elsewhere", "model.name_or_path"),
    ],
)
def test_incompatible_overrides_are_refused_before_anything_is_written(run, option, value, field):
    before = _snapshot(run)
    line = _refused(["train", "--threads", "1", "--resume", str(run), option, value])
    assert f"cannot change {field}" in line and "when resuming" in line, line
    assert _snapshot(run) == before  # config.yaml included: nothing rewritten


def test_settings_come_from_the_checkpoint_and_max_steps_may_grow(run):
    (run / "config.yaml").unlink()
    before = step_lines(run)
    r = run_cli(["train", "--threads", "1", "--resume", str(run), "--train.max_steps", "4", "--log.save_steps", "2"], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _flat(f"resumed from {run / 'checkpoints' / 'step-000003'}") in _flat(r.stdout)
    lines = step_lines(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert_metrics_equal(before, lines[:3])
    # the run's own settings (2 prompts x 4 completions, RLOO), not the defaults (16 x 8, GRPO)
    assert lines[3]["train/samples"] == 8.0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["algo"] == "rloo" and cfg["train"]["max_steps"] == 4 and cfg["log"]["save_steps"] == 2


@pytest.mark.parametrize("damage", ["deleted", "cut"])
def test_metrics_that_lost_rows_are_refused(run, damage):
    m = run / "metrics.jsonl"
    if damage == "deleted":
        m.unlink()
    else:
        m.write_bytes(m.read_bytes()[: m.stat().st_size // 2])
    before = _snapshot(run)
    line = _refused(["train", "--threads", "1", "--resume", str(run), "--train.max_steps", "4"])
    assert "metrics.jsonl" in line and ("is missing" if damage == "deleted" else "bytes but checkpoint step 3 recorded") in line, line
    assert _snapshot(run) == before


# ---- checkpoints that match their manifest but cannot be read --------------------------------


class _Payload:
    marker = "/nonexistent"

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tamper(ck: Path, kind: str, tmp_path: Path) -> None:
    st = ck / "trainer_state.json"
    if kind == "state-missing-keys":
        data = json.loads(st.read_text())
        del data["rng"], data["cursor"]
        st.write_text(json.dumps(data))
    elif kind == "state-not-json":
        st.write_text('{"step": 3, "rng": ')
    elif kind == "optimizer-garbage":
        (ck / "optimizer.pt").write_bytes(os.urandom(4096))
    elif kind == "weights-truncated":
        f = ck / "model" / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif kind == "optimizer-pickle":
        _Payload.marker = str(tmp_path / "pwned")
        with open(ck / "optimizer.pt", "wb") as f:
            pickle.dump({"state": {}, "param_groups": [_Payload()]}, f, protocol=2)
    # the attacker recomputes the manifest, so the checksums match
    mf = json.loads((ck / "manifest.json").read_text())
    for rel in mf["files"]:
        data = (ck / rel).read_bytes()
        mf["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (ck / "manifest.json").write_text(json.dumps(mf))


@pytest.mark.parametrize("kind", ["state-missing-keys", "state-not-json", "optimizer-garbage", "weights-truncated", "optimizer-pickle"])
def test_unreadable_checkpoint_falls_back_to_the_previous_one(base_run, run, tmp_path, kind):
    _tamper(run / "checkpoints" / "step-000003", kind, tmp_path)
    (run / "final_model").rename(tmp_path / "final_model")  # as if killed before the final model
    r = run_cli(["train", "--threads", "1", "--resume", str(run)], timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert out.count("skipping corrupt checkpoint") == 1, out
    assert _flat(f"skipping corrupt checkpoint: {run / 'checkpoints' / 'step-000003'}") in _flat(out), out
    assert "weights_only=False" not in out
    assert _flat(f"resumed from {run / 'checkpoints' / 'step-000002'}") in _flat(out)
    assert not (tmp_path / "pwned").exists()
    assert_metrics_equal(read_metrics(base_run), read_metrics(run))  # step 3 redone exactly
    assert (run / "checkpoints" / "corrupt-step-000003").is_dir()


def test_lora_run_resumes_exactly(tmp_path):
    """A LoRA run's checkpoints hold the adapters only (PEFT's names, without the adapter
    name): a resume loads them back into the adapters and ends equal to the uninterrupted run."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from reliability_helpers import load_weights
    from tiny_hf import save_tiny_hf

    from segrl.configs import load_config
    from segrl.trainer.trainer import Trainer

    model = save_tiny_hf(tmp_path / "m")

    def cfg(out, steps):
        return load_config(None, {
            "model.name_or_path": str(model), "lora.r": "2", "train.max_steps": str(steps), "train.prompts_per_step": "2",
            "train.num_generations": "2", "data.num_train": "20", "sampling.max_completion_length": "6", "log.save_steps": "1",
            "log.output_dir": str(out), "log.progress": "false", "log.report_to": "none",
            "eval.eval_before": "false", "eval.eval_after": "false",
        })

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(cfg(tmp_path / "ref", 3)).train()
        Trainer(cfg(tmp_path / "run", 2)).train()
        Trainer(cfg(tmp_path / "run", 3)).train(resume=True)
    finally:
        torch.set_num_threads(n)
    assert_metrics_equal(read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "run"))
    a, b = load_weights(tmp_path / "ref" / "final_model"), load_weights(tmp_path / "run" / "final_model")
    assert a and a.keys() == b.keys() and all("lora_" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_killed_while_starting_can_be_resumed(tmp_path):
    """SIGKILL right after the run directory was made (before any model loaded): the
    directory is a run (its config.yaml is written first), and --resume starts it over."""
    model = tiny_model_dir(tmp_path)
    run = tmp_path / "run"
    r = run_cli(train_args(model, run, steps=2), SEGRL_TEST_KILL_AT="started")
    assert r.returncode == -9 and (run / "config.yaml").is_file()
    r = run_cli(["train", "--threads", "1", "--resume", str(run)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no intact checkpoint found; starting from scratch" in r.stdout
    assert [m["step"] for m in step_lines(run)] == [1, 2]
