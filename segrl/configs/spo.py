"""SPO settings: Segment Policy Optimization (Guo et al., arXiv 2505.23564).

Two instances share these settings:

* ``--algo spo_chain`` (short chain of thought): sample ``train.num_generations`` trajectories
  per prompt, cut each at *cutpoints* (low-probability tokens), estimate the value of every
  boundary state with ``num_mc_samples`` Monte-Carlo continuations, and give each segment
  ``V(next boundary) - V(this boundary)``.
* ``--algo spo_tree`` (long chain of thought): grow a tree of fixed-length segments with
  ``branch_factors`` children per depth; a leaf's value is its reward, a node's value the
  mean of its children's; each segment is trained with ``V(child) - V(parent)``.

Both train with the probability mask (only tokens whose sampling probability is below
``train.prob_mask_rho`` = 0.9 are in the loss and the KL term), on by default for SPO.

Help texts give the value of the paper / reference code (``AIFrameResearch/SPO``) next to
this library's default, which is tuned for the embedded arithmetic task where it differs
(see ``docs/spo.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .loader import check, option

PARTITIONS = ("cutpoint", "fixed", "newline")
CAP_RULES = ("even", "first", "lowest_prob")
WHITEN_SCOPES = ("batch", "group", "none")


@dataclass
class SPOConfig:
    """Segment Policy Optimization: partition, MC value estimation, tree shape."""

    # ----- SPO-chain: segment partition ---------------------------------------------
    partition: str = option(
        "cutpoint",
        help="SPO-chain segment partition: 'cutpoint' (paper's SPO-chain: a new segment opens at every "
        "cutpoint_interval-th token whose sampling probability is below cutpoint_rho), 'fixed' (every "
        "fixed_length tokens, or fixed_num_segments equal chunks; the paper's 'fixed token count' ablation), "
        "'newline' (one segment per line/reasoning step, VinePPO's partition).",
        choices=PARTITIONS,
    )
    cutpoint_interval: int = option(
        5,
        help="Cutpoints per segment: boundaries are the 1st, (int+1)-th, (2int+1)-th ... cutpoint, the state "
        "lying just before it. Paper default 5 ('int5'); ablations 1..10 and 100 (int2 is close to int5, int100 much worse).",
    )
    cutpoint_rho: float | None = option(
        None,
        help="Probability threshold of a cutpoint (token probability at the sampling temperature). "
        "Default: train.prob_mask_rho (paper: 0.9, hard-coded in the reference code).",
    )
    fixed_length: int = option(
        10,
        help="partition='fixed': tokens per segment (boundaries at 0, L, 2L, ...). The paper's fixed-token-count "
        "chain ablation used 4 equal chunks instead (see fixed_num_segments).",
    )
    fixed_num_segments: int = option(
        0,
        help="partition='fixed': if > 0, cut each trajectory into this many equal chunks instead of fixed_length "
        "tokens (reference 'naive' ablation: 4 chunks).",
    )
    newline_delimiter: str = option(
        "\n",
        help="partition='newline': a boundary follows every token whose text contains this string (GSM8K/VinePPO: newline).",
    )
    max_segments: int = option(
        8,
        help="Cap on the value-estimated boundaries (= segments) per trajectory; 0 = no cap. The reference code has "
        "no cap (its configs set max_step_for_value_estimation=25 but the SPO-chain generator ignores it); "
        "each boundary costs num_mc_samples continuations.",
    )
    cap_rule: str = option(
        "even",
        help="Which boundaries survive the max_segments cap: 'even' (evenly spaced over the candidates, always keeping "
        "the first and the last: segments stay balanced and no low-probability token is left before the first "
        "boundary), 'first' (the first max_segments; the last segment absorbs the rest), 'lowest_prob' (the "
        "boundaries whose opening token is least likely). Dropped boundaries merge their segments.",
        choices=CAP_RULES,
    )
    # ----- SPO-chain: MC value estimation -------------------------------------------
    num_mc_samples: int = option(
        9,
        help="K: Monte-Carlo continuations per boundary state; V = their mean reward. Paper: 9 (Rho-1.1B, "
        "Qwen2.5-1.5B), 4 (DeepSeek-R1-Distill-1.5B, Qwen-0.5B). Boundary states shared by several "
        "trajectories of a prompt are estimated once.",
    )
    # ----- SPO-tree -------------------------------------------------------------------
    branch_factors: list[int] = option(
        [6, 6, 6],
        help="SPO-tree: children per node at each depth (the tree depth is its length). Paper default 6,6,6; "
        "ablations 4,4,4 / 4,5,6 / 6,5,4 / 8,8,8 (smaller trees learn faster early, larger ones end higher).",
    )
    segment_length: int = option(
        10,
        help="SPO-tree: M, tokens per segment at every depth but the last. Paper: 30 (Rho/GSM8K), 100 (MATH), "
        "600 (DeepSeek-R1-Distill long CoT). 10 suits the ~20-45-token completions of the embedded task.",
    )
    last_segment_unbounded: bool = option(
        True,
        help="SPO-tree: the last depth runs until EOS/stop or max_completion_length (paper: yes). If false it is "
        "also M tokens long and an unfinished node there is graded as truncated ('depth').",
    )
    normalize_by_sibling_std: bool = option(
        False,
        help="SPO-tree: divide V(child) - V(parent) by the std of the siblings' values (+1e-8): the reference's "
        "adv_method='grpo'. Paper/reference default: off (adv_method='rloo' = plain difference).",
    )
    drop_zero_advantage: bool = option(
        True,
        help="SPO-tree: segments whose advantage is exactly 0 are not trained (reference: yes). They would "
        "only shift the whitening statistics.",
    )
    # ----- policy update ---------------------------------------------------------------
    whiten: str = option(
        "batch",
        help="Token whitening of advantages (x - mean)/std over the loss-masked tokens: 'batch' (the whole step's "
        "batch; the reference does this per micro-batch of 2-8 sequences, an artefact of its trainer), "
        "'group' (per prompt), 'none'.",
        choices=WHITEN_SCOPES,
    )
    # ----- replay buffer (reference code detail, off) -----------------------------------
    replay_buffer: bool = option(
        False,
        help="Keep samples in a buffer across steps and train on at most replay_per_prompt of them per prompt each "
        "step (reference SPO-tree's OnPolicyReplayBuffer). Off: it makes training partly off-policy (stale old "
        "log-probs drive the PPO ratio and the probability mask).",
    )
    replay_per_prompt: int = option(32, help="Replay buffer: samples drawn per prompt per step (reference: 32).")
    replay_max_age: int = option(8, help="Replay buffer: samples this many steps old are dropped (reference: 8).")

    def __post_init__(self):
        check(self.cutpoint_interval >= 1, "spo.cutpoint_interval", "must be >= 1")
        check(self.cutpoint_rho is None or 0 < self.cutpoint_rho <= 1, "spo.cutpoint_rho", "must be in (0, 1]")
        check(self.fixed_length >= 1, "spo.fixed_length", "must be >= 1")
        check(self.fixed_num_segments >= 0, "spo.fixed_num_segments", "must be >= 0")
        check(len(self.newline_delimiter) > 0, "spo.newline_delimiter", "must not be empty")
        check(self.max_segments >= 0, "spo.max_segments", "must be >= 0 (0 = no cap)")
        check(self.num_mc_samples >= 1, "spo.num_mc_samples", "must be >= 1")
        check(len(self.branch_factors) >= 1, "spo.branch_factors", "needs at least one depth, e.g. 6,6,6")
        check(all(b >= 1 for b in self.branch_factors), "spo.branch_factors", f"every factor must be >= 1, got {self.branch_factors}")
        check(self.segment_length >= 1, "spo.segment_length", "must be >= 1")
        check(self.replay_per_prompt >= 1, "spo.replay_per_prompt", "must be >= 1")
        check(self.replay_max_age >= 1, "spo.replay_max_age", "must be >= 1")
