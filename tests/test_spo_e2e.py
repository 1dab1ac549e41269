"""End to end: SPO-chain and SPO-tree runs on the embedded task raise the reward (slow).

Runs ``segrl train --algo spo_chain`` / ``--algo spo_tree`` with the embedded recipes
(``segrl/recipes/spo_*_arithmetic.yaml``), shortened by ``SEGRL_SPO_E2E_STEPS`` when set.
Uses the embedded default model (skipped until it is built); ``SEGRL_SPO_E2E_MODEL`` points
the test at another model directory.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def _model() -> str:
    name = os.environ.get("SEGRL_SPO_E2E_MODEL", "default")
    if name == "default":
        from segrl.models.default import default_model_path

        if not (default_model_path() / "model.safetensors").is_file():
            pytest.skip("embedded default model not built yet")
    return name


@pytest.mark.parametrize("algo", ["spo_chain", "spo_tree"])
def test_spo_training_raises_reward(tmp_path: Path, algo: str):
    from segrl.configs import load_config
    from segrl.trainer.trainer import Trainer

    torch.set_num_threads(1)
    over = {
        "train.algo": algo,
        "model.name_or_path": _model(),
        "log.report_to": "none",
        "log.progress": "false",
        "log.save_rollouts": "false",
    }
    if os.environ.get("SEGRL_SPO_E2E_STEPS"):
        over["train.max_steps"] = os.environ["SEGRL_SPO_E2E_STEPS"]
    cfg = load_config(overrides=over)
    assert cfg.train.use_prob_mask is None  # the algorithm's default: on for SPO
    trainer = Trainer(cfg, run_dir=tmp_path)
    assert trainer.algorithm.use_prob_mask
    summary = trainer.train()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == cfg.train.max_steps
    keys = ["segments/mean_count", "segments/mean_length", "tree/decoded_tokens", "prob_mask/masked_fraction", "advantages/mean"]
    keys += ["mc/rollouts", "mc/tokens"] if algo == "spo_chain" else ["tree/leaves"]
    for r in steps:
        for k in keys:
            assert k in r, k
        assert 0.0 < r["prob_mask/masked_fraction"] < 1.0
    k = max(5, len(steps) // 4)
    first = statistics.mean(r["reward"] for r in steps[:k])
    last = statistics.mean(r["reward"] for r in steps[-k:])
    before, after = summary["before"]["pass@1"], summary["after"]["pass@1"]
    assert last > first, (first, last)  # training reward rises
    assert after > before + 0.03, (before, after)  # and held-out accuracy
