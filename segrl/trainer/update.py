"""One optimisation step of the policy: ``num_iterations`` passes of micro-batched
forward/backward over a step's samples, gradient clipping and one optimizer step per pass.

A NaN/inf loss or gradient never reaches the weights: that update is skipped and counted
(``train/skipped_updates``); the fifth skipped update stops the run.
"""

from __future__ import annotations

import math
import warnings

import torch

from .. import distributed as segrl_dist
from ..algos.losses import LossNormalizer, policy_loss
from ..algos.samples import TrainSample
from .batching import Batch, collate, micro_batches, sort_for_sharing
from .errors import TrainingError
from .policy import LogProbModule


def optimize(tr, samples: list[TrainSample]) -> dict[str, float]:
    """``num_iterations`` passes of trainer ``tr``'s policy over ``samples``, one optimizer
    step per pass; returns the step's loss/gradient/entropy/clip metrics (TRL names)."""
    t = tr.cfg.train
    pad = tr.tokenizer.pad_token_id if tr.tokenizer.pad_token_id is not None else 0
    n_seq = segrl_dist.all_reduce_sum(len(samples))  # batch-wide counts are over all ranks
    if n_seq == 0:
        return {}
    if not samples:  # torchrun: nothing here, but this rank must join the gradient all-reduce
        samples = [TrainSample([pad], [pad], [0.0], [0.0], [0])]
    num_tokens = segrl_dist.all_reduce_sum(sum(sum(s.mask) for s in samples))
    samples, skipped = _rows_with_gradient(samples, t, pad)
    mbs = micro_batches(sort_for_sharing(samples), t.micro_batch_size, t.max_tokens_per_micro_batch)
    batches = [collate(mb, pad, tr.share_contexts).to(tr.cfg.model.device) for mb in mbs]
    refs = [ref_logprobs(tr, b) for b in batches] if tr.ref_model is not None else [None] * len(batches)
    norm = LossNormalizer(
        num_tokens=num_tokens,
        num_sequences=n_seq,
        num_micro_batches=int(segrl_dist.all_reduce_sum(len(batches))),
        max_completion_length=tr.cfg.sampling.max_completion_length,
    )
    agg: dict[str, float] = {}
    tr.model.train()
    for _ in range(t.num_iterations):
        tr.optimizer.zero_grad(set_to_none=True)
        total_loss = _backward(tr, batches, refs, norm, agg)
        total_loss = segrl_dist.all_reduce_sum(total_loss)  # every rank takes the same skip decision
        gn = apply_update(tr, total_loss)
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
        "learning_rate": tr.scheduler.get_last_lr()[0],
        "train/skipped_updates": float(tr.skipped_updates),
        # rows left out of forward/backward because they carry no gradient (see below)
        "train/zero_advantage_rows": float(skipped),
    }
    if "kl" in agg:
        out["kl"] = agg["kl"] / max(agg["kl_tokens"], 1.0)
    return out


def _rows_with_gradient(samples: list[TrainSample], t, pad: int) -> tuple[list[TrainSample], int]:
    """A row whose loss-masked advantages are all 0 (e.g. a group with equal rewards) adds
    exactly 0 to the loss and its gradient when there is no KL term: skip its forward/backward.
    The normalisers count it all the same, so the update is unchanged (bnpo normalises per
    micro-batch, so there every row stays). Returns the rows to train and how many were left out."""
    if not (t.skip_zero_advantage_rows and t.beta == 0 and t.loss_type != "bnpo"):
        return samples, 0
    kept = [s for s in samples if any(a != 0.0 for a, m in zip(s.advantages, s.mask) if m)]
    # none left: still one (all-masked) pass: zero gradients, same optimizer step
    return kept or [TrainSample([pad], [pad], [0.0], [0.0], [0])], len(samples) - len(kept)


def _backward(tr, batches: list[Batch], refs: list, norm: LossNormalizer, agg: dict[str, float]) -> float:
    """Forward/backward of every micro-batch (gradients accumulate); returns the summed loss."""
    t = tr.cfg.train
    total_loss = 0.0
    for bi, (b, ref) in enumerate(zip(batches, refs)):
        # gradients are all-reduced on the last micro-batch only (accumulation)
        with segrl_dist.grad_sync(tr.policy, bi == len(batches) - 1):
            logp, ent = tr.policy(b, tr.cfg.sampling.temperature, tr.cfg.model.logprob_chunk_size, tr.share_contexts)
            loss, sums = policy_loss(logp, b.old, b.adv, b.mask, norm, t.loss_type, t.epsilon, t.epsilon_high, t.dual_clip, t.beta, ref)
            # the normalisers are global and DDP/FSDP average over ranks: x world size
            (loss * tr.dist.world_size).backward()
        total_loss += float(loss.detach())
        sums["entropy"] = float((ent * b.mask).sum())
        for k, v in sums.items():
            agg[k] = agg.get(k, 0.0) + v
    return total_loss


def apply_update(tr, total_loss: float) -> torch.Tensor:
    """Clip, then one optimizer step (skipped and counted when the loss or the gradient is
    not finite) and one scheduler step; returns the gradient norm."""
    t = tr.cfg.train
    params = [p for p in tr.policy.parameters() if p.requires_grad]
    gn = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
    if not (math.isfinite(total_loss) and torch.isfinite(gn)):
        tr.optimizer.zero_grad(set_to_none=True)
        tr.skipped_updates += 1
        tr.console.print(f"[red]step {tr.step + 1}: non-finite loss/grad (loss={total_loss}, grad_norm={float(gn)}); update skipped[/red]")
        if tr.skipped_updates >= 5:
            raise TrainingError("5 updates skipped for non-finite loss or gradients; stopping (last checkpoint is intact)")
    else:
        tr.optimizer.step()
    with warnings.catch_warnings():
        # A skipped update still advances the schedule (a skip must not shift the lr curve);
        # torch warns when that happens before any optimizer.step().
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
        tr.scheduler.step()
    return gn


def ref_logprobs(tr, batch: Batch) -> torch.Tensor:
    """Log-probs of ``batch`` under the frozen reference (the KL term, ``train.beta > 0``)."""
    temp = tr.cfg.sampling.temperature
    chunk = tr.cfg.model.logprob_chunk_size
    with torch.no_grad():
        if tr.ref_model == "adapters-disabled":
            with tr.model.disable_adapter():
                return tr.policy(batch, temp, chunk, tr.share_contexts)[0]
        return LogProbModule(tr.ref_model)(batch, temp, chunk, tr.share_contexts)[0]
