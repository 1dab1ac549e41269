"""SPO-chain sampling: trajectories, segment boundaries, and Monte-Carlo value estimates.

Paper: Guo et al., *Segment Policy Optimization*, arXiv 2505.23564, Sec. 4 (SPO-chain).

For each prompt (one :class:`~segrl.tree.RolloutTree`):

1. sample ``N`` trajectories in one :meth:`Engine.extend` call with ``keep_kv=True``, so each
   finished trajectory keeps the KV cache of its whole path;
2. cut each trajectory at its boundaries (a :mod:`~segrl.samplers.partition` strategy, then
   the ``max_segments`` cap). :meth:`RolloutTree.split` turns the trajectory into a chain
   ``head_1 -> ... -> tail``: boundary ``b_j`` is the end of node ``head_j`` (the prompt
   root for ``b = 0``) and the trajectory's KV moves to its last node;
3. boundary states shared by several trajectories of a prompt (same token prefix, e.g. the
   prompt itself, or a common first line) are estimated once: ``K`` MC continuations hang
   off one representative head node (``NodeInfo.MC``). All continuations of the batch
   come from one more ``extend`` call, in which every head's state is a *crop* of the KV
   its trajectory already holds (``engine.stats.kv_crops``): no prefix is prefilled twice;
4. the algorithm then scores trajectories and continuations together; ``V(s_b)`` = mean
   reward of the ``K`` continuations (:func:`segrl.algos.spo.spo_chain_estimate`).

Per trajectory leaf, ``NodeInfo.SPO_BOUNDS`` holds the boundary offsets (within the
completion) and ``NodeInfo.SPO_NODES`` the representative boundary nodes whose MC children
give the values.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..engine.base import RolloutEngine, release
from ..tree import FinishReason, NodeInfo, RolloutTree
from .partition import Partition, cap_boundaries, make_partition


class SPOChainSampler:
    """Grows SPO-chain rollouts (see the module docstring).

    Args:
        partition: the segment partition strategy, or a :class:`PartitionFor` that makes it
            from the engine's tokenizer at the first :meth:`sample`.
        num_generations: ``N`` trajectories per prompt.
        num_mc_samples: ``K`` continuations per distinct boundary state.
        max_completion_length: token limit of a trajectory (continuations included).
        max_segments, cap_rule: the boundary cap (:func:`cap_boundaries`).
    """

    def __init__(
        self,
        partition: Partition | PartitionFor,
        num_generations: int,
        num_mc_samples: int,
        max_completion_length: int,
        max_segments: int = 0,
        cap_rule: str = "even",
    ):
        self.partition, self._partition_for = (None, partition) if isinstance(partition, PartitionFor) else (partition, None)
        self.n = num_generations
        self.k = num_mc_samples
        self.max_len = max_completion_length
        self.max_segments = max_segments
        self.cap_rule = cap_rule

    # ----- the three phases ----------------------------------------------------------
    def sample_trajectories(self, engine: RolloutEngine, trees: Sequence[RolloutTree]) -> None:
        """``N`` trajectories per root, keeping their KV for the MC continuations."""
        engine.extend([(t, 0) for t in trees], self.max_len, self.n, keep_kv=True)
        for t in trees:
            for leaf in t.leaves(include_mc=False):
                if t[leaf].finish_reason == FinishReason.SEGMENT:
                    t[leaf].finish_reason = FinishReason.LENGTH

    def boundaries(self, tokens: Sequence[int], logprobs: Sequence[float]) -> tuple[list[int], int]:
        """Capped boundaries of one trajectory, and the uncapped candidate count."""
        cand = self.partition(tokens, logprobs)
        return cap_boundaries(cand, self.max_segments, self.cap_rule, logprobs), len(cand)

    def split(self, trees: Sequence[RolloutTree]) -> list[tuple[RolloutTree, int]]:
        """Cut every trajectory at its boundaries; return the distinct boundary nodes that
        need MC estimates (one per distinct prefix per tree), in a stable order."""
        requests: list[tuple[RolloutTree, int]] = []
        for t in trees:
            reps: dict[tuple[int, ...], int] = {}
            for leaf in t.leaves(include_mc=False):
                if NodeInfo.SPO_BOUNDS in t[leaf].info:
                    continue  # already split
                toks = t.path_token_ids(leaf, include_prompt=False)
                lps = t.path_logprobs(leaf)
                bounds, n_cand = self.boundaries(toks, lps)
                nodes, node, start = [], leaf, 0
                for b in bounds:
                    if b == 0:
                        head = 0  # the prompt state: the root, shared by the whole tree
                    else:
                        tail = t.split(node, b - start)
                        head, node, start = node, tail, b
                    key = tuple(toks[:b])
                    if key not in reps:
                        reps[key] = head
                        requests.append((t, head))
                    elif head != reps[key]:
                        t[head].info[NodeInfo.MC_FROM] = reps[key]
                    nodes.append(reps[key])
                t[node].info.update({NodeInfo.SPO_BOUNDS: list(bounds), NodeInfo.SPO_NODES: nodes, NodeInfo.SPO_CANDIDATES: n_cand})
        return requests

    def continue_mc(self, engine: RolloutEngine, requests: Sequence[tuple[RolloutTree, int]]) -> list[tuple[RolloutTree, int]]:
        """``K`` continuations from every boundary node in one engine call (crops of the
        trajectories' KV); returns the MC leaves."""
        if not requests:
            return []
        limits = [self.max_len - t.completion_len(h) for t, h in requests]
        kids = engine.extend(list(requests), limits, self.k, **{NodeInfo.MC: True})
        out = []
        for group in kids:
            for t, c in group:
                if t[c].finish_reason == FinishReason.SEGMENT:
                    t[c].finish_reason = FinishReason.LENGTH
                out.append((t, c))
        return out

    def sample(self, engine: RolloutEngine, trees: Sequence[RolloutTree], progress: float | None = None) -> dict[str, float]:
        """All three phases (no scoring: the algorithm scores every leaf, MC continuations
        included, and computes the values); returns SPO-chain metrics."""
        if self.partition is None:
            self.partition = self._partition_for(engine.tokenizer)
        decoded0 = engine.stats.decode_tokens
        self.sample_trajectories(engine, trees)
        traj_tokens = engine.stats.decode_tokens - decoded0
        requests = self.split(trees)
        mc_leaves = self.continue_mc(engine, requests)
        release(trees)
        trajs = [(t, leaf) for t in trees for leaf in t.leaves(include_mc=False)]
        counts = [len(t[l].info[NodeInfo.SPO_BOUNDS]) for t, l in trajs]
        seg_lens = [e - s for t, l in trajs for s, e in _segments(t[l].info[NodeInfo.SPO_BOUNDS], t.completion_len(l))]
        n_bounds = sum(counts)
        mc_tokens = sum(len(t[c].token_ids) for t, c in mc_leaves)
        return {
            "segments/mean_count": n_bounds / max(len(trajs), 1),
            "segments/mean_length": sum(seg_lens) / max(len(seg_lens), 1),
            "segments/candidates": sum(t[l].info[NodeInfo.SPO_CANDIDATES] for t, l in trajs) / max(len(trajs), 1),
            "segments/no_boundary_fraction": sum(c == 0 for c in counts) / max(len(trajs), 1),
            "mc/states": float(len(requests)),
            "mc/shared_states": float(n_bounds - len(requests)),
            "mc/rollouts": float(len(mc_leaves)),
            "mc/tokens": float(mc_tokens),
            "mc/tokens_per_trajectory": mc_tokens / max(len(trajs), 1),
            "mc/trajectory_tokens": float(traj_tokens),
        }


def _segments(bounds: Sequence[int], length: int) -> list[tuple[int, int]]:
    return list(zip(bounds, list(bounds[1:]) + [length]))


class PartitionFor:
    """``partition_for(tokenizer)``: the configured partition, made once the tokenizer is
    known (the newline partition decodes tokens)."""

    def __init__(self, spo_cfg, rho: float):
        self.spo_cfg, self.rho = spo_cfg, rho

    def __call__(self, tokenizer) -> Partition:
        return make_partition(self.spo_cfg, self.rho, tokenizer)


def chain_sampler(cfg) -> SPOChainSampler:
    """The SPO-chain sampler of a :class:`~segrl.configs.SegrlConfig` (``spo.*``; cutpoints
    at ``spo.cutpoint_rho``, default ``train.prob_mask_rho``)."""
    s = cfg.spo
    rho = s.cutpoint_rho if s.cutpoint_rho is not None else cfg.train.prob_mask_rho
    return SPOChainSampler(
        PartitionFor(s, rho),
        cfg.train.num_generations,
        s.num_mc_samples,
        cfg.sampling.max_completion_length,
        s.max_segments,
        s.cap_rule,
    )
