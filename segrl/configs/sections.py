"""Config sections shared by every algorithm (TRL's ``GRPOConfig`` names where one exists)."""

from __future__ import annotations

from dataclasses import dataclass

from . import checks
from .loader import check, option

#: largest train.seed: numpy and vLLM take 32-bit seeds (torch 64-bit ones, which the trainer derives from it)
MAX_SEED = 2**32 - 1


@dataclass
class ModelConfig:
    """The policy model."""

    name_or_path: str = option("default", help="'default' (the embedded tiny LLaMA), a preset name, a local directory, or a model id already in the local HF cache.")
    dtype: str = option("float32", help="Parameter dtype: float32 on CPU (bf16 is ~30x slower there), bfloat16 on GPU; auto = bfloat16 on a bf16-capable GPU, else float32.", choices=("float32", "bfloat16", "float16", "auto"))
    device: str = option("cpu", help="torch device: cpu, cuda, cuda:1 ..., or auto (cuda when available). Under torchrun each rank uses cuda:LOCAL_RANK.")
    chat_template: str = option("auto", help="Wrap plain-text prompts as a user message in the tokenizer's chat template: auto (when the tokenizer has one), on, off. Conversational prompts always use it.", choices=("auto", "on", "off"))
    trust_remote_code: bool = option(False, help="Allow model repositories to run their own Python code. Off unless you trust the source.")
    gradient_checkpointing: bool = option(False, help="Recompute activations in backward to save memory.")
    logprob_chunk_size: int = option(64, help="Sequence positions per LM-head chunk when computing log-probs (0 = whole sequence; chunks keep [batch x length x vocab] logits from being materialised).")

    def __post_init__(self):
        check(self.logprob_chunk_size >= 0, "model.logprob_chunk_size", "must be >= 0")


@dataclass
class DataConfig:
    """The task: prompts, gold answers and the rewards that grade completions."""

    task: str = option("arithmetic", help="'arithmetic' (embedded, procedurally generated), 'gsm8k', 'math500', 'reasoning_gym:<name>', or 'file' to read train_file/test_file.")
    train_file: str | None = option(None, help="Local .jsonl/.json/.parquet with prompt and answer columns (task='file').")
    test_file: str | None = option(None, help="Held-out rows for evaluation (task='file'); default: a split of train_file.")
    prompt_column: str = option("prompt", help="Column holding the prompt text.")
    answer_column: str = option("answer", help="Column holding the gold answer.")
    difficulty: int = option(2, help="Arithmetic task difficulty knob (see segrl.tasks.arithmetic).")
    num_train: int = option(20000, help="Training problems generated for the arithmetic task.")
    seed: int = option(1234, help="Seed of the generated task data (independent of training seed).")
    skip_bad_rows: bool = option(False, help="Skip (and count) malformed dataset rows instead of stopping before training.")
    max_prompt_length: int = option(512, help="Prompts longer than this many tokens are malformed rows.")
    reward_funcs: list[str] = option([], help="Extra reward functions 'module:function' or 'file.py:function' (TRL signature f(prompts, completions, **columns)). The task's correctness reward is always first.")
    reward_weights: list[float] | None = option(None, help="One weight per reward function (correctness first); default all 1.")
    reward_timeout: float = option(30.0, help="Seconds a reward function may take on one batch before its samples get the fallback reward.")
    max_reward_error_fraction: float = option(0.5, help="Stop the run when more than this fraction of recent samples hit reward errors.")
    reward_memory_mb: int = option(
        8192,
        help="MiB a reward worker process may allocate beyond its start-up size (RLIMIT_AS); past it the function gets "
        "a MemoryError, an error for those samples only. 0 = no limit.",
    )

    def __post_init__(self):
        check(self.num_train > 0, "data.num_train", "must be > 0")
        check(self.max_prompt_length > 0, "data.max_prompt_length", "must be > 0")
        check(self.reward_timeout > 0, "data.reward_timeout", "must be > 0")
        check(0 < self.max_reward_error_fraction <= 1, "data.max_reward_error_fraction", "must be in (0, 1]")
        check(self.reward_memory_mb >= 0, "data.reward_memory_mb", "must be >= 0 (0 = no limit)")


@dataclass
class SamplingConfig:
    """How completions are sampled during training."""

    temperature: float = option(1.0, help="Sampling temperature (log-probs are recorded at this temperature).")
    top_p: float = option(1.0, help="Nucleus sampling mass (1.0 = off).")
    top_k: int = option(0, help="Top-k sampling (0 = off).")
    max_completion_length: int = option(64, help="Max generated tokens per trajectory (TRL's max_completion_length).")
    stop_strings: list[str] = option([], help="Extra strings that end a completion (the task may add its own).")
    max_batch_size: int = option(512, help="Rows decoded together by the engine.")
    backend: str = option("hf", help="Rollout engine: hf (transformers, prefix KV forks) or vllm (segrl.engine.vllm_engine: vLLM with prefix caching, weights synced after every update; needs vllm installed).", choices=("hf", "vllm"))
    kv_sharing: str = option(
        "auto",
        help="KV layout of the hf backend (all samplers): cascade (shared prefixes stored and read once), flat (a pool row per "
        "path; static shapes, CUDA graphs), copy (a DynamicCache row per path), auto (cascade on CPU, flat on CUDA). "
        "Non-LLaMA-family models use copy.",
        choices=("auto", "cascade", "flat", "copy"),
    )
    cuda_graphs: bool = option(
        True, help="On CUDA, replay the pool engine's decode step as CUDA graphs captured per bucket of rows and positions."
    )

    def __post_init__(self):
        check(self.temperature > 0, "sampling.temperature", "must be > 0 for training")
        check(0 < self.top_p <= 1, "sampling.top_p", "must be in (0, 1]")
        check(self.top_k >= 0, "sampling.top_k", "must be >= 0")
        check(self.max_completion_length > 0, "sampling.max_completion_length", "must be > 0")
        check(self.max_batch_size > 0, "sampling.max_batch_size", "must be > 0")


@dataclass
class TrainConfig:
    """Optimisation and the policy-gradient objective (TRL GRPOConfig names)."""

    algo: str = option("grpo", help="The algorithm (segrl.trainer.algorithms registry): grpo | rloo | spo_chain | spo_tree | treepo.")
    rollout: str = option(
        "auto",
        help="Rollout sampler (segrl.samplers.registry; the same names as eval.rollout): 'auto' (the algorithm's own), 'group' "
        "(num_generations independent completions per prompt; old name 'independent'), 'treepo' (TreePO segment trees: 'GRPO w/ TreePO "
        "sampling' with algo grpo), 'spo_tree' (SPO-tree segment trees), 'spo_chain' (SPO-chain trajectories + Monte-Carlo continuations). "
        "SPO algorithms only train with their own sampler.",
    )
    adv_estimator: str = option(
        "auto",
        help="Advantage estimator (verl's adv_estimator; segrl.algos.registry): 'auto' (the algorithm's own), outcome estimators on the "
        "trajectories of any sampler: 'grpo', 'rloo', 'spo_grpo' (the SPO reference's GRPO baseline: population std, eps 1e-8); tree "
        "estimators: 'spo_tree' (V = mean of children, A = V(child) - V(parent)), 'treepo' (sub-group advantages), 'treepo_segment' "
        "(treepo.segment_values), 'spo_chain' (needs the spo_chain sampler). The algorithm keeps its own normalisation and update.",
    )
    max_steps: int = option(240, help="Training steps (one rollout batch + num_iterations optimisation passes each).")
    max_generated_tokens: int = option(0, help="Also stop once the tokens the rollout engine has decoded in training (every sampled token: trajectories, tree branches, SPO-chain's Monte-Carlo continuations, dynamic-sampling retries; not evaluation) reach this many (0 = off). Checked after each step, so a run overshoots by less than one step's tokens; max_steps still caps, and sets the length of the lr schedule.")
    prompts_per_step: int = option(16, help="Prompts sampled per step; each gets num_generations completions (GRPO).")
    num_generations: int = option(8, help="Completions per prompt (GRPO/RLOO group size; N trajectories for SPO-chain).")
    micro_batch_size: int = option(64, help="Sequences per forward/backward; gradients accumulate over the step's batch.")
    share_context_forward: bool = option(True, help="Encode each distinct context (a GRPO group's prompt; the prompt + path an SPO-tree/TreePO node's children continue) once per micro-batch and fork its KV cache to the rows that continue it: the same log-probs and gradients as encoding every row in full, with the shared tokens computed once. Off automatically under model.gradient_checkpointing.")
    skip_zero_advantage_rows: bool = option(True, help="Leave rows whose loss-masked advantages are all 0 (e.g. every completion of a group with equal rewards) out of the forward/backward: with beta = 0 they add exactly 0 to the loss and gradient, and the loss normalisers still count them, so the update is unchanged (not applied with beta > 0 or loss_type=bnpo, where they do matter). The entropy and clip-ratio metrics then cover the trained rows.")
    max_tokens_per_micro_batch: int = option(0, help="Also cap a micro-batch at this many padded tokens (rows x longest row; 0 = no cap): bounds activation memory when lengths vary.")
    num_iterations: int = option(1, help="PPO epochs over each rollout batch (mu in the GRPO paper).")
    learning_rate: float = option(1e-4, help="AdamW learning rate (2e-4 degrades the embedded model, 1e-4 raised it ~10 points in 80 steps; TRL's default 1e-6 is for billion-parameter models).")
    lr_scheduler_type: str = option("constant_with_warmup", help="constant_with_warmup | linear | cosine.", choices=("constant", "constant_with_warmup", "linear", "cosine"))
    warmup_steps: int = option(3, help="Linear warm-up optimizer steps.")
    weight_decay: float = option(0.0, help="AdamW weight decay.")
    adam_beta1: float = option(0.9, help="AdamW beta1.")
    adam_beta2: float = option(0.99, help="AdamW beta2.")
    max_grad_norm: float = option(1.0, help="Gradient clipping norm (0 = off).")
    epsilon: float = option(0.2, help="Lower clip range of the PPO ratio.")
    epsilon_high: float | None = option(None, help="Upper clip range (DAPO clip-higher, e.g. 0.28); default = epsilon.")
    dual_clip: float | None = option(None, help="Dual-clip constant c for negative advantages (e.g. 10.0; off by default).")
    beta: float = option(0.0, help="KL coefficient (k3 estimator, in the loss) against the frozen initial model; 0 loads no reference model.")
    loss_type: str = option("dapo", help="grpo | bnpo | dr_grpo | dapo (TRL's meanings; dapo = token mean over the whole batch).")
    scale_rewards: str = option("group", help="GRPO advantage scaling: group | batch | none (Dr. GRPO).", choices=("group", "batch", "none"))
    mask_truncated_completions: bool = option(False, help="Exclude completions cut off at max_completion_length from the loss (DAPO).")
    use_prob_mask: bool | None = option(None, help="Train only tokens whose sampling probability is below prob_mask_rho (SPO). Default: on for SPO, off otherwise.")
    prob_mask_rho: float = option(0.9, help="Probability threshold rho of the probability mask and of SPO cutpoints.")
    seed: int = option(0, help="Seed of everything random in training (data order, sampling, init).")
    deterministic: bool | None = option(None, help=(
        "Use torch's deterministic kernels (torch.use_deterministic_algorithms), so that the same seed, machine and --threads "
        "give the same run. Default: on for CPU runs (with several threads a KV-gather backward otherwise adds in thread order), "
        "off on GPUs (slower kernels there). See docs/reliability.md for what is and is not reproducible."
    ))

    def __post_init__(self):
        check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        check(0 <= self.seed <= MAX_SEED, "train.seed", f"must be in [0, 2**32 - 1] (a 32-bit seed), got {self.seed}")
        check(self.max_generated_tokens >= 0, "train.max_generated_tokens", "must be >= 0 (0 = off)")
        check(self.prompts_per_step > 0, "train.prompts_per_step", "must be > 0")
        check(self.num_generations >= 1, "train.num_generations", "must be >= 1")
        check(self.micro_batch_size > 0, "train.micro_batch_size", "must be > 0")
        check(self.max_tokens_per_micro_batch >= 0, "train.max_tokens_per_micro_batch", "must be >= 0")
        check(self.num_iterations >= 1, "train.num_iterations", "must be >= 1")
        check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        check(0 < self.epsilon < 1, "train.epsilon", "must be in (0, 1)")
        check(self.epsilon_high is None or self.epsilon_high > 0, "train.epsilon_high", "must be > 0")
        check(self.dual_clip is None or self.dual_clip > 1, "train.dual_clip", "must be > 1")
        check(self.beta >= 0, "train.beta", "must be >= 0")
        check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        check(0 < self.prob_mask_rho <= 1, "train.prob_mask_rho", "must be in (0, 1]")
        checks.check_name(self.algo, "train.algo", checks.algorithm_names())
        checks.check_name(self.loss_type, "train.loss_type", checks.loss_types())
        checks.check_name(self.adv_estimator, "train.adv_estimator", ("auto", *checks.estimator_names()))
        self.rollout = checks.canonical_sampler(self.rollout)
        checks.check_name(self.rollout, "train.rollout", ("auto", *checks.sampler_names()))
        if self.algo in ("grpo", "rloo"):
            check(self.num_generations >= 2, "train.num_generations", f"{self.algo} needs groups of at least 2")


@dataclass
class EvalConfig:
    """Held-out evaluation: pass@1 (mean over samples), pass@k and maj@k."""

    num_problems: int = option(200, help="Held-out problems evaluated.")
    num_samples: int = option(4, help="Samples per problem (k of pass@k / maj@k).")
    temperature: float | None = option(None, help="Sampling temperature for evaluation (default: the training temperature; 0 = greedy).")
    eval_steps: int = option(0, help="Evaluate every this many steps during training (0 = only before and after).")
    eval_every_tokens: int = option(0, help="Also evaluate during training each time the generated-token count (train.max_generated_tokens' count) passes a multiple of this (0 = off): evaluation points that line up across methods whose steps cost different numbers of tokens. A step passing several multiples triggers one evaluation.")
    eval_before: bool = option(True, help="Evaluate the initial model before training.")
    eval_after: bool = option(True, help="Evaluate the final model after training.")
    rollout: str = option(
        "group",
        help="How evaluation samples are drawn (the train.rollout vocabulary, samplers that give exactly num_samples leaves per "
        "problem): 'group' (independent samples; old name 'independent') or 'treepo' (TreePO trees, treepo.eval_divergence).",
    )

    def __post_init__(self):
        check(self.num_problems > 0, "eval.num_problems", "must be > 0")
        check(self.num_samples > 0, "eval.num_samples", "must be > 0")
        check(self.temperature is None or self.temperature >= 0, "eval.temperature", "must be >= 0")
        check(self.eval_steps >= 0, "eval.eval_steps", "must be >= 0")
        check(self.eval_every_tokens >= 0, "eval.eval_every_tokens", "must be >= 0 (0 = off)")
        self.rollout = checks.canonical_sampler(self.rollout)
        checks.check_name(self.rollout, "eval.rollout", checks.sampler_names(for_eval=True))


@dataclass
class LogConfig:
    """Where a run writes, and how often."""

    output_dir: str | None = option(None, help="Run directory (default runs/<algo>-<timestamp>).")
    logging_steps: int = option(1, help="Print metrics every this many steps (every step goes to metrics.jsonl).")
    report_to: list[str] = option(["tensorboard"], help="Loggers besides metrics.jsonl: tensorboard (or none).")
    save_steps: int = option(0, help="Checkpoint every this many steps (0 = only at the end).")
    save_total_limit: int = option(2, help="Checkpoints kept (oldest deleted first).")
    save_rollouts: bool = option(True, help="Append each step's rollout trees to rollouts.jsonl.")
    progress: bool = option(True, help="Show a rich progress bar.")

    def __post_init__(self):
        check(self.logging_steps > 0, "log.logging_steps", "must be > 0")
        check(self.save_steps >= 0, "log.save_steps", "must be >= 0")
        check(self.save_total_limit >= 1, "log.save_total_limit", "must be >= 1")
        for r in self.report_to:
            check(r in ("tensorboard", "none"), "log.report_to", f"unknown logger {r!r} (tensorboard, none)")
