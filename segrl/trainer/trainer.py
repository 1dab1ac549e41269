"""The training loop: rollout -> rewards -> advantages -> clipped policy-gradient update.

One readable loop (tiny-grpo / nanochat style). Each step:

1. take ``prompts_per_step`` prompts (a seeded permutation, resumable);
2. the algorithm grows their rollout trees with the engine and scores the leaves;
3. the algorithm turns the trees into :class:`TrainSample` s with per-token advantages;
4. ``num_iterations`` passes of micro-batched forward/backward and one optimizer step each.

Evaluation runs before and after (and every ``eval.eval_steps``); checkpoints are atomic
and ``resume`` continues a run exactly (same data order and RNG streams).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import distributed as segrl_dist
from ..algos.samples import TrainSample
from ..configs import SegrlConfig, to_dict
from ..engine.base import SamplingParams
from ..engine.registry import make_engine
from ..models.loading import encode_prompt
from ..tasks.base import Task
from ..tree import FinishReason, RolloutTree, save_jsonl
from . import outputs, update
from .algorithms import get_algorithm
from .batching import Batch, collate
from .checkpointing import resume_run, save_run
from .determinism import deterministic_algorithms
from .determinism import wanted as deterministic_wanted
from .errors import TrainingError
from .evaluate import EvalResult, evaluate_config
from .faults import maybe_kill
from .logging import MetricsLogger
from .policy import wrap_policy
from .prompts import PromptStream
from .run_dir import DiskFullError, RunDir, RunDirError, discard_run_dir_on_failure, disk_full
from .scoring import Scorer
from .signals import stop_signals

__all__ = ["Trainer", "TrainingError"]

from transformers.utils import logging as _hf_logging

_hf_logging.disable_progress_bar()  # no "Writing model shards" bars in the run log


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Trainer:
    """Runs one training job described by a :class:`SegrlConfig`.

    ``model``/``tokenizer``/``task``/``reward_funcs`` may be passed in directly (library use,
    like TRL's ``GRPOTrainer(model, reward_funcs, train_dataset=...)``); otherwise they are
    built from the config.
    """

    @discard_run_dir_on_failure
    def __init__(
        self,
        cfg: SegrlConfig,
        model=None,
        tokenizer=None,
        task: Task | None = None,
        reward_funcs: Sequence | None = None,
        run_dir: str | Path | None = None,
        console=None,
    ):
        self.cfg = cfg
        _seed_everything(cfg.train.seed)
        # torchrun: join the process group (no-op in one process); each rank trains on its
        # own slice of the prompts (segrl.distributed)
        self.dist = segrl_dist.setup(cfg.distributed.backend, cfg.distributed.strategy, cfg.model.device)
        cfg.model.device = segrl_dist.rank_device(cfg.model.device, self.dist)
        # The run directory first: a second writer is refused before any model is loaded.
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run = RunDir.open(run_dir or cfg.log.output_dir or f"runs/{cfg.train.algo}-{stamp}", lock=self.dist.is_main)
        self.run_dir = self.run.path
        if not self.run.holds_run():  # at once, so a run killed while starting can be resumed
            self._write_config()  # (a resume rewrites it once its checks have passed)
        maybe_kill("started")
        if task is None:  # before the model: bad data fails fast (a failed start removes the new run directory)
            from ..tasks.registry import load_task

            task = load_task(cfg.data)
        self.task = task
        if model is None:
            from ..models.loading import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(cfg.model)
        if cfg.lora.r > 0:
            from ..models.lora import apply_lora

            model = apply_lora(model, cfg.lora)
        self.model, self.tokenizer = model, tokenizer
        self._open_logs(console)
        stops = tuple(cfg.sampling.stop_strings) + tuple(task.stop_strings)
        self.engine = make_engine(
            cfg,
            self.model,
            self.tokenizer,
            params=SamplingParams(cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.top_k, stops),
            seed=cfg.train.seed + 1009 * self.dist.rank,
        )
        self.scorer = Scorer(task, list(reward_funcs or []), cfg.data, self.tokenizer)
        self.prompt_ids = self._tokenize_prompts(task.train)
        self._check_test_prompts()
        # the seeded, resumable prompt order; dynamic sampling pulls more prompts from it
        self.prompts = PromptStream(self.prompt_ids, task.train, cfg.train.seed, self._skip, self.dist.rank, self.dist.world_size)
        self.algorithm = get_algorithm(cfg.train.algo)(cfg, prompts=self.prompts)
        self._build_optimizer()
        self.step = 0
        self.num_tokens = 0
        self.generated_tokens = 0  # tokens the engine decoded in training (train.max_generated_tokens)
        self.elapsed_s = 0.0  # training wall-clock before this process (a resumed run continues it)
        self.eval_s = 0.0  # held-out evaluation seconds, kept out of elapsed_s
        self._clock_start: float | None = None
        self.skipped_updates = 0
        self._stop_signal: int | None = None
        self._saved_step: int | None = None  # step of the newest checkpoint written or loaded

    def _open_logs(self, console) -> None:
        """``metrics.jsonl``'s logger and the console (other torchrun ranks log to run_dir/rankN,
        quietly). TensorBoard opens when :meth:`train` starts: a resume first
        decides where its log goes on."""
        main = self.dist.is_main
        log_dir = self.run_dir if main else self.run_dir / f"rank{self.dist.rank}"
        log_dir.mkdir(parents=True, exist_ok=True)
        if not main and console is None:
            from rich.console import Console

            console = Console(quiet=True)
        self.logger = MetricsLogger(log_dir, [], console)
        self.console = self.logger.console
        lock = self.run.lock
        if lock is not None and lock.previous_pid:
            self.console.print(f"[yellow]took over the lock of {self.run_dir} from PID {lock.previous_pid} (no longer running)[/yellow]")

    # ----- data ------------------------------------------------------------------------
    def _tokenize_prompts(self, rows) -> list[list[int]]:
        ids = [encode_prompt(self.tokenizer, r["prompt"]) for r in rows]  # chat template if set up
        too_long = [i for i, x in enumerate(ids) if len(x) > self.cfg.data.max_prompt_length]
        if too_long:
            # Tasks read from files say where each row came from (``row_sources``).
            i0 = too_long[0]
            where = self._row_source(rows[i0], "train", i0)
            msg = (
                f"{len(too_long)} prompt(s) longer than data.max_prompt_length={self.cfg.data.max_prompt_length} tokens "
                f"(first: {where}, {len(ids[i0])} tokens)"
            )
            if not self.cfg.data.skip_bad_rows:
                raise TrainingError(msg + "; raise the limit or pass --skip-bad-rows")
            self.console.print(f"[yellow]skipping {msg}[/yellow]")
            self._skip = set(too_long)
        else:
            self._skip = set()
        return ids

    def _check_test_prompts(self) -> None:
        """Held-out prompts over ``data.max_prompt_length`` are bad rows too (dropped with
        ``skip_bad_rows``, else the run stops naming the first one)."""
        limit = self.cfg.data.max_prompt_length
        test = list(self.task.test)
        too_long = [i for i, r in enumerate(test) if len(encode_prompt(self.tokenizer, r["prompt"])) > limit]
        if not too_long:
            return
        msg = f"{len(too_long)} held-out prompt(s) longer than data.max_prompt_length={limit} tokens (first: {self._row_source(test[too_long[0]], 'test', too_long[0])})"
        if not self.cfg.data.skip_bad_rows:
            raise TrainingError(msg + "; raise the limit or pass --skip-bad-rows")
        self.console.print(f"[yellow]skipping {msg}[/yellow]")
        drop = set(too_long)
        self.task.test = [r for i, r in enumerate(test) if i not in drop]

    def _row_source(self, row: dict, split: str, i: int) -> str:
        """Where a row came from: ``FILE: row N`` for file tasks (error messages only)."""
        d = self.cfg.data
        files = [d.test_file] if split == "test" and d.test_file else [d.train_file]
        if d.task == "file":
            for f in files:
                if not isinstance(f, str):
                    continue
                try:  # read the file again with row numbers as ids
                    from ..tasks.math_datasets import load_rows

                    again = load_rows(f, d.prompt_column, d.answer_column, skip_bad_rows=True, id_column="\0row")
                    for r in again.rows:
                        if r["prompt"] == row["prompt"]:
                            return f"{f}: row {r['id']}"
                except Exception:  # noqa: BLE001 - the message is a courtesy
                    pass
        return f"{split} row {i + 1}"

    def new_trees(self, n: int) -> list[RolloutTree]:
        """Fresh root trees for the next ``n`` prompts (:meth:`PromptStream.next_trees`)."""
        return self.prompts.next_trees(n)

    # ----- model helpers ---------------------------------------------------------------
    def _build_optimizer(self) -> None:
        """The policy module, AdamW, the lr schedule and (``train.beta > 0``) the reference."""
        t = self.cfg.train
        # forward/backward run through self.policy (DDP / FSDP2 under torchrun); the engine
        # samples with the unwrapped self.model
        self.policy = wrap_policy(self.model, self.dist, self.cfg.model.device)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
        from transformers import get_scheduler

        steps = max(1, t.max_steps * t.num_iterations)
        self.scheduler = get_scheduler(t.lr_scheduler_type, self.optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=steps)
        self.ref_model = self._make_reference() if t.beta > 0 else None

    def _make_reference(self):
        if hasattr(self.model, "disable_adapter"):
            return "adapters-disabled"  # PEFT: the base model with adapters off is the reference
        ref = copy.deepcopy(self.model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    @property
    def share_contexts(self) -> bool:
        # gradient checkpointing recomputes the forward without a KV cache to share
        return self.cfg.train.share_context_forward and not self.cfg.model.gradient_checkpointing

    # ----- one optimisation step -------------------------------------------------------
    def optimize(self, samples: list[TrainSample]) -> dict[str, float]:
        """``num_iterations`` passes over ``samples``, one optimizer step per pass
        (:func:`segrl.trainer.update.optimize`)."""
        return update.optimize(self, samples)

    def _collate(self, batch: Sequence[TrainSample], pad_id: int) -> Batch:
        return collate(batch, pad_id, self.share_contexts).to(self.cfg.model.device)

    def _ref_logprobs(self, batch: Batch) -> torch.Tensor:
        return update.ref_logprobs(self, batch)

    # ----- metrics ---------------------------------------------------------------------
    def rollout_metrics(self, trees: list[RolloutTree], samples: list[TrainSample]) -> dict[str, float]:
        leaves = [(t, l) for t in trees for l in t.leaves(include_mc=False)]
        rewards = [float(t[l].reward) for t, l in leaves]
        lens = [t.completion_len(l) for t, l in leaves]
        groups: dict[int, list[float]] = {}
        for (t, _), r in zip(leaves, rewards):
            groups.setdefault(t.group, []).append(r)
        stds = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in groups.values()]
        truncated = [t[l].finish_reason in FinishReason.TRUNCATED for t, l in leaves]
        resp_tok = sum(len(s.response) for s in samples)
        kept = sum(sum(s.mask) for s in samples)
        n_tok = sum(len(t.prompt_ids()) for t in trees) + sum(t.num_generated_tokens() for t in trees)
        self.num_tokens += n_tok
        return {
            "reward": float(np.mean(rewards)) if rewards else 0.0,
            "reward_std": float(np.mean(stds)) if stds else 0.0,
            "frac_reward_zero_std": float(np.mean([s == 0 for s in stds])) if stds else 0.0,
            "completions/mean_length": float(np.mean(lens)) if lens else 0.0,
            "completions/min_length": float(min(lens)) if lens else 0.0,
            "completions/max_length": float(max(lens)) if lens else 0.0,
            "completions/clipped_ratio": float(np.mean(truncated)) if truncated else 0.0,
            "num_tokens": float(self.num_tokens),
            "train/samples": float(len(samples)),
            "train/masked_token_fraction": 1.0 - kept / max(resp_tok, 1),
        }

    # ----- evaluation ------------------------------------------------------------------
    def evaluate(self) -> EvalResult:
        with segrl_dist.gathered_for_rollout(self.policy):  # FSDP2: full weights for sampling
            return evaluate_config(self.model, self.tokenizer, self.task, self.cfg)  # what `segrl eval` runs

    # ----- checkpoints -----------------------------------------------------------------
    def _write_config(self) -> None:
        if self.dist.is_main:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))

    def save(self, extra: dict | None = None) -> Path:
        """Checkpoint the run at this step (:func:`segrl.trainer.checkpointing.save_run`)."""
        return save_run(self, extra or {})

    def resume(self, path: str | Path | None = None) -> dict:
        """Restore the newest checkpoint of this run that verifies, reads and fits (or
        ``path``): :func:`segrl.trainer.checkpointing.resume_run`."""
        return resume_run(self, path)

    # ----- the loop --------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # a second Ctrl-C: stop now (the last checkpoint is intact)
            raise KeyboardInterrupt
        self._stop_signal = signum
        self.console.print(f"[yellow]signal {signum}: saving a checkpoint after this step, then exiting[/yellow]")

    def train(self, resume: bool | str = False) -> dict:
        """Run (or, with ``resume``, continue) training; return the before/after summary
        (``summary["run_dir"]``: where the run's files are).

        SIGINT/SIGTERM make the loop save a checkpoint after the current step and return
        (``summary["interrupted_at_step"]``); a second signal stops at once. A full disk ends
        the run with :class:`DiskFullError` (the last checkpoint stays usable)."""
        det = deterministic_wanted(self.cfg.train.deterministic, next(self.model.parameters()).device)
        if self.dist.is_main:
            self.run.lock_again()  # (a second train() of this trainer: the first one released it)
        try:
            with stop_signals(self._on_signal), deterministic_algorithms(det):
                summary = self._train(resume)
            self._write_report()
            if self.dist.is_main:
                outputs.print_where(self.console, self.run_dir)
        except OSError as e:  # metrics.jsonl, rollouts.jsonl, TensorBoard, the report
            full = disk_full(e, self.run_dir, getattr(e, "filename", None) or self.run_dir)
            if not full:
                raise
            raise DiskFullError(f"{full}; the last checkpoint is intact: free space, then continue with --resume {self.run_dir}") from None
        finally:
            try:
                self.logger.close()
            except OSError:  # (TensorBoard flushing onto a full disk: the error above says it)
                pass
            self.run.release()
        return {**summary, "run_dir": str(self.run_dir)}

    def _write_report(self) -> None:
        """``report.html`` + ``trees.html`` (rank 0); a failure is only a warning."""
        if self.dist.is_main:
            outputs.write_report(self.run_dir, self.tokenizer, self.console)

    def _interrupted(self, summary: dict) -> dict:
        if self._saved_step != self.step:
            self.save({"summary": summary})
        summary["interrupted_at_step"] = self.step
        self.console.print(f"[yellow]stopped at step {self.step}; checkpoint saved; continue with --resume {self.run_dir}[/yellow]")
        return summary

    def _start(self, resume: bool | str) -> dict:
        """Resume (or check that a fresh start overwrites nothing), open TensorBoard, run the
        evaluation before training; returns the summary so far."""
        state = {}
        if resume:
            state = self.resume(None if resume is True else resume)
        elif self.dist.is_main and self.run.holds_run():
            raise RunDirError(
                f"{self.run_dir} already holds a run; continue it with --resume {self.run_dir}, or choose another --log.output_dir"
            )
        if self.ref_model is not None and self.ref_model != "adapters-disabled" and state:
            # The reference is the *initial* policy: reload it from the model source.
            from ..models.loading import load_model_and_tokenizer

            self.ref_model = load_model_and_tokenizer(self.cfg.model)[0].eval()
        if self.dist.is_main and "tensorboard" in self.cfg.log.report_to:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events logged after its checkpoint
            self.logger.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1 if state else None)
        summary: dict = dict(state.get("summary", {}))
        self._clock_start = time.perf_counter()  # training wall-clock runs from here (evals excluded)
        if self.cfg.eval.eval_before and "before" not in summary:
            res = self._evaluate_and_log()
            summary["before"] = res.as_metrics("")
            self.console.print(
                f"[bold]held-out before training[/bold]: pass@1={res.pass_at_1:.3f} pass@{res.k}={res.pass_at_k:.3f} "
                f"maj@{res.k}={res.maj_at_k:.3f} on {res.num_problems} problems"
            )
        return summary

    def _train(self, resume: bool | str) -> dict:
        cfg = self.cfg
        t, e = cfg.train, cfg.eval
        summary = self._start(resume)
        if self._stop_signal is not None:
            return self._interrupted(summary)
        next_eval_tokens = self._next_eval_tokens()
        with outputs.ProgressBar(self, cfg.log.progress and self.console.is_terminal) as bar:  # no bars in log files
            while self.step < t.max_steps and not self.token_budget_reached():
                metrics = self.train_step()
                bar.update(metrics)
                # periodic evaluations, by steps and/or by generated tokens; none when the run
                # ends here anyway (the final evaluation follows)
                last = self.step >= t.max_steps or self.token_budget_reached()
                by_tokens = next_eval_tokens is not None and self.generated_tokens >= next_eval_tokens
                if by_tokens:
                    next_eval_tokens = self._next_eval_tokens()
                if not last and ((e.eval_steps and self.step % e.eval_steps == 0) or by_tokens):
                    self._evaluate_and_log()
                if cfg.log.save_steps and self.step % cfg.log.save_steps == 0:
                    self.save({"summary": summary})
                if self._stop_signal is not None:
                    return self._interrupted(summary)
        return self._finish(summary)

    def _finish(self, summary: dict) -> dict:
        """Final evaluation, final checkpoint, ``final_model/`` and ``summary.json``."""
        self.model = segrl_dist.export_view(self.model, self.policy)  # FSDP2: a full copy for the final save
        segrl_dist.unshard_for_export(self.policy)  # FSDP2: full weights from here on (final eval)
        if self.cfg.eval.eval_after and "after" not in summary:
            res = self._evaluate_and_log()
            summary["after"] = res.as_metrics("")
        if self._saved_step != self.step:
            # (If this step is already checkpointed, a resume re-runs the deterministic
            # final evaluation instead of rewriting the checkpoint.)
            self.save({"summary": summary})
        if not self.dist.is_main:  # rank 0 writes the final model and the summary
            return summary
        outputs.save_final_model(self.run_dir, self.model, self.tokenizer, self.step)
        if "before" in summary and "after" in summary:
            self.logger.table("held-out accuracy", {"before": summary["before"], "after": summary["after"]})
        outputs.write_summary(self.run_dir, summary)
        return summary

    # ----- budget and clock (accuracy vs generated tokens / wall-clock) --------------------
    def _clock(self) -> float:
        """Training wall-clock seconds: time in :meth:`train` minus held-out evaluations
        (same eval cost for every method, so it is kept out of comparisons), plus the time
        of the run before a resume."""
        if self._clock_start is None:
            return self.elapsed_s
        return self.elapsed_s + time.perf_counter() - self._clock_start

    def progress_metrics(self) -> dict[str, float]:
        """Where the run stands, carried by every metrics row (steps and evaluations):
        ``tokens/generated`` (cumulative decoded tokens), ``timing/elapsed_s`` (training
        wall-clock, evaluations excluded), ``timing/eval_s`` (evaluation seconds so far)."""
        return {"tokens/generated": float(self.generated_tokens), "timing/elapsed_s": self._clock(), "timing/eval_s": self.eval_s}

    def token_budget_reached(self) -> bool:
        cap = self.cfg.train.max_generated_tokens
        return cap > 0 and self.generated_tokens >= cap

    def _next_eval_tokens(self) -> int | None:
        """The next multiple of ``eval.eval_every_tokens`` above the tokens generated so far."""
        every = self.cfg.eval.eval_every_tokens
        return (self.generated_tokens // every + 1) * every if every > 0 else None

    def _evaluate_and_log(self) -> EvalResult:
        t0 = time.perf_counter()
        res = self.evaluate()
        dt = time.perf_counter() - t0
        self.eval_s += dt
        if self._clock_start is not None:
            self._clock_start += dt  # stop the training clock while evaluating
        self.logger.log(self.step, {**res.as_metrics("eval/"), **self.progress_metrics()})
        return res

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        maybe_kill("step_start", self.step + 1)
        self.prompts.new_step()
        trees = self.prompts.next_trees(self.cfg.train.prompts_per_step)
        self.engine.reset_stats()
        progress = self.step / max(self.cfg.train.max_steps, 1)  # TreePO's divergence-temperature schedule
        with segrl_dist.gathered_for_rollout(self.policy):  # FSDP2: full weights for sampling
            roll = self.algorithm.rollout(self.engine, trees, self.scorer, progress)
        trees = roll.trees  # dynamic sampling may replace the batch
        stats = self.engine.stats
        t1 = time.perf_counter()
        samples, adv_metrics = self.algorithm.samples(trees)
        metrics = {**self.rollout_metrics(trees, samples), **roll.metrics, **adv_metrics}
        metrics["tree/decoded_tokens"] = float(stats.decode_tokens)
        # the budget counts every rank's tokens, so that all ranks stop at the same step
        self.generated_tokens += int(segrl_dist.all_reduce_sum(stats.decode_tokens))
        metrics["tree/prefill_tokens"] = float(stats.prefill_tokens)
        maybe_kill("after_rollout", self.step + 1)
        if samples or self.dist.enabled:
            metrics.update(self.optimize(samples))
            if hasattr(self.engine, "sync_weights"):  # vLLM backend: sample with the new weights
                self.engine.sync_weights(self.model)
        t2 = time.perf_counter()
        self.step += 1
        metrics.update({"timing/rollout": t1 - t0, "timing/train": t2 - t1, "step_time": t2 - t0, "epoch": float(self.prompts.epoch)})
        metrics.update(self.progress_metrics())
        if self.cfg.log.save_rollouts:
            for tr in trees:
                tr.row = {**tr.row, "step": self.step}
            name = "rollouts.jsonl" if self.dist.is_main else f"rollouts.rank{self.dist.rank}.jsonl"
            save_jsonl(trees, self.run_dir / name, append=True)
        self.logger.log(self.step, metrics, echo=self.step % self.cfg.log.logging_steps == 0)
        maybe_kill("after_step", self.step)
        return metrics
