"""SPO-chain and SPO-tree as trainer algorithms (``--algo spo_chain`` / ``--algo spo_tree``).

Paper: Guo et al., *Segment Policy Optimization: Effective Segment-Level Credit Assignment in
RL for Large Language Models*, arXiv 2505.23564. Notes, defaults and the reference code's
defects: ``docs/spo.md``.

Both algorithms share the policy update of the paper (the trainer's clipped PPO surrogate;
no critic):

* the probability mask is on by default (``default_prob_mask = True``): only tokens whose
  sampling probability is below ``train.prob_mask_rho`` (0.9) are in the loss, and, since
  the trainer's KL mask defaults to the loss mask, in the KL term too;
* advantages are whitened over the loss-masked tokens with an explicit scope
  (``spo.whiten``: the whole batch by default, or per prompt, or not at all);
* optional KL to the initial model: ``train.beta`` (paper 1e-4, k3 estimator in the loss).
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import torch

from .. import distributed as segrl_dist
from ..algos.advantages import MeanStd, masked_whiten
from ..algos.samples import SampleInfo, TrainSample, prob_mask, trajectory_sample
from ..tree import FinishReason, NodeInfo, RolloutTree
from .algorithms import Advantages, Algorithm, register_algorithm


def whiten_samples(samples: list[TrainSample], scope: str, stats: MeanStd | None = segrl_dist.global_mean_std) -> None:
    """Whiten the advantages of ``samples`` in place over their masked tokens.

    ``scope``: ``batch`` (one mean/std for every masked token of the batch), ``group``
    (one per prompt: samples with the same ``info[SampleInfo.QID]``), ``none``. Unmasked tokens keep
    their raw value (they carry no loss). ``batch`` statistics come from ``stats``: by default
    over every rank under torchrun (a prompt's whole group is on one rank, so ``group`` needs
    no communication).
    """
    if scope == "none" or (not samples and scope != "batch"):
        return  # (batch: even with no samples here, the other ranks wait for this one's sums)
    if scope == "batch":
        buckets = [samples]
    elif scope == "group":
        by: dict = defaultdict(list)
        for s in samples:
            by[s.info.get(SampleInfo.QID, s.group)].append(s)
        buckets = list(by.values())
    else:
        raise ValueError(f"whiten scope must be batch, group or none, got {scope!r}")
    for bucket in buckets:
        adv = torch.tensor([a for s in bucket for a in s.advantages], dtype=torch.float64)
        mask = torch.tensor([m for s in bucket for m in s.mask], dtype=torch.bool)
        out = masked_whiten(adv, mask, stats=stats if scope == "batch" else None).tolist()
        pos = 0
        for s in bucket:
            n = len(s.advantages)
            s.advantages = out[pos : pos + n]
            pos += n


def advantage_metrics(values: list[float], prefix: str = "advantages/") -> dict[str, float]:
    """Distribution of raw segment advantages (one value per trained segment)."""
    if not values:
        return {f"{prefix}count": 0.0}
    a = np.asarray(values, dtype=np.float64)
    q = np.quantile(a, [0.1, 0.5, 0.9])
    return {
        f"{prefix}count": float(a.size),
        f"{prefix}mean": float(a.mean()),
        f"{prefix}std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        f"{prefix}min": float(a.min()),
        f"{prefix}max": float(a.max()),
        f"{prefix}abs_mean": float(np.abs(a).mean()),
        f"{prefix}p10": float(q[0]),
        f"{prefix}p50": float(q[1]),
        f"{prefix}p90": float(q[2]),
        f"{prefix}zero_fraction": float((a == 0).mean()),
        f"{prefix}positive_fraction": float((a > 0).mean()),
    }


class ReplayBuffer:
    """The reference SPO-tree's ``OnPolicyReplayBuffer`` (optional, off by default).

    Every step's samples are added with the step number; each step, samples ``max_age`` or
    more steps old are dropped, then up to ``per_prompt`` samples per prompt are drawn (and
    removed) at random; the rest wait for later steps. Training on them is partly
    off-policy: their old log-probs (PPO ratio, probability mask) come from the policy that
    sampled them. The buffer is not checkpointed (a resumed run starts it empty).
    """

    def __init__(self, per_prompt: int = 32, max_age: int = 8, seed: int = 0):
        self.per_prompt, self.max_age = per_prompt, max_age
        self.items: list[tuple[int, TrainSample]] = []
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, samples: list[TrainSample], step: int) -> None:
        self.items.extend((step, s) for s in samples)

    def draw(self, step: int) -> list[TrainSample]:
        self.items = [(k, s) for k, s in self.items if step - k < self.max_age]
        by: dict = defaultdict(list)
        for i, (_, s) in enumerate(self.items):
            by[s.info.get(SampleInfo.QID, s.group)].append(i)
        take: set[int] = set()
        for idx in by.values():
            take.update(self.rng.sample(idx, min(self.per_prompt, len(idx))))
        out = [self.items[i][1] for i in sorted(take)]
        self.items = [it for i, it in enumerate(self.items) if i not in take]
        return out


class _SPOBase(Algorithm):
    default_prob_mask = True
    config_section = "spo"

    def __init__(self, cfg, prompts=None):
        super().__init__(cfg, prompts)
        self.spo = cfg.spo
        self.buffer = ReplayBuffer(cfg.spo.replay_per_prompt, cfg.spo.replay_max_age, cfg.train.seed) if cfg.spo.replay_buffer else None
        self._step = 0

    def _mask(self, logprobs: list[float]) -> list[int]:
        return prob_mask(logprobs, self.rho) if self.rho is not None else [1] * len(logprobs)

    def _finish(self, samples: list[TrainSample], seg_adv: list[float]) -> tuple[list[TrainSample], dict]:
        """Replay buffer, drop all-masked samples, whiten; metrics."""
        resp = sum(len(s.response) for s in samples)
        kept = sum(sum(s.mask) for s in samples)
        metrics = {
            **advantage_metrics(seg_adv),
            "prob_mask/masked_fraction": 1.0 - kept / max(resp, 1),
            "prob_mask/kept_tokens": float(kept),
        }
        if self.buffer is not None:
            self.buffer.add(samples, self._step)
            samples = self.buffer.draw(self._step)
            metrics["replay/size"] = float(len(self.buffer))
            metrics["replay/drawn"] = float(len(samples))
        self._step += 1
        samples = [s for s in samples if any(s.mask)]  # no token in the loss: no gradient
        whiten_samples(samples, self.spo.whiten)
        w = [a for s in samples for a, m in zip(s.advantages, s.mask) if m]
        if w:
            metrics["advantages/whitened_abs_mean"] = float(np.mean(np.abs(w)))
        return samples, metrics


def _qid(tree: RolloutTree) -> int:
    return hash(tuple(tree.prompt_ids()))


@register_algorithm("spo_chain")
class SPOChain(_SPOBase):
    """SPO-chain: cutpoint segments, chain MC values (K per boundary), prob-mask PPO."""

    default_sampler = default_estimator = "spo_chain"
    samplers = ("spo_chain",)

    def samples(self, trees):
        adv = self.estimate(trees)
        out, seg_adv = [], []
        mt = self.cfg.train.mask_truncated_completions
        for i, (t, leaf) in enumerate(adv.refs):
            info = t[leaf].info
            bounds = info.get(NodeInfo.SPO_BOUNDS)
            if bounds is not None and self.estimator == "spo_chain":  # the boundary values, for the viewer
                info[NodeInfo.SPO_VALUES] = [t[n].value for n in info[NodeInfo.SPO_NODES]]
            seg_adv.extend(_credited(t, leaf, adv, i, bounds))
            s = trajectory_sample(t, leaf, adv.trajectory(i), mt, self.rho)
            if self.rho is not None:  # the segment advantage goes to its low-probability tokens only
                s.advantages = [a if m else 0.0 for a, m in zip(s.advantages, prob_mask(s.old_logprobs, self.rho))]
            s.info[SampleInfo.QID] = _qid(t)
            out.append(s)
        return self._finish(out, seg_adv)


def _credited(t: RolloutTree, leaf: int, adv: Advantages, i: int, bounds: list[int] | None) -> list[float]:
    """The segment advantages a trajectory contributes to the metrics: SPO-chain's segments
    (those that open at a boundary), else one value per trajectory or per segment."""
    if adv.scalar is not None:
        return [adv.scalar[i]]
    segs = adv.segments(i)
    if bounds is None:
        return segs
    return [v for (_, a, _), v in zip(t.segment_spans(leaf), segs) if a in bounds]


@register_algorithm("spo_tree")
class SPOTree(_SPOBase):
    """SPO-tree: fixed-length segment trees, recursive-mean values, one sample per segment.

    Each segment is trained once with its node's advantage; with an estimator whose value
    depends on the trajectory (outcome or ``trajectory``-level) a node gets the mean over
    the trajectories through it.
    """

    default_sampler = default_estimator = "spo_tree"
    samplers = ("spo_tree",)

    def samples(self, trees):
        node_adv = _node_advantages(self.estimate(trees))
        out, seg_adv, dropped = [], [], 0
        mt = self.cfg.train.mask_truncated_completions
        for t in trees:
            q = _qid(t)
            for i, node in enumerate(t.nodes):
                if i == 0 or not node.token_ids:
                    continue
                a = node_adv.get((id(t), i), 0.0)
                if self.spo.drop_zero_advantage and a == 0.0:
                    dropped += 1
                    continue
                seg_adv.append(a)
                mask = self._mask(node.logprobs)
                if mt and node.is_leaf and node.finish_reason in FinishReason.TRUNCATED:
                    mask = [0] * len(mask)
                adv = [a if (m or self.rho is None) else 0.0 for m in mask]
                info = {SampleInfo.NODE: i, SampleInfo.QID: q}
                ctx = t.path_token_ids(node.parent)
                out.append(TrainSample(ctx, list(node.token_ids), list(node.logprobs), adv, mask, group=t.group, info=info))
        samples, metrics = self._finish(out, seg_adv)
        metrics["tree/dropped_zero_advantage"] = float(dropped)
        metrics["tree/trained_segments"] = float(len(samples))
        return samples, metrics


def _node_advantages(adv: Advantages) -> dict[tuple[int, int], float]:
    """``(id(tree), node) -> advantage`` of every segment: the estimator's per-node value, or,
    for one that credits trajectories, the mean over the trajectories through the node."""
    if adv.per_node is not None:
        return {(k, i): a for k, row in adv.per_node.items() for i, a in enumerate(row)}
    seen: dict[tuple[int, int], list[float]] = defaultdict(list)
    for i, (t, leaf) in enumerate(adv.refs):
        for node, v in zip(t.path(leaf)[1:], adv.segments(i)):
            seen[(id(t), node)].append(v)
    return {k: sum(vs) / len(vs) for k, vs in seen.items()}
