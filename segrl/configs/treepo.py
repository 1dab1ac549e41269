"""TreePO settings (Li et al., arXiv 2508.17445; code: multimodal-art-projection/TreePO).

Defaults are sized for the embedded arithmetic task (completions of ~20-45 tokens, at most
``sampling.max_completion_length`` = 64). Every help text gives the paper's value, and the
released code's value where the two differ ("script" = ``recipe/treepo/run_treepo_train.sh``,
"code default" = the value used when the script does not set the key).
``segrl/recipes/treepo_paper.yaml`` holds the paper's own setting for billion-parameter models.

Fields that only make sense with other sections (``width`` defaulting to
``train.num_generations``, the evaluation width ``eval.num_samples``) are checked with the
whole config (:func:`segrl.configs.checks.validate`), with the same
:class:`~segrl.configs.ConfigError` naming the ``treepo.*`` field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .loader import check, option

#: early-stop rules, in the paper's / code's default order (first rule that fires wins)
EARLY_STOP_RULES = ("answer", "eos", "length", "depth", "repetition")


@dataclass
class TreePOConfig:
    """TreePO segment-tree sampling, tree advantages and the DAPO-style update."""

    # ----- tree shape ------------------------------------------------------------------
    segment_length: int = option(8, help="Tokens per segment (one engine round grows every pending path by this many tokens). Paper/script: 512 (14 x 512 was best of 56x128 / 28x256 / 14x512 / 7x1024); code default 512.")
    max_depth: int = option(8, help="Max segments per trajectory (paths reaching it stop with finish reason 'depth'). Script: 14, code default 6. Keep max_depth * segment_length >= sampling.max_completion_length.")
    width: int | None = option(None, help="Finished leaves (trajectories) per prompt: in-flight + finished paths never exceed it. Default: train.num_generations (paper: w = rollout.n = 16).")
    initial_width: int = option(2, help="Paths started from the bare prompt in the first round (code: fixed_step_width = 2; the paper's 'fixed initial divergence').")
    initial_width_max: int | None = option(None, help="If set, each prompt's initial width is drawn uniformly from [initial_width, initial_width_max] (paper's 'More Init Divergence': 2..8). The released script could not enable this (wrong config key); here it is a first-class setting.")
    divergence: int = option(2, help="Children per active path per round, and branches each path finishing this round donates to its prompt's active paths (budget transfer). Paper/code: 2 (binary tree).")
    divergence_max: int | None = option(None, help="If set, each prompt draws its per-round divergence uniformly from [divergence, divergence_max] (code: by_random_div_MtoN).")
    divergence_policy: str = option("fixed", help="How a prompt's branch budget is split over its active paths: 'fixed' (even split, the paper's and script's choice), 'low_prob' (softmax of -score/T: 'Low Prob Encourage'), 'high_prob' (softmax of +score/T: 'High Prob Encourage'). Every active path gets >= 1 child; the rest goes by largest remainder. Paper 4.4: both log-prob heuristics underperform 'fixed'.", choices=("fixed", "low_prob", "high_prob"))
    divergence_score: str = option("segment_mean", help="Log-prob score of a path for the log-prob policies: 'segment_mean' (mean log-prob of its last segment; paper 4.4, code node_*), 'path_mean' (mean over the whole path; code norm_*), 'path_sum' (sum over the path; code logprob_weighted_div).", choices=("segment_mean", "path_mean", "path_sum"))
    divergence_temperature: float = option(2.0, help="Softmax temperature T of the log-prob policies (paper 4.4: 2.0; code default 1.0).")
    divergence_temperature_end: float | None = option(None, help="If set, T follows a cosine schedule from divergence_temperature (step 0) to this value (last step), e.g. 5.0 -> 1.0 for the paper's 'Naive2Low'.")
    # ----- early stop ------------------------------------------------------------------
    early_stop_order: list[str] = option(list(EARLY_STOP_RULES), help="Early-stop rules checked on every new segment, first match wins: answer (answer found and the segment ended with EOS/stop, or found at all under answer_policy=answer_as_eos), eos (EOS token or stop string), length (sampling.max_completion_length reached), depth (max_depth reached), repetition ('mumbling' in the new segment). eos, length and depth are required; leave out answer/repetition to disable them. Code default order: repetition last ('least_prioritized'; the script meant to put it first but misspelt the key).")
    answer_policy: str = option("answer_and_eos", help="'answer_and_eos': an answer only finishes a path together with EOS/stop (script: boxed_and_eos_first); 'answer_as_eos': a found answer alone finishes it (code default boxed_as_eos). The answer is searched in the whole completion so far, not only the last segment (the code missed answers split across segments).", choices=("answer_and_eos", "answer_as_eos"))
    answer_pattern: str = option(r"\\boxed\{(?:[^{}]|\{[^{}]*\})*\}|answer:\s*-?\d+", help="Regex that marks a final answer in the completion text (a complete \\boxed{...}, or the arithmetic task's 'answer: N').")
    repetition_substring: int = option(32, help="Mumbling detector: a substring of this many characters ... (code: 32).")
    repetition_count: int = option(8, help="... occurring at least this many times (non-overlapping) in the new segment's text stops the path with 'repetition' (code: 8).")
    # ----- depth-first fallback ----------------------------------------------------------
    fallback: bool = option(True, help="Depth-first search fallback: when a prompt has no active path and fewer than width leaves, regrow from segment boundaries of finished leaves (paper 3.2).")
    fallback_trajectory_policy: str = option("answer_eos", help="Which finished leaves may be regrown: 'answer_eos' (only leaves that ended with an answer or EOS/stop, shuffled; script soft_boxed_and_eos, the paper's choice), 'finished_first' (all leaves, Gumbel-perturbed sort by finish priority answer > eos > depth > length > repetition; code default), 'random_all', 'longer_first'. With no eligible leaf, fresh paths start from the prompt.", choices=("answer_eos", "finished_first", "random_all", "longer_first"))
    fallback_cut_policy: str = option("random", help="Where to cut a chosen leaf: 'random' (uniform over fallback_window blocks of its completion, keep everything before the block; script), 'lowest_prob' (the block with the lowest mean log-prob), 'from_start' (regrow from the prompt).", choices=("random", "lowest_prob", "from_start"))
    fallback_window: int | None = option(None, help="Block size in tokens for the cut (default: segment_length, so every cut is a segment boundary). A window that is not a multiple of segment_length gives the paper's 'misaligned fallback' ablation (the segment is split at the cut). Must be > 0 (the script's -1 crashed the released sampler).")
    fallback_max_rewind: int | None = option(None, help="If set, a cut keeps at least completion_length - fallback_max_rewind tokens (code: max_fallback_window).")
    fallback_copies: int | None = option(None, help="Paths regrown from each cut point (default: divergence; code: fixed_step_width = 2), until the width is used up.")
    # ----- total budget ------------------------------------------------------------------
    budget_mode: str = option("leaves", help="'leaves': exactly width leaves per prompt (code by_response_traj); 'tokens': the leaf count is token_budget / mean finished-leaf length, clamped to [min_width, width] and re-estimated every round (code by_response_token; leaf counts then vary per prompt).", choices=("leaves", "tokens"))
    token_budget: int = option(0, help="Per-prompt budget of trajectory (response) tokens for budget_mode=tokens.")
    min_width: int = option(2, help="Fewest leaves per prompt in budget_mode=tokens (code: tree_min_width).")
    saturated_fast_path: bool = option(True, help="Once a prompt's tree is saturated (in-flight + finished = width, budget_mode=leaves) no branching or fallback can happen any more, so its open paths are decoded to the end in that round's single engine call and cut into segment nodes afterwards, with the same early-stop rules applied segment by segment. Same trees in distribution, fewer rounds, no KV re-stacking. Off: one segment per round throughout, as in the released code.")
    max_rows_in_flight: int | None = option(None, help="Row capacity of one engine round (continuous batching over prompts, as a vLLM server runs when a batch holds more trajectories than fit at once): prompts are admitted in order while their pending paths fit, every round is one segment (no saturated fast path), and the capacity a prompt frees when its paths finish goes to the next prompts at the next round. None: every prompt at once. Must be >= the width.")
    max_rounds: int = option(0, help="Safety cap on engine rounds per sampling call (0 = max_depth * (width + 1), times the number of prompts under max_rows_in_flight; never reached in practice).")
    kv_sharing: str = option("cascade", help="Old name: 'copy' here = sampling.kv_sharing=copy (a DynamicCache row per path, for every sampler); 'cascade' leaves the choice to sampling.kv_sharing.", choices=("cascade", "copy"))
    # ----- advantages ----------------------------------------------------------------------
    advantage_aggregation: str = option("average", help="Combine a leaf's sub-group advantages R - mean(R over G_j): 'average' (paper Eq. 5, script, best in the ablation) or 'size' (weighted by |G_j|, Eq. 6; code default).", choices=("average", "size"))
    reject_zero_std_subgroups: bool = option(False, help="Drop sub-groups whose rewards have zero std (paper Eq. 7; code subtree_std_ds; hurts in the ablation).")
    include_root: bool = option(True, help="Include the root (whole prompt group) term; the paper found dropping it comparable.")
    normalization: str = option(
        "batch_whiten",
        help="After aggregation: 'batch_whiten' = subtract the token-weighted batch mean and divide by the token-weighted std over "
        "the whole training batch (the released code: REINFORCE++-baseline masked_whiten); 'subgroup_std' = divide each leaf's "
        "advantage by the unbiased std of its own kept sub-group advantages (+1e-4; the paper's Eq. 5 as written; a leaf with one "
        "term is left as is; trajectory level only); 'group_std' = divide by the std of the prompt group's rewards (+1e-4; a "
        "GRPO-style scale, not the paper's); 'none'.",
        choices=("batch_whiten", "subgroup_std", "group_std", "none"),
    )
    advantage_level: str = option(
        "trajectory",
        help="With train.adv_estimator=auto: 'trajectory' = every token of a trajectory gets the leaf's tree advantage (the "
        "treepo estimator; paper/script); 'segment' = each segment's tokens get their own credit (the treepo_segment "
        "estimator, see segment_values).",
        choices=("trajectory", "segment"),
    )
    segment_values: str = option(
        "leaf_mean",
        help="Segment-level credit: 'leaf_mean' = V(node) - V(parent), V = mean reward of the node's leaves; 'code' = the "
        "released tree_segment_reinforce_plus_plus_baseline: leaf rewards first replaced by their size-weighted sub-group "
        "advantage over every node of the path (root and the leaf's own singleton group included), V = recursive mean of "
        "children, V(root) = 0 (docs/treepo.md has a worked example of both).",
        choices=("leaf_mean", "code"),
    )
    segment_discount: float | None = option(
        None,
        help="segment_values=code: the discount eta of the parent value, A = V(node) - eta^k V(parent) with k = leaf depth + 1 - "
        "node depth (code segtree_adv_eta; unset = no discount, as in the released script).",
    )
    dedup_subgroups: bool = option(
        False,
        help="Count each distinct leaf set once: a chain of single-child nodes (e.g. a root with one child) repeats the same "
        "sub-group at every depth, which the paper/code count every time.",
    )
    # ----- dynamic sampling ----------------------------------------------------------------
    dynamic_sampling: bool = option(True, help="DAPO dynamic sampling: drop prompts whose leaves all have the same raw correctness (info['correct'], not the shaped reward) and top the batch up with more prompts.")
    max_extra_rounds: int = option(2, help="Extra generation rounds dynamic sampling may run per step (paper: 'at most two additional samplings'; script: max_num_gen_batches = 10).")
    oversample: float = option(3.0, help="Cap on generation-batch size, in units of prompts_per_step (DAPO/script: generation batch = 3 x train batch). The first round samples prompts_per_step x 1.1 / (running keep rate) prompts (prompts_per_step on the first step); an extra round asks for missing / keep_rate, at most oversample x missing.")
    # ----- evaluation ------------------------------------------------------------------------
    eval_divergence: int | None = option(None, help="Divergence for tree-sampled evaluation (eval.rollout=treepo; paper Table 2 varies it over 2, 4, 8). Default: divergence.")

    def __post_init__(self):
        f = "treepo."
        check(self.segment_length > 0, f + "segment_length", f"must be > 0, got {self.segment_length}")
        check(self.max_depth > 0, f + "max_depth", f"must be > 0, got {self.max_depth}")
        check(self.initial_width >= 1, f + "initial_width", f"must be >= 1, got {self.initial_width}")
        if self.width is not None:
            check(self.width >= 1, f + "width", f"must be >= 1, got {self.width}")
            check(self.width >= self.initial_width, f + "width", f"width ({self.width}) must be >= initial_width ({self.initial_width}): the first round alone would exceed the leaf budget")
        if self.initial_width_max is not None:
            check(self.initial_width_max >= self.initial_width, f + "initial_width_max", f"must be >= initial_width ({self.initial_width}), got {self.initial_width_max}")
            if self.width is not None:
                check(self.initial_width_max <= self.width, f + "initial_width_max", f"must be <= width ({self.width}), got {self.initial_width_max}")
        check(self.divergence >= 1, f + "divergence", f"must be >= 1, got {self.divergence}")
        if self.divergence_max is not None:
            check(self.divergence_max >= self.divergence, f + "divergence_max", f"must be >= divergence ({self.divergence}), got {self.divergence_max}")
        check(self.divergence_temperature > 0, f + "divergence_temperature", "must be > 0")
        check(self.divergence_temperature_end is None or self.divergence_temperature_end > 0, f + "divergence_temperature_end", "must be > 0")
        unknown = [r for r in self.early_stop_order if r not in EARLY_STOP_RULES]
        check(not unknown, f + "early_stop_order", f"unknown rule(s) {unknown}; known: {list(EARLY_STOP_RULES)}")
        check(len(set(self.early_stop_order)) == len(self.early_stop_order), f + "early_stop_order", "lists a rule twice")
        missing = [r for r in ("eos", "length", "depth") if r not in self.early_stop_order]
        check(not missing, f + "early_stop_order", f"must contain {missing} (without them a path could grow past EOS or its budget)")
        try:
            re.compile(self.answer_pattern)
        except re.error as e:
            check(False, f + "answer_pattern", f"not a valid regular expression: {e}")
        check(self.repetition_substring > 0, f + "repetition_substring", "must be > 0")
        check(self.repetition_count >= 2, f + "repetition_count", "must be >= 2")
        if self.fallback_window is not None:
            check(self.fallback_window > 0, f + "fallback_window", f"must be > 0 tokens (or unset = segment_length), got {self.fallback_window}")
        if self.fallback_max_rewind is not None:
            check(self.fallback_max_rewind > 0, f + "fallback_max_rewind", f"must be > 0, got {self.fallback_max_rewind}")
        if self.fallback_copies is not None:
            check(self.fallback_copies >= 1, f + "fallback_copies", f"must be >= 1, got {self.fallback_copies}")
        if self.budget_mode == "tokens":
            check(self.token_budget > 0, f + "token_budget", "must be > 0 with budget_mode=tokens")
        check(self.token_budget >= 0, f + "token_budget", "must be >= 0")
        check(self.min_width >= 1, f + "min_width", "must be >= 1")
        if self.width is not None and self.budget_mode == "tokens":
            check(self.min_width <= self.width, f + "min_width", f"must be <= width ({self.width})")
        check(self.max_rounds >= 0, f + "max_rounds", "must be >= 0")
        if self.max_rows_in_flight is not None:
            check(self.max_rows_in_flight >= 1, f + "max_rows_in_flight", f"must be >= 1 (or unset), got {self.max_rows_in_flight}")
            if self.width is not None:
                check(
                    self.max_rows_in_flight >= self.width,
                    f + "max_rows_in_flight",
                    f"must be >= the width ({self.width}) so that any prompt's round fits, got {self.max_rows_in_flight}",
                )
        if self.segment_discount is not None:
            check(self.segment_values == "code", f + "segment_discount", "only applies to segment_values=code")
            check(0 < self.segment_discount <= 1, f + "segment_discount", f"must be in (0, 1], got {self.segment_discount}")
        check(self.max_extra_rounds >= 0, f + "max_extra_rounds", "must be >= 0")
        check(self.oversample >= 1, f + "oversample", "must be >= 1")
        if self.eval_divergence is not None:
            check(self.eval_divergence >= 1, f + "eval_divergence", "must be >= 1")

    @property
    def window(self) -> int:
        """The fallback block size in tokens (``fallback_window`` or ``segment_length``)."""
        return self.fallback_window or self.segment_length
