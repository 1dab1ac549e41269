"""The methods compared and the settings every comparison run shares.

A method is a set of config overrides; everything else comes from the dataclass defaults,
the algorithm's recipe (``segrl/recipes/``, e.g. TreePO's learning rate on the arithmetic
task) and the user's ``--set`` values, which win.
"""

from __future__ import annotations

#: name -> (label for tables and plots, config overrides)
METHODS: dict[str, tuple[str, dict[str, str]]] = {
    "grpo": ("GRPO", {"train.algo": "grpo"}),
    "rloo": ("RLOO", {"train.algo": "rloo"}),
    "spo_chain": ("SPO-chain", {"train.algo": "spo_chain"}),
    "spo_tree": ("SPO-tree", {"train.algo": "spo_tree"}),
    "treepo": ("TreePO", {"train.algo": "treepo"}),
    "grpo_treepo": ("GRPO + TreePO sampling", {"train.algo": "grpo", "train.rollout": "treepo"}),
}

#: default token budget: ~80 GRPO steps of 16 prompts x 8 samples on the embedded task;
#: with 3 seeds and 5 evaluations per run the 18 runs take ~30-40 min on 2 CPU cores
DEFAULT_BUDGET = 300_000
DEFAULT_SEEDS = (0, 1, 2)
#: evaluations inside the run, at evenly spaced token-budget fractions (plus before and after)
DEFAULT_EVALS = 3
#: the step cap is only a safety net: the token budget ends every run
STEP_CAP = 100_000

#: shared by every run of a comparison (the user's --set wins)
COMMON = {
    "eval.num_problems": "100",
    "eval.num_samples": "4",
    "eval.eval_steps": "0",  # evaluation points come from eval.eval_every_tokens
    "log.report_to": "none",  # metrics.jsonl is enough; TensorBoard flushes cost time
    "log.logging_steps": "20",
    "log.save_steps": "0",
}

#: --quick: a smoke run of the whole pipeline in well under a minute (tests, CI). Small
#: batches and trees, so that every method gets several steps within the tiny budget.
QUICK_BUDGET = 1_600
QUICK_SEEDS = (0, 1)
QUICK = {
    "data.num_train": "512",  # the held-out split does not depend on it; generating 20000 rows takes ~1 s a run
    "train.prompts_per_step": "2",
    "train.num_generations": "4",
    "sampling.max_completion_length": "32",
    "spo.num_mc_samples": "2",
    "spo.max_segments": "2",
    "spo.branch_factors": "2,2",
    "treepo.max_depth": "4",
    "eval.num_problems": "8",
    "eval.num_samples": "2",
    "log.logging_steps": "1000",
    "log.progress": "false",
    "log.save_rollouts": "false",
}


def parse_methods(spec: str | None) -> list[str]:
    """``"grpo,treepo"`` -> ``["grpo", "treepo"]``; None or ``all`` -> every method."""
    if spec is None or spec.strip() in ("", "all"):
        return list(METHODS)
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; known: {', '.join(METHODS)}")
    return list(dict.fromkeys(names))  # keep order, drop repeats
