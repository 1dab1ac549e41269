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
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml

from .. import distributed as segrl_dist
from ..algos.losses import LossNormalizer, policy_loss
from ..algos.samples import TrainSample
from ..configs import SegrlConfig, to_dict
from ..models.loading import encode_prompt
from ..engine.hf_engine import Engine, SamplingParams
from ..tasks.base import Task
from ..tree import FinishReason, RolloutTree, save_jsonl
from .batching import Batch, collate, micro_batches, sort_for_sharing
from . import checkpoint as ckpt
from .algorithms import get_algorithm
from .evaluate import EvalResult, evaluate
from .faults import maybe_kill
from .logging import MetricsLogger
from .policy import LogProbModule, wrap_policy
from .scoring import Scorer


class TrainingError(RuntimeError):
    pass


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
        if model is None:
            from ..models.loading import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(cfg.model)
        if cfg.lora.r > 0:
            from ..models.lora import apply_lora

            model = apply_lora(model, cfg.lora)
        self.model, self.tokenizer = model, tokenizer
        if task is None:
            from ..tasks.registry import load_task

            task = load_task(cfg.data)
        self.task = task
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(run_dir or cfg.log.output_dir or f"runs/{cfg.train.algo}-{stamp}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        main = self.dist.is_main  # other ranks log to run_dir/rankN, quietly
        log_dir = self.run_dir if main else self.run_dir / f"rank{self.dist.rank}"
        log_dir.mkdir(parents=True, exist_ok=True)
        if not main and console is None:
            from rich.console import Console

            console = Console(quiet=True)
        self.logger = MetricsLogger(log_dir, cfg.log.report_to if main else [], console)
        self.console = self.logger.console
        self.algorithm = get_algorithm(cfg.train.algo)(cfg)
        self.algorithm.new_trees = self.new_trees  # dynamic sampling tops batches up with it
        self._group_counter = 0
        stops = tuple(cfg.sampling.stop_strings) + tuple(task.stop_strings)
        engine_cls = Engine
        if cfg.sampling.backend == "vllm":  # same interface; weights synced after each update
            from ..engine.vllm_engine import vllm_engine_for

            engine_cls = vllm_engine_for(cfg)
        self.engine = engine_cls(
            self.model,
            self.tokenizer,
            SamplingParams(cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.top_k, stops),
            max_batch_size=cfg.sampling.max_batch_size,
            seed=cfg.train.seed + 1009 * self.dist.rank,
        )
        self.scorer = Scorer(task, list(reward_funcs or []), cfg.data, self.tokenizer)
        self.prompt_ids = self._tokenize_prompts(task.train)
        self._check_test_prompts()
        t = cfg.train
        # forward/backward run through self.policy (DDP / FSDP2 under torchrun); the engine
        # samples with the unwrapped self.model
        self.policy = wrap_policy(self.model, self.dist, cfg.model.device)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            t.lr_scheduler_type, self.optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=max(1, t.max_steps * t.num_iterations)
        )
        self.ref_model = None
        if t.beta > 0:
            self.ref_model = self._make_reference()
        self.step = 0
        self.epoch = 0
        self.cursor = 0
        self.order = self._permutation(0)
        self.num_tokens = 0
        self.generated_tokens = 0  # tokens the engine decoded in training (train.max_generated_tokens)
        self.elapsed_s = 0.0  # training wall-clock before this process (a resumed run continues it)
        self.eval_s = 0.0  # held-out evaluation seconds, kept out of elapsed_s
        self._clock_start: float | None = None
        self.skipped_updates = 0
        self._stop_signal: int | None = None
        self._saved_step: int | None = None  # step of the newest checkpoint written or loaded

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

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1000003 + epoch)
        return [i for i in torch.randperm(len(self.prompt_ids), generator=g).tolist() if i not in self._skip]

    def _next_rows(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.cursor >= len(self.order):
                self.epoch += 1
                self.cursor = 0
                self.order = self._permutation(self.epoch)
            out.append(self.order[self.cursor])
            self.cursor += 1
        return out

    def new_trees(self, n: int) -> list[RolloutTree]:
        """Fresh root trees for the next ``n`` prompts (also used by dynamic sampling).

        Group ids are unique within a step (a counter reset at each step's start)."""
        W = self.dist.world_size  # torchrun: n prompts per rank, disjoint slices of one order
        idx = segrl_dist.shard(self._next_rows(n * W), self.dist)
        g0, self._group_counter = self._group_counter, self._group_counter + n
        return [RolloutTree(self.prompt_ids[i], group=(g0 + g) * W + self.dist.rank, row=self.task.train[i]) for g, i in enumerate(idx)]

    # ----- model helpers ---------------------------------------------------------------
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

    def _collate(self, batch: Sequence[TrainSample], pad_id: int) -> Batch:
        return collate(batch, pad_id, self.share_contexts).to(self.cfg.model.device)

    def _ref_logprobs(self, batch: Batch):
        temp = self.cfg.sampling.temperature
        chunk = self.cfg.model.logprob_chunk_size
        with torch.no_grad():
            if self.ref_model == "adapters-disabled":
                with self.model.disable_adapter():
                    return self.policy(batch, temp, chunk, self.share_contexts)[0]
            return LogProbModule(self.ref_model)(batch, temp, chunk, self.share_contexts)[0]

    # ----- one optimisation step -------------------------------------------------------
    def optimize(self, samples: list[TrainSample]) -> dict[str, float]:
        """``num_iterations`` passes over ``samples``, one optimizer step per pass."""
        t = self.cfg.train
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        n_seq = segrl_dist.all_reduce_sum(len(samples))  # batch-wide counts are over all ranks
        if n_seq == 0:
            return {}
        if not samples:  # torchrun: nothing here, but this rank must join the gradient all-reduce
            samples = [TrainSample([pad], [pad], [0.0], [0.0], [0])]
        num_tokens = segrl_dist.all_reduce_sum(sum(sum(s.mask) for s in samples))
        n_all, skipped = len(samples), 0
        if t.skip_zero_advantage_rows and t.beta == 0 and t.loss_type != "bnpo":
            # A row whose loss-masked advantages are all 0 (e.g. a group with equal rewards)
            # adds exactly 0 to the loss and its gradient when there is no KL term: skip its
            # forward/backward. The normalisers count it all the same, so the update is
            # unchanged (bnpo normalises per micro-batch, so there every row stays).
            samples = [s for s in samples if any(a != 0.0 for a, m in zip(s.advantages, s.mask) if m)]
            skipped = n_all - len(samples)
            if not samples:  # still one (all-masked) pass: zero gradients, same optimizer step
                samples = [TrainSample([pad], [pad], [0.0], [0.0], [0])]
        samples = sort_for_sharing(samples)
        mbs = micro_batches(samples, t.micro_batch_size, t.max_tokens_per_micro_batch)
        batches = [self._collate(mb, pad) for mb in mbs]
        refs = [self._ref_logprobs(b) for b in batches] if self.ref_model is not None else [None] * len(batches)
        norm = LossNormalizer(
            num_tokens=num_tokens,
            num_sequences=n_seq,
            num_micro_batches=int(segrl_dist.all_reduce_sum(len(batches))),
            max_completion_length=self.cfg.sampling.max_completion_length,
        )
        agg: dict[str, float] = {}
        self.model.train()
        for _ in range(t.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            total_loss = 0.0
            for bi, (b, ref) in enumerate(zip(batches, refs)):
                # gradients are all-reduced on the last micro-batch only (accumulation)
                with segrl_dist.grad_sync(self.policy, bi == len(batches) - 1):
                    logp, ent = self.policy(b, self.cfg.sampling.temperature, self.cfg.model.logprob_chunk_size, self.share_contexts)
                    loss, sums = policy_loss(
                        logp, b.old, b.adv, b.mask, norm, t.loss_type, t.epsilon, t.epsilon_high, t.dual_clip, t.beta, ref
                    )
                    # the normalisers are global and DDP/FSDP average over ranks: x world size
                    (loss * self.dist.world_size).backward()
                total_loss += float(loss.detach())
                sums["entropy"] = float((ent * b.mask).sum())
                for k, v in sums.items():
                    agg[k] = agg.get(k, 0.0) + v
            total_loss = segrl_dist.all_reduce_sum(total_loss)  # every rank takes the same skip decision
            params = [p for p in self.policy.parameters() if p.requires_grad]
            gn = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
            if not (math.isfinite(total_loss) and torch.isfinite(gn)):
                # A NaN/inf never reaches the weights: skip this update, count it, go on.
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_updates += 1
                self.console.print(f"[red]step {self.step + 1}: non-finite loss/grad (loss={total_loss}, grad_norm={float(gn)}); update skipped[/red]")
                if self.skipped_updates >= 5:
                    raise TrainingError("5 updates skipped for non-finite loss or gradients; stopping (last checkpoint is intact)")
            else:
                self.optimizer.step()
            self.scheduler.step()
            agg["loss"] = agg.get("loss", 0.0) + total_loss
            agg["grad_norm"] = agg.get("grad_norm", 0.0) + float(gn)
        n_it = t.num_iterations
        tok = max(agg.get("tokens", 0.0), 1.0)
        out = {
            "loss": agg["loss"] / n_it,
            "grad_norm": agg["grad_norm"] / n_it,
            "entropy": agg["entropy"] / tok,
            "clip_ratio/low_mean": agg["clip_ratio/low"] / tok,
            "clip_ratio/high_mean": agg["clip_ratio/high"] / tok,
            "clip_ratio/region_mean": agg["clip_ratio/region"] / tok,
            "learning_rate": self.scheduler.get_last_lr()[0],
            "train/skipped_updates": float(self.skipped_updates),
            # rows left out of forward/backward because they carry no gradient (see above)
            "train/zero_advantage_rows": float(skipped),
        }
        if "kl" in agg:
            out["kl"] = agg["kl"] / max(agg["kl_tokens"], 1.0)
        return out

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
        e = self.cfg.eval
        temp = self.cfg.sampling.temperature if e.temperature is None else e.temperature
        sampler = None
        if e.rollout == "treepo":
            from ..samplers.treepo import TreePOSampler

            sampler = TreePOSampler(self.cfg).eval_sampler(e.num_samples)
        with segrl_dist.gathered_for_rollout(self.policy):  # FSDP2: full weights for sampling
            return evaluate(
                self.model,
                self.tokenizer,
                self.task,
                num_problems=e.num_problems,
                k=e.num_samples,
                temperature=temp,
                max_new_tokens=self.cfg.sampling.max_completion_length,
                top_p=self.cfg.sampling.top_p,
                seed=self.cfg.train.seed + 7919,
                max_batch_size=self.cfg.sampling.max_batch_size,
                sampler=sampler,
            )

    # ----- checkpoints -----------------------------------------------------------------
    def _state(self, extra: dict) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "num_tokens": self.num_tokens,
            "generated_tokens": self.generated_tokens,
            "elapsed_s": self._clock(),
            "eval_s": self.eval_s,
            "skipped_updates": self.skipped_updates,
            # where metrics.jsonl / rollouts.jsonl ended when this checkpoint was taken: a
            # resumed run cuts them back here so they equal an uninterrupted run's files
            "log_bytes": {name: _size(self.run_dir / name) for name in ("metrics.jsonl", "rollouts.jsonl")},
            "reward_error_windows": [list(w) for w in getattr(self.scorer.computer, "_windows", [])],
            "algorithm": self.algorithm.state_dict(),  # e.g. TreePO's dynamic-sampling keep rate
            "rng": {
                "python": _rng_to_json(random.getstate()),
                "numpy": _rng_to_json(np.random.get_state()),
                "torch": _rng_to_json(torch.get_rng_state()),
                "engine": _rng_to_json(self.engine.state_dict()),
            },
            **extra,
        }

    def save(self, extra: dict | None = None) -> Path:
        if self.dist.enabled:  # torchrun: rank 0 writes (the replicas are identical), the others wait
            d, self.dist = self.dist, dataclasses.replace(self.dist, world_size=1)
            try:
                with segrl_dist.gathered_for_rollout(self.policy):  # FSDP2: every rank gathers
                    m, self.model = self.model, segrl_dist.export_view(self.model, self.policy)
                    try:
                        path = self.save(extra) if d.is_main else None
                    finally:
                        self.model = m
            finally:
                self.dist = d
            segrl_dist.barrier()
            self._saved_step = self.step
            return path
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # never let a NaN/inf reach saved weights
            raise TrainingError(f"step {self.step}: non-finite values in {bad[:3]}; not saving (the last checkpoint is intact)")
        path = ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            self.model,
            self.tokenizer,
            self.optimizer,
            self.scheduler,
            self._state(extra or {}),
            keep=self.cfg.log.save_total_limit,
        )
        self._saved_step = self.step
        return path

    def resume(self, path: str | Path | None = None) -> dict:
        """Restore the newest intact checkpoint of this run (or ``path``)."""
        if self.dist.enabled and self.dist.strategy == "fsdp":
            raise TrainingError("resuming a multi-process FSDP2 run is not supported yet (its optimizer state is sharded); use distributed.strategy=ddp")
        root = self.run_dir / "checkpoints"
        if path is None:
            ckpt.remove_partial(root, log=self.console.print)
            path = ckpt.latest_valid_checkpoint(root, log=self.console.print)
            # Checkpoints newer than the one we resume from are corrupt: move them out of the
            # way (kept for inspection) so that they are neither loaded nor pruned instead of
            # good ones.
            for p in ckpt.list_checkpoints(root):
                if path is None or p.name > Path(path).name:
                    aside = root / f"corrupt-{p.name}"
                    if aside.exists():
                        shutil.rmtree(aside)
                    os.replace(p, aside)
                    self.console.print(f"[yellow]moved corrupt checkpoint {p.name} to {aside}[/yellow]")
            if path is None:
                self.console.print("[yellow]no intact checkpoint found; starting from scratch[/yellow]")
                for name in ("metrics.jsonl", "rollouts.jsonl"):
                    _truncate(self.run_dir / name, 0)
                return {}
        else:
            ckpt.verify_checkpoint(Path(path))
        st = ckpt.load_training_state(Path(path), self.model, self.optimizer, self.scheduler)
        for name, size in st.get("log_bytes", {}).items():
            _truncate(self.run_dir / name, size)
        for w, saved in zip(getattr(self.scorer.computer, "_windows", []), st.get("reward_error_windows", [])):
            w.clear()
            w.extend(saved)
        self._saved_step = st["step"]
        if getattr(self.logger, "tb", None) is not None:  # TensorBoard: drop events past the checkpoint
            from torch.utils.tensorboard import SummaryWriter

            self.logger.tb.close()
            self.logger.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=st["step"] + 1)
        self.step, self.epoch, self.cursor = st["step"], st["epoch"], st["cursor"]
        self.num_tokens, self.skipped_updates = st["num_tokens"], st["skipped_updates"]
        # (older checkpoints lack these: a token budget then counts from the resume)
        self.generated_tokens = st.get("generated_tokens", 0)
        self.elapsed_s, self.eval_s = st.get("elapsed_s", 0.0), st.get("eval_s", 0.0)
        self.order = self._permutation(self.epoch)
        random.setstate(_rng_from_json(st["rng"]["python"]))
        np.random.set_state(_rng_from_json(st["rng"]["numpy"]))
        torch.set_rng_state(_rng_from_json(st["rng"]["torch"]))
        self.engine.load_state_dict(_rng_from_json(st["rng"]["engine"]))
        self.algorithm.load_state_dict(st.get("algorithm", {}))
        self.console.print(f"[green]resumed from {path} (step {self.step})[/green]")
        return st

    # ----- the loop --------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # a second Ctrl-C: stop now (the last checkpoint is intact)
            raise KeyboardInterrupt
        self._stop_signal = signum
        self.console.print(f"[yellow]signal {signum}: saving a checkpoint after this step, then exiting[/yellow]")

    def train(self, resume: bool | str = False) -> dict:
        """Run (or, with ``resume``, continue) training; return the before/after summary.

        SIGINT/SIGTERM make the loop save a checkpoint after the current step and return
        (``summary["interrupted_at_step"]``); a second signal stops at once."""
        import threading

        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            summary = self._train(resume)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
        self._write_report()
        return summary

    def _write_report(self) -> None:
        """``report.html`` + ``trees.html`` (:mod:`segrl.report`); a failure is only a warning."""
        if not self.dist.is_main:
            return
        try:
            from ..report import build_report

            build_report(self.run_dir, tokenizer=self.tokenizer)
        except Exception as e:  # noqa: BLE001 - a report must never fail a finished run
            self.console.print(f"[yellow]warning: report.html not written: {type(e).__name__}: {e}[/yellow]")

    def _interrupted(self, summary: dict) -> dict:
        if self._saved_step != self.step:
            self.save({"summary": summary})
        summary["interrupted_at_step"] = self.step
        self.console.print(f"[yellow]stopped at step {self.step}; checkpoint saved; continue with --resume {self.run_dir}[/yellow]")
        self.logger.close()
        return summary

    def _train(self, resume: bool | str) -> dict:
        cfg = self.cfg
        t, e = cfg.train, cfg.eval
        state = {}
        if resume:
            state = self.resume(None if resume is True else resume)
        if self.ref_model is not None and self.ref_model != "adapters-disabled" and state:
            # The reference is the *initial* policy: reload it from the model source.
            from ..models.loading import load_model_and_tokenizer

            self.ref_model = load_model_and_tokenizer(cfg.model)[0].eval()
        summary: dict = dict(state.get("summary", {}))
        self._clock_start = time.perf_counter()  # training wall-clock runs from here (evals excluded)
        next_eval_tokens = self._next_eval_tokens()
        if e.eval_before and "before" not in summary:
            res = self._evaluate_and_log()
            summary["before"] = res.as_metrics("")
            self.console.print(f"[bold]held-out before training[/bold]: pass@1={res.pass_at_1:.3f} pass@{res.k}={res.pass_at_k:.3f} maj@{res.k}={res.maj_at_k:.3f} on {res.num_problems} problems")
        if self._stop_signal is not None:
            return self._interrupted(summary)
        progress = _progress(self.console) if cfg.log.progress else None
        try:
            # under a token budget the bar counts generated tokens (the step count is open)
            by_tok = t.max_generated_tokens > 0
            done = (lambda: self.generated_tokens) if by_tok else (lambda: self.step)
            task_id = progress.add_task(f"{t.algo}", total=t.max_generated_tokens if by_tok else t.max_steps, completed=done()) if progress else None
            if progress:
                progress.start()
            while self.step < t.max_steps and not self.token_budget_reached():
                metrics = self.train_step()
                if progress:
                    progress.update(task_id, completed=min(done(), t.max_generated_tokens) if by_tok else done(), description=f"{t.algo} reward={metrics['reward']:.3f}")
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
        finally:
            if progress:
                progress.stop()
        self.model = segrl_dist.export_view(self.model, self.policy)  # FSDP2: a full copy for the final save
        segrl_dist.unshard_for_export(self.policy)  # FSDP2: full weights from here on (final eval)
        if e.eval_after and "after" not in summary:
            res = self._evaluate_and_log()
            summary["after"] = res.as_metrics("")
        if self._saved_step != self.step:
            # (If this step is already checkpointed, a resume re-runs the deterministic
            # final evaluation instead of rewriting the checkpoint.)
            self.save({"summary": summary})
        if not self.dist.is_main:  # rank 0 writes the final model and the summary
            self.logger.close()
            return summary
        maybe_kill("before_final_model", self.step)
        final, tmp = self.run_dir / "final_model", self.run_dir / ".tmp-final_model"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if "before" in summary and "after" in summary:
            self.logger.table("held-out accuracy", {"before": summary["before"], "after": summary["after"]})
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.logger.close()
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
        self._group_counter = 0
        trees = self.new_trees(self.cfg.train.prompts_per_step)
        self.engine.reset_stats()
        with segrl_dist.gathered_for_rollout(self.policy):  # FSDP2: full weights for sampling
            roll = self.algorithm.rollout(self.engine, trees, self.scorer.bind(self))
        trees = roll.pop("_trees", trees)  # dynamic sampling may replace the batch
        stats = self.engine.stats
        t1 = time.perf_counter()
        samples, adv_metrics = self.algorithm.samples(trees)
        metrics = {**self.rollout_metrics(trees, samples), **roll, **adv_metrics}
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
        metrics.update({"timing/rollout": t1 - t0, "timing/train": t2 - t1, "step_time": t2 - t0, "epoch": float(self.epoch)})
        metrics.update(self.progress_metrics())
        if self.cfg.log.save_rollouts:
            for tr in trees:
                tr.row = {**tr.row, "step": self.step}
            name = "rollouts.jsonl" if self.dist.is_main else f"rollouts.rank{self.dist.rank}.jsonl"
            save_jsonl(trees, self.run_dir / name, append=True)
        self.logger.log(self.step, metrics, echo=self.step % self.cfg.log.logging_steps == 0)
        maybe_kill("after_step", self.step)
        return metrics


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _truncate(path: Path, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes (lines written after a checkpoint are dropped)."""
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


def _rng_to_json(obj):
    """RNG states as plain JSON (no pickle: a checkpoint must never run code on load)."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj.tolist()}
    if isinstance(obj, np.ndarray):
        return {"ndarray": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (tuple, list)):
        return {"seq": [_rng_to_json(x) for x in obj], "tuple": isinstance(obj, tuple)}
    if isinstance(obj, dict):
        return {"dict": {k: _rng_to_json(v) for k, v in obj.items()}}
    return obj


def _rng_from_json(obj):
    if isinstance(obj, dict):
        if "tensor" in obj:
            return torch.tensor(obj["tensor"], dtype=torch.uint8)
        if "ndarray" in obj:
            return np.array(obj["ndarray"], dtype=obj["dtype"])
        if "seq" in obj:
            items = [_rng_from_json(x) for x in obj["seq"]]
            return tuple(items) if obj["tuple"] else items
        if "dict" in obj:
            return {k: _rng_from_json(v) for k, v in obj["dict"].items()}
    return obj


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
