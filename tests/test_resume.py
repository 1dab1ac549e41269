"""Crash-safe checkpoints and exact resume.

* unit tests of the checkpoint writer/reader: atomic layout, keep-last-N, every kind of
  corrupt or partial checkpoint is detected and skipped with a message, pickles never run code;
* end to end: a training subprocess is SIGKILLed at several points (mid-step, between a step
  and its checkpoint, at every stage of a checkpoint write, after the last checkpoint, before
  any checkpoint exists), its newest checkpoint is corrupted once, and each time it is resumed
  with ``segrl train --resume RUN_DIR``; the final weights, metrics.jsonl, rollouts.jsonl and
  summary.json equal those of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    assert_metrics_equal,
    load_weights,
    one_torch_thread,  # noqa: F401  (autouse fixture)
    read_metrics,
    reward_file,
    run_cli,
    tiny_model_dir,
    train_args,
)

from segrl.trainer import checkpoint as ckpt

# ----------------------------------------------------------------------------------------------
# checkpoint unit tests
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def parts(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_model_dir(tmp_path.parent)
    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, tok, opt, sched


def _save(root, step, parts, keep=2):
    model, tok, opt, sched = parts
    return ckpt.save_checkpoint(root, step, model, tok, opt, sched, {"step": step}, keep=keep)


def test_atomic_layout_and_keep_last_n(tmp_path, parts):
    root = tmp_path / "ckpts"
    for s in (1, 2, 3):
        _save(root, s, parts, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-000002", "step-000003"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary left
    manifest = json.loads((root / "step-000003" / "manifest.json").read_text())
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "model/model.safetensors"} <= set(manifest["files"])
    ckpt.verify_checkpoint(root / "step-000003")
    # Re-saving the same step replaces it (old copy moved aside, then removed).
    _save(root, 3, parts, keep=2)
    assert [p.name for p in root.iterdir()] and not [p for p in root.iterdir() if p.name.startswith(".")]
    ckpt.verify_checkpoint(root / "step-000003")


def _truncate_weights(p: Path):
    f = p / "model" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_byte(p: Path):
    f = p / "optimizer.pt"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "manifest.json").write_text('{"files": {}}'), "does not list"),
        (_truncate_weights, "has size"),
        (_flip_byte, "does not match its checksum"),
        (lambda p: (p / "trainer_state.json").unlink(), "is missing"),
    ],
    ids=["no-manifest", "bad-manifest", "empty-manifest", "truncated-weights", "flipped-byte", "missing-file"],
)
def test_corrupt_newest_checkpoint_falls_back(tmp_path, parts, damage, reason):
    root = tmp_path / "ckpts"
    _save(root, 1, parts)
    _save(root, 2, parts)
    damage(root / "step-000002")
    messages = []
    got = ckpt.latest_valid_checkpoint(root, log=messages.append)
    assert got == root / "step-000001"
    assert len(messages) == 1 and "skipping corrupt checkpoint" in messages[0] and "step-000002" in messages[0]
    assert reason in messages[0]


def test_all_corrupt_gives_none_and_partial_writes_are_removed(tmp_path, parts):
    root = tmp_path / "ckpts"
    _save(root, 1, parts)
    (root / "step-000001" / "manifest.json").unlink()
    (root / ".tmp-step-000002-123").mkdir()  # a write killed before its rename
    assert ckpt.list_checkpoints(root) == [root / "step-000001"]  # temporaries are never candidates
    assert ckpt.latest_valid_checkpoint(root, log=lambda m: None) is None
    msgs = []
    assert ckpt.remove_partial(root, log=msgs.append) == [root / ".tmp-step-000002-123"]
    assert "interrupted write" in msgs[0] and not (root / ".tmp-step-000002-123").exists()


class _Evil:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_pickles_never_run_code(tmp_path, parts):
    """optimizer.pt / scheduler.pt load with ``torch.load(weights_only=True)``: a pickle that
    would run code is refused with a one-line CheckpointError (never advising
    ``weights_only=False``) and its code does not run."""
    root = tmp_path / "ckpts"
    path = _save(root, 1, parts)
    _Evil.marker = tmp_path / "pwned"
    with open(path / "optimizer.pt", "wb") as f:
        pickle.dump({"state": _Evil()}, f, protocol=2)
    model, _, opt, sched = parts
    with pytest.raises(ckpt.CheckpointError, match="pickled objects other than tensors") as err:
        ckpt.load_training_state(path, model, opt, sched)
    assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)
    assert not _Evil.marker.exists()


# ----------------------------------------------------------------------------------------------
# SIGKILL at many points, resume, compare with an uninterrupted run
# ----------------------------------------------------------------------------------------------

#: (kill point, what happens) in the order one run meets them. Steps 1..6, a checkpoint after
#: every step, keep-last-2.
KILLS = [
    ("after_step:1", "step 1 logged, no checkpoint yet: resume starts over, logs cut to empty"),
    ("after_rollout:2", "mid-step: rollout and rewards of step 2 done, no update"),
    ("ckpt_before_manifest:3", "checkpoint 3 fully written except its manifest"),
    ("ckpt_before_rename:4", "checkpoint 4 complete in its temporary dir, not yet renamed"),
    ("corrupt-newest", "newest checkpoint (3) corrupted on disk: resume falls back to 2"),
    ("before_final_model:6", "final checkpoint written, final_model not yet"),
]


def test_sigkill_anywhere_then_resume_matches_uninterrupted(tmp_path):
    model = tiny_model_dir(tmp_path)
    rew = f"{reward_file(tmp_path)}:length_reward"
    ref, run = tmp_path / "ref", tmp_path / "run"

    # The reference runs in this process (same code path as the CLI; saves an interpreter start).
    from segrl.cli import main

    assert main(train_args(model, ref, reward=rew)) == 0

    first = True
    logs = []
    for point, _ in KILLS:
        if point == "corrupt-newest":
            newest = sorted((run / "checkpoints").glob("step-*"))[-1]
            assert newest.name == "step-000003"
            _flip_byte(newest)
            continue
        args = train_args(model, run, reward=rew) if first else ["train", "--threads", "1", "--resume", str(run)]
        first = False
        r = run_cli(args, SEGRL_TEST_KILL_AT=point)
        assert r.returncode == -9, f"{point}: expected SIGKILL, got {r.returncode}\n{r.stderr[-3000:]}"
        logs.append(r.stdout)
    r = run_cli(["train", "--threads", "1", "--resume", str(run)])
    assert r.returncode == 0, r.stderr[-3000:]
    logs.append(r.stdout)
    text = "\n".join(logs).replace("\n", " ")
    assert "no intact checkpoint found; starting from scratch" in text  # killed before any checkpoint
    assert "removing partial checkpoint" in text  # killed during a write
    assert "skipping corrupt checkpoint" in text and "step-000003" in text  # corrupt newest
    assert "resumed from" in text

    assert_metrics_equal(read_metrics(ref), read_metrics(run))
    assert (ref / "rollouts.jsonl").read_bytes() == (run / "rollouts.jsonl").read_bytes()
    assert json.loads((ref / "summary.json").read_text()) == json.loads((run / "summary.json").read_text())
    wa, wb = load_weights(ref / "final_model"), load_weights(run / "final_model")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)
    # The training really moved the weights (otherwise the comparison proves nothing).
    w0 = load_weights(model)
    assert any(not torch.equal(w0[k], wa[k]) for k in wa if k in w0)
    # The checkpoint directory ends clean: keep-last-2, the corrupt one kept aside.
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["corrupt-step-000003", "step-000005", "step-000006"], names


# ----------------------------------------------------------------------------------------------
# safety: what a run loads never runs code
# ----------------------------------------------------------------------------------------------


def test_models_load_from_safetensors_only_and_remote_code_is_off(tmp_path):
    from transformers import AutoModelForCausalLM

    from segrl.configs import ModelConfig
    from segrl.models.loading import load_model_and_tokenizer

    assert ModelConfig().trust_remote_code is False
    src = tiny_model_dir(tmp_path)
    pickled = tmp_path / "pickled-model"  # the same model as a pickle (pytorch_model.bin)
    pickled.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(AutoModelForCausalLM.from_pretrained(src).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):  # a pickle-only model is refused, not unpickled
        load_model_and_tokenizer(ModelConfig(name_or_path=str(pickled)))
    load_model_and_tokenizer(ModelConfig(name_or_path=str(src)))  # safetensors: fine


def test_no_code_paths_on_untrusted_input_in_the_package():
    """Static check: no eval/exec, every torch.load is weights_only=True, trust_remote_code is
    never forced on. (pickle is used only on the pipe to segrl's own reward worker.)"""
    import re

    root = Path(__file__).resolve().parents[1] / "segrl"
    for f in root.rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            where = f"{f.relative_to(root)}:{i}: {line.strip()}"
            assert not re.search(r"(?<![\w.])(eval|exec)\(", code), where
            if "torch.load(" in code:
                assert "weights_only=True" in code, where
            assert "trust_remote_code=True" not in code, where
            if re.search(r"pickle\.loads?\(", code):
                assert f.name == "worker_child.py", where  # the reward worker reads its own pipe


# ----------------------------------------------------------------------------------------------
# every algorithm resumes exactly (in-process: stopped by a signal after step 2, resumed)
# ----------------------------------------------------------------------------------------------


def length_reward(completions, **kw):
    return [len(c) / 16.0 for c in completions]


length_reward.segrl_inline = True


def _trainer(model, out, algo):
    from segrl.configs import load_config
    from segrl.trainer.trainer import Trainer

    cfg = load_config(
        None,
        {
            "model.name_or_path": str(model),
            "train.algo": algo,
            "train.max_steps": 4,
            "train.prompts_per_step": 2,
            "train.num_generations": 4,
            "sampling.max_completion_length": 16,
            "eval.num_problems": 2,
            "eval.num_samples": 2,
            "eval.eval_steps": 3,
            "data.num_train": 32,
            "log.save_steps": 3,
            "log.report_to": "none",
            "log.progress": False,
        },
    )
    return Trainer(cfg, reward_funcs=[length_reward], run_dir=out)


@pytest.mark.parametrize("algo", ["grpo", "rloo", "spo_chain", "spo_tree", "treepo"])
def test_every_algorithm_resumes_exactly(tmp_path, algo, monkeypatch):
    import signal

    model = tiny_model_dir(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    _trainer(model, ref, algo).train()

    first = _trainer(model, run, algo)
    step = first.train_step

    def stop_after_2():
        m = step()
        if first.step == 2:
            first._on_signal(signal.SIGTERM, None)
        return m

    monkeypatch.setattr(first, "train_step", stop_after_2)
    assert first.train()["interrupted_at_step"] == 2
    _trainer(model, run, algo).train(resume=True)

    assert_metrics_equal(read_metrics(ref), read_metrics(run))
    wa, wb = load_weights(ref / "final_model"), load_weights(run / "final_model")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)
