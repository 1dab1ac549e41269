"""Numerical faults: a NaN/inf loss or gradient skips the update (logged and counted in
``train/skipped_updates``), training stops after 5 skipped updates, and no NaN ever reaches
saved weights."""

from __future__ import annotations

import math

import pytest
import torch
from reliability_helpers import (
    load_weights,
    one_torch_thread,  # noqa: F401  (autouse fixture)
    step_lines,
    tiny_model_dir,
)

from segrl.configs import load_config
from segrl.trainer import update as update_mod
from segrl.trainer.trainer import Trainer, TrainingError


def length_reward(completions, **kw):
    return [len(c) / 16.0 for c in completions]


length_reward.segrl_inline = True  # no worker process needed for this test


def _trainer(tmp_path, steps=4) -> Trainer:
    model = tiny_model_dir(tmp_path)
    cfg = load_config(
        None,
        {
            "model.name_or_path": str(model),
            "train.max_steps": steps,
            "train.prompts_per_step": 2,
            "train.num_generations": 4,
            "sampling.max_completion_length": 16,
            "train.warmup_steps": 0,
            "eval.eval_before": False,
            "eval.eval_after": False,
            "eval.num_problems": 2,
            "data.num_train": 32,
            "log.save_steps": 1,
            "log.save_total_limit": 10,
            "log.report_to": "none",
            "log.progress": False,
        },
    )
    return Trainer(cfg, reward_funcs=[length_reward], run_dir=tmp_path / "run")


def _params(tr):
    return {n: p.detach().clone() for n, p in tr.model.named_parameters()}


def _nan_loss_at(monkeypatch, tr, bad_steps):
    """Make the policy loss NaN while the trainer is computing ``bad_steps`` (1-based)."""
    real = update_mod.policy_loss

    def patched(*a, **kw):
        loss, sums = real(*a, **kw)
        if tr.step + 1 in bad_steps:
            loss = loss * float("nan")
        return loss, sums

    monkeypatch.setattr(update_mod, "policy_loss", patched)


def _snapshots(monkeypatch, tr):
    snaps = {0: _params(tr)}
    real = tr.train_step

    def step():
        m = real()
        snaps[tr.step] = _params(tr)
        return m

    monkeypatch.setattr(tr, "train_step", step)
    return snaps


def _assert_checkpoints_finite(run):
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert ckpts
    for c in ckpts:
        for k, v in load_weights(c / "model").items():
            assert torch.isfinite(v).all(), (c.name, k)


def test_nan_loss_skips_that_update_only(tmp_path, monkeypatch, capsys):
    tr = _trainer(tmp_path)
    _nan_loss_at(monkeypatch, tr, {2})
    snaps = _snapshots(monkeypatch, tr)
    tr.train()
    assert "step 2: non-finite loss/grad" in capsys.readouterr().out.replace("\n", " ")
    def same(a, b):
        return all(torch.equal(snaps[a][k], snaps[b][k]) for k in snaps[a])

    assert not same(0, 1) and same(1, 2) and not same(2, 3)  # only step 2's update was skipped
    lines = step_lines(tmp_path / "run")
    assert [m["train/skipped_updates"] for m in lines] == [0.0, 1.0, 1.0, 1.0]
    assert lines[1]["loss"] is None  # NaN is logged as null, never as an invalid JSON NaN
    assert all(math.isfinite(m["loss"]) for i, m in enumerate(lines) if i != 1)
    _assert_checkpoints_finite(tmp_path / "run")


def test_inf_gradient_skips_the_update(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, steps=2)
    snaps = _snapshots(monkeypatch, tr)
    p = next(tr.model.parameters())
    p.register_hook(lambda g: g * float("inf") if tr.step + 1 == 2 else g)
    tr.train()
    assert all(torch.equal(snaps[1][k], snaps[2][k]) for k in snaps[1])
    assert [m["train/skipped_updates"] for m in step_lines(tmp_path / "run")] == [0.0, 1.0]
    _assert_checkpoints_finite(tmp_path / "run")


def test_persistent_nan_stops_after_threshold(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, steps=20)
    _nan_loss_at(monkeypatch, tr, set(range(1, 100)))
    w0 = _params(tr)
    with pytest.raises(TrainingError, match="5 updates skipped for non-finite loss"):
        tr.train()
    assert all(torch.equal(w0[k], p) for k, p in tr.model.named_parameters())
    assert len(step_lines(tmp_path / "run")) == 4  # the 5th skip stops inside step 5
    _assert_checkpoints_finite(tmp_path / "run")


def test_nan_weights_are_never_saved(tmp_path):
    tr = _trainer(tmp_path)
    with torch.no_grad():
        next(tr.model.parameters())[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="non-finite values"):
        tr.save()
    root = tmp_path / "run" / "checkpoints"
    assert not root.exists() or not list(root.iterdir())


def test_skipped_update_gives_no_scheduler_warning(tmp_path, monkeypatch):
    """A skipped first update still advances the lr schedule, without torch's
    "lr_scheduler.step() before optimizer.step()" warning."""
    import warnings

    tr = _trainer(tmp_path, steps=2)
    _nan_loss_at(monkeypatch, tr, {1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.train()
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert [m["train/skipped_updates"] for m in step_lines(tmp_path / "run")] == [1.0, 1.0]
