"""A short GRPO run raises the mean reward (the whole loop: rollout -> reward -> advantage ->
clipped update), on the embedded model with a TRL-style user reward that it can learn in a
few steps: answer in at most as many characters as the model's median answer at the start."""

import statistics

import torch

from segrl.configs import load_config
from segrl.trainer.trainer import Trainer

MAX_CHARS = 29  # ~ the embedded model's median completion length: reward starts near 0.5


def short(prompts, completions, **columns):
    return [1.0 if len(c) <= MAX_CHARS else 0.0 for c in completions]


def test_grpo_run_raises_mean_reward(tmp_path):
    torch.set_num_threads(2)
    cfg = load_config(None, {
        "train.algo": "grpo", "train.max_steps": "24", "train.prompts_per_step": "8", "train.num_generations": "8",
        "train.learning_rate": "3e-4", "data.reward_weights": [0.0, 1.0],  # only the user reward
        "eval.eval_before": "false", "eval.eval_after": "false",
        "log.output_dir": str(tmp_path), "log.progress": "false", "log.report_to": "none", "log.save_rollouts": "false",
    })
    Trainer(cfg, reward_funcs=[short]).train()
    import json

    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 24
    first, last = statistics.mean(rewards[:6]), statistics.mean(rewards[-6:])
    assert 0.2 < first < 0.8  # the reward was learnable from the start (mixed groups)
    assert last > first + 0.15, rewards
