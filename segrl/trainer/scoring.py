"""Score leaves: decode completions, call the reward functions, write ``node.reward``.

The task's correctness grader is the first reward function; user functions (TRL signature)
follow, combined with ``data.reward_weights``. The raw correctness of every leaf is kept in
``node.info[NodeInfo.CORRECT]`` (evaluation and dynamic sampling use it, not the shaped reward).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..rewards.combine import RewardComputer, load_reward_func
from ..tasks.base import Task
from ..tree import NodeInfo, RolloutTree


class Scorer:
    def __init__(self, task: Task, extra_funcs: Sequence, data_cfg, tokenizer):
        # The task's own graders are segrl code with their own timeouts: run them in-process.
        for f in (task.correctness, *task.extra_reward_funcs):
            try:
                f.segrl_inline = True
            except AttributeError:  # a bound method or builtin: it goes to the worker
                pass
        funcs = [task.correctness, *task.extra_reward_funcs, *extra_funcs]
        from ..configs import ConfigError

        for spec in data_cfg.reward_funcs:
            try:
                funcs.append(load_reward_func(spec))
            except Exception as e:  # a missing file/module/function is an invalid config value
                raise ConfigError(f"data.reward_funcs: cannot load {spec!r}: {type(e).__name__}: {e}") from e
        weights = data_cfg.reward_weights
        if weights is not None and len(weights) != len(funcs):
            raise ConfigError(f"data.reward_weights: {len(weights)} weights for {len(funcs)} reward functions")
        self.computer = RewardComputer(
            funcs,
            weights=weights,
            timeout_s=data_cfg.reward_timeout,
            max_error_fraction=data_cfg.max_reward_error_fraction,
            memory_mb=data_cfg.reward_memory_mb or None,
        )
        self.tokenizer = tokenizer

    def completions(self, refs: Sequence[tuple[RolloutTree, int]]) -> list[str]:
        return [
            self.tokenizer.decode(t.path_token_ids(leaf, include_prompt=False), skip_special_tokens=True)
            for t, leaf in refs
        ]

    def __call__(self, refs: Sequence[tuple[RolloutTree, int]]) -> dict[str, float]:
        """Set ``reward`` (weighted sum) and ``info[NodeInfo.CORRECT]`` on every ``(tree, leaf)``."""
        if not refs:
            return {}
        comps = self.completions(refs)
        prompts = [t.row.get("prompt", "") for t, _ in refs]
        keys = sorted({k for t, _ in refs for k in t.row if k != "prompt"})
        cols = {k: [t.row.get(k) for t, _ in refs] for k in keys}
        result = self.computer(prompts, comps, **cols)
        correct = result.per_func[self.computer.names[0]]
        for (t, leaf), r, c in zip(refs, result.rewards, correct):
            t[leaf].reward = float(r)
            t[leaf].info[NodeInfo.CORRECT] = 0.0 if c is None else float(c)
        # reward / reward_std are computed by the trainer over trajectories only (MC
        # continuations are scored here too but are not trajectories).
        return {k: v for k, v in result.metrics.items() if k not in ("reward", "reward_std")}
