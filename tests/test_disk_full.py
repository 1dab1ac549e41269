"""A full disk: one line naming the device and the file, the partial checkpoint removed, the
previous checkpoint usable; a resume before space is freed fails with one line too, and after
it is freed the run continues exactly.

Unit tests inject ENOSPC (and torch.save's short-write ``RuntimeError``); one test fills a
real 2 MiB tmpfs (needs root and ``mount``; skipped where they are not permitted).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from reliability_helpers import assert_metrics_equal, read_metrics, reward_file, run_cli, tiny_model_dir, train_args

from segrl.trainer import checkpoint as ckpt
from segrl.trainer import run_dir as run_dir_mod
from segrl.trainer.run_dir import DiskFullError


@pytest.fixture
def parts(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_model_dir(tmp_path.parent)
    model = AutoModelForCausalLM.from_pretrained(d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, AutoTokenizer.from_pretrained(d), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _save(root, step, parts):
    model, tok, opt, sched = parts
    return ckpt.save_checkpoint(root, step, model, tok, opt, sched, {"step": step}, keep=2)


def _failing_save(exc):
    real = torch.save

    def save(obj, f, *a, **kw):
        if str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 1000)  # a partial write, then the failure
            raise exc
        return real(obj, f, *a, **kw)

    return save


@pytest.mark.parametrize("kind", ["ENOSPC", "short-write"])
def test_full_disk_while_checkpointing_frees_the_partial_write(tmp_path, parts, monkeypatch, kind):
    root = tmp_path / "run" / "checkpoints"
    first = _save(root, 1, parts)
    if kind == "ENOSPC":
        exc = OSError(errno.ENOSPC, "No space left on device")
    else:  # torch.save's zip writer reports a short write like this, not as ENOSPC
        exc = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1662464 vs 1662356")
        monkeypatch.setattr(run_dir_mod, "free_bytes", lambda path: 0)
    monkeypatch.setattr(ckpt.torch, "save", _failing_save(exc))
    with pytest.raises(DiskFullError) as err:
        _save(root, 2, parts)
    msg = str(err.value)
    assert msg.startswith(f"no space left on {run_dir_mod.device_of(root)} while writing checkpoint {root / 'step-000002'} (optimizer.pt)")
    assert msg.endswith("; freed the partial checkpoint") and "\n" not in msg
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no .tmp-step-* left
    ckpt.verify_checkpoint(first)


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, parts, monkeypatch):
    root = tmp_path / "run" / "checkpoints"
    monkeypatch.setattr(ckpt.torch, "save", _failing_save(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match="Input/output error"):
        _save(root, 1, parts)
    assert not any(root.iterdir())  # the partial write is removed all the same


def length_reward(completions, **kw):
    return [len(c) / 16.0 for c in completions]


length_reward.segrl_inline = True


def test_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    from segrl.configs import load_config
    from segrl.trainer.logging import MetricsLogger
    from segrl.trainer.trainer import Trainer

    model = tiny_model_dir(tmp_path)
    cfg = load_config(None, {
        "model.name_or_path": str(model), "train.max_steps": 4, "train.prompts_per_step": 2, "train.num_generations": 2,
        "sampling.max_completion_length": 8, "eval.eval_before": False, "eval.eval_after": False, "log.save_steps": 1,
        "log.report_to": "none", "log.progress": False, "log.output_dir": str(tmp_path / "run"),
    })
    tr = Trainer(cfg, reward_funcs=[length_reward])
    real = MetricsLogger.log

    def log(self, step, metrics, echo=False):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, step, metrics, echo)

    monkeypatch.setattr(MetricsLogger, "log", log)
    with pytest.raises(DiskFullError) as err:
        tr.train()
    msg = str(err.value)
    assert msg.startswith("no space left on ") and f"while writing {tmp_path / 'run' / 'metrics.jsonl'}" in msg
    assert f"the last checkpoint is intact: free space, then continue with --resume {tmp_path / 'run'}" in msg
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000001", "step-000002"]


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _one_line(r) -> str:
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, (r.returncode, r.stderr[-3000:])
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_real_full_filesystem_then_resume(tmp_path):
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    if not _mount_tmpfs(mnt, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        model = tiny_model_dir(tmp_path)
        rew = f"{reward_file(tmp_path)}:length_reward"
        ref, run = tmp_path / "ref", mnt / "run"
        args = ("--log.report_to", "tensorboard", "--eval.eval_before", "false")
        assert run_cli(train_args(model, ref, *args, steps=4, reward=rew)).returncode == 0
        assert run_cli(train_args(model, run, *args, steps=2, reward=rew)).returncode == 0
        ck = run / "checkpoints"
        assert [p.name for p in ckpt.list_checkpoints(ck)] == ["step-000001", "step-000002"]
        # fill the disk but for a little less than a checkpoint needs
        need = sum(p.stat().st_size for p in (ck / "step-000002").rglob("*") if p.is_file())
        free = shutil.disk_usage(mnt).free
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * max(0, free - need // 2))
        line = _one_line(run_cli(["train", "--threads", "1", "--resume", str(run), "--train.max_steps", "4"]))
        assert line.startswith(f"segrl: DiskFullError: no space left on {mnt} (tmpfs) while writing checkpoint {ck / 'step-000003'}"), line
        assert line.endswith("freed the partial checkpoint"), line
        assert not [p for p in ck.iterdir() if p.name.startswith(".tmp-")]
        ckpt.verify_checkpoint(ck / "step-000002")
        # a resume before space is freed: one line again (TensorBoard's writer included)
        with open(mnt / "filler", "ab") as f:
            try:
                f.write(b"\0" * shutil.disk_usage(mnt).free)
            except OSError:
                pass
        line = _one_line(run_cli(["train", "--threads", "1", "--resume", str(run), "--train.max_steps", "4"]))
        assert line.startswith(f"segrl: DiskFullError: no space left on {mnt} (tmpfs) while writing"), line
        # space freed: the run continues and ends as the uninterrupted one did
        (mnt / "filler").unlink()
        r = run_cli(["train", "--threads", "1", "--resume", str(run), "--train.max_steps", "4"])
        assert r.returncode == 0, r.stderr[-3000:]
        assert_metrics_equal(read_metrics(ref), read_metrics(run))
        assert (ref / "rollouts.jsonl").read_bytes() == (run / "rollouts.jsonl").read_bytes()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
